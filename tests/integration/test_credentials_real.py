"""Credentials end to end: the mirror as a real process in front of real Distribution
with Basic auth (htpasswd), its credentials coming from a docker config.json whose
``credHelpers`` entry runs a helper script; skopeo pulls through and every digest
is checked."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import Image, Index, standard_set
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

USER, PASSWORD = "mirror-bot", "htpasswd-secret-42"


@pytest.fixture(scope="module")
def registry_basic(registry_bin: str, htpasswd_bin: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Image]]:
    """Distribution with Basic auth, seeded with one image of the standard set."""
    registry = Registry(tmp_path_factory.mktemp("registry-basic"), htpasswd=(USER, PASSWORD))
    registry.start()
    try:
        image = next(i for i in standard_set("cred") if isinstance(i, Image))
        registry.push(image)
        yield registry, image
    finally:
        registry.stop()


def _helper(bin_dir: Path, log: Path) -> None:
    script = bin_dir / "docker-credential-mirrortest"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
server=$(cat)
printf '%s\\n' "$server" >> {log}
printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$server"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_mirror_process_gets_basic_credentials_from_a_credential_helper(
        registry_basic: tuple[Registry, Image], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry, image = registry_basic
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper_log = tmp_path / "helper.log"
    _helper(bin_dir, helper_log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"credHelpers": {registry.host: "mirrortest"}}))
    upstream = {"name": registry.host, "url": registry.url, "default": True,
                "docker_config": str(docker_config)}
    config = mirror_config(free_port(), tmp_path / "cache", [upstream])
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start()
    try:
        item: Image | Index = image
        out = skopeo_copy(f"127.0.0.1:{mirror.port}/{item.repo}:{item.tag}", tmp_path / "out")
        assert manifest_digest(out) == item.manifest.digest
        assert verify_dir(out) == {b.digest: b.size for b in item.blobs()}
    finally:
        mirror.stop()
    assert helper_log.read_text().splitlines() == [registry.host]
    log = mirror.log_path.read_text()
    assert PASSWORD not in log and "upstream_credential_loaded" in log
