"""Config validation: defaults, every error naming its key, secrets never shown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.cli import main
from mirror.errors import ConfigError


def _parse(document: Any, **env: str) -> config.Settings:
    return config.parse(document, env=env)


def test_no_config_means_docker_hub_default() -> None:
    settings = config.default_settings()
    hub = settings.default_upstream
    assert hub is not None and hub.name == "docker.io" and hub.library_prefix
    assert str(hub.url) == "https://registry-1.docker.io"
    assert settings.listen_port == 5000


def test_example_config_is_valid() -> None:
    settings = config.load(Path(__file__).parents[2] / "config" / "mirror.example.yaml")
    assert [u.name for u in settings.upstreams] == ["docker.io", "ghcr.io", "quay.io"]


@pytest.mark.parametrize(("document", "key"), [
    ({"version": 2}, "version"),
    ({"listen": "nope"}, "listen"),
    ({"bogus": 1}, "bogus"),
    ({"cache": {"tag_ttl": "soon"}}, "cache.tag_ttl"),
    ({"cache": {"memory_max_size": "lots"}}, "cache.memory_max_size"),
    ({"upstreams": []}, "upstreams"),
    ({"upstreams": [{"name": "a"}]}, "upstreams[0].url"),
    ({"upstreams": [{"name": "a", "url": "ftp://a"}]}, "upstreams[0].url"),
    ({"upstreams": [{"name": "a", "url": "http://u:p@a"}]}, "upstreams[0].url"),
    ({"upstreams": [{"name": "A B", "url": "http://a"}]}, "upstreams[0].name"),
    ({"upstreams": [{"name": "a", "url": "http://a", "password": "x"}]}, "upstreams[0].password"),
    ({"upstreams": [{"name": "a", "url": "http://a", "username": "u"}]}, "upstreams[0].username"),
    ({"upstreams": [{"name": "a", "url": "http://a", "username": "u",
                     "password_env": "NOPE"}]}, "upstreams[0].password_env"),
    ({"upstreams": [{"name": "a", "url": "http://a", "retries": -1}]}, "upstreams[0].retries"),
    ({"upstreams": [{"name": "a", "url": "http://a", "default": True},
                    {"name": "b", "url": "http://b", "default": True}]}, "upstreams"),
    ({"upstreams": [{"name": "a", "url": "http://a"},
                    {"name": "b", "url": "http://b", "aliases": ["a"]}]}, "upstreams[1]"),
    ({"server": {"event_loop": "trio"}}, "server.event_loop"),
    ({"log": {"level": "loud"}}, "log.level"),
])
def test_errors_name_their_key(document: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        _parse(document)
    assert error.value.key == key
    assert str(error.value).startswith(key)


def test_password_from_env_and_file_is_never_shown(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("file-secret\n")
    settings = _parse({"upstreams": [
        {"name": "a", "url": "http://a", "username": "u", "password_env": "TOKEN"},
        {"name": "b", "url": "http://b", "username": "u", "password_file": str(secret_file)},
    ]}, TOKEN="env-secret")
    a, b = settings.upstreams
    assert a.password is not None and a.password.reveal() == "env-secret"
    assert b.password is not None and b.password.reveal() == "file-secret"
    assert "secret" not in repr(settings) and "secret" not in str(a.password)


def test_durations_and_sizes() -> None:
    assert config.parse_duration("250ms") == 0.25
    assert config.parse_duration("5m") == 300
    assert config.parse_duration(7) == 7
    assert config.parse_size("1MiB") == 1 << 20
    assert config.parse_size("2GB") == 2 * 10**9


def test_hub_gets_library_prefix_and_host_alias() -> None:
    hub, = _parse({"upstreams": [{"name": "docker.io",
                                  "url": "https://registry-1.docker.io"}]}).upstreams
    assert hub.library_prefix
    other, = _parse({"upstreams": [{"name": "r", "url": "http://127.0.0.1:5001"}]}).upstreams
    assert not other.library_prefix and "127.0.0.1:5001" in other.names()


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\nupstreams: [{name: r, url: 'http://r', default: true}]\n")
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncache: {tag_ttl: soon}\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache.tag_ttl" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [1\n")
    assert main(["config", "check", str(broken)]) == 2


def test_server_workers() -> None:
    upstreams = [{"name": "r", "url": "http://127.0.0.1:5001"}]
    assert _parse({"upstreams": upstreams}).server.workers == max(os.cpu_count() or 1, 1)
    assert _parse({"upstreams": upstreams, "server": {"workers": 4}}).server.workers == 4
    auto = _parse({"upstreams": upstreams, "server": {"workers": "auto"}}).server.workers
    assert auto == max(os.cpu_count() or 1, 1)
    for bad in (0, 257, "many", True, 1.5):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            _parse({"upstreams": upstreams, "server": {"workers": bad}})
