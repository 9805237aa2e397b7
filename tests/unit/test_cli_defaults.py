"""Defaults that protect the operator (issue 21): which commands need upstream secrets,
``config check`` reporting every error, size units, a busy port that is not a config error,
and the ``Server`` header naming the mirror (the lean path's answers too)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror import config
from mirror.cli import main
from mirror.errors import ConfigError
from mirror.storage.filesystem import FilesystemStore
from mirror.version import VERSION
from tests.support.fake import FakeRegistry

UNSET = "MIRROR_TEST_NEVER_SET_7f3a"


@pytest.mark.parametrize(("text", "size"), [
    ("5G", 5 * 2**30), ("5g", 5 * 2**30), ("5GiB", 5 * 2**30), ("5gib", 5 * 2**30),
    ("5Gi", 5 * 2**30), ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("512M", 512 * 2**20),
    ("1.5T", int(1.5 * 2**40)), ("100", 100), ("10 KB", 10_000)])
def test_sizes_in_every_usual_spelling(text: str, size: int) -> None:
    assert config.parse_size(text, "storage.max_size") == size
    settings = config.parse({"storage": {"path": "/tmp/x", "max_size": text}}, env={})
    assert settings.storage.max_size == size


def _file(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_config_check_reports_every_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _file(tmp_path, {
        "version": 1, "colour": "blue", "cache": {"tag_ttl": "soon"}, "log": {"level": "loud"},
        "storage": {"path": str(tmp_path / "cache"), "max_size": "lots"},
        "upstreams": [{"name": "a.test", "url": "http://a.test"},
                      {"name": "b.test", "url": "ftp://b.test"},
                      {"name": "c.test", "url": "http://c.test", "password_env": UNSET,
                       "username": "u"}]})
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("colour", "cache.tag_ttl", "log.level", "storage.max_size", "upstreams[1].url",
                f"upstreams[2].password_env: environment variable {UNSET} is not set"):
        assert f"config error: {key}" in err, (key, err)
    assert "6 errors" in err


def test_only_serve_warm_and_sync_need_upstream_secrets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _file(tmp_path, {
        "version": 1, "storage": {"path": str(tmp_path / "cache")},
        "upstreams": [{"name": "quay.io", "username": "robot", "password_env": UNSET,
                       "default": True}]})
    assert main(["config", "check", str(path)]) == 2
    assert f"environment variable {UNSET} is not set" in capsys.readouterr().err
    assert main(["config", "check", "--no-env", str(path)]) == 0
    store = FilesystemStore(tmp_path / "cache")
    store.open_shared()
    store.index.close()
    assert main(["cache", "du", "--config", str(path)]) == 0
    assert main(["cache", "ls", "--config", str(path)]) == 0
    assert main(["import", "-q", "--config", str(path), str(tmp_path / "none.tar")]) == 1
    assert "is not set" not in capsys.readouterr().err  # fails on the file, not the secret
    for command in (["warm", "x:1"], ["sync", "--once"]):
        assert main([*command, "--config", str(path)]) == 2
        assert f"environment variable {UNSET} is not set" in capsys.readouterr().err
    lenient = config.load(path, require_env=False)
    quay, = lenient.upstreams
    assert quay.credentials == () and quay.password is None  # never a placeholder upstream
    with pytest.raises(ConfigError, match=UNSET):
        config.load(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_not_a_config_error(tmp_path: Path, workers: int,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = _file(tmp_path, {"version": 1, "listen": f"127.0.0.1:{port}",
                                "storage": {"path": str(tmp_path / "cache")},
                                "server": {"workers": workers}})
        assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"mirror: cannot listen on 127.0.0.1:{port}: Address already in use\n"


async def test_the_server_header_names_the_mirror_on_both_paths(make_mirror: Any,
                                                                fake: FakeRegistry) -> None:
    mirror = await make_mirror()
    digest, _ = fake.add_image("app", "v1", [b"layer"])
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    path = f"/v2/app/manifests/{digest}"
    answers = [await mirror.get(path, headers=accept) for _ in range(3)]  # 3rd: lean path
    answers += [await mirror.get("/v2/"), await mirror.get("/v2/app/blobs/sha256:" + "0" * 64),
                await mirror.get("/metrics")]
    for answer in answers:
        assert answer.headers["Server"] == f"mirror/{VERSION}", answer

