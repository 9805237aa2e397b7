"""A section's keys, defaults and grammars are written once, on its dataclass (issue 24
item 5): the allowed keys, the defaults and the one-line errors come from the fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror import config
from mirror.cli import main
from mirror.config.values import field_default, section_keys
from mirror.errors import ConfigError


def _parse(**sections: object) -> config.Settings:
    return config.parse({"version": 1, **sections}, env={})


def test_a_sections_keys_are_its_fields_by_their_file_names() -> None:
    assert section_keys(config.CacheSettings) == {
        "tag_ttl", "stale_if_error", "negative_ttl", "memory_max_size", "memory_item_max_size"}
    assert section_keys(config.LogSettings) == {"level", "format"}
    assert section_keys(config.LoginLimits) == {"per_address", "per_user", "window", "queue",
                                                "delay"}
    assert "schedule" not in section_keys(config.PopularSettings)  # worked out, not a key


def test_a_secret_field_is_given_by_env_or_file_never_in_the_file() -> None:
    keys = section_keys(config.S3Settings)
    assert {"access_key_id_env", "access_key_id_file"} <= keys and "access_key_id" not in keys
    assert section_keys(config.AdminSettings) == {"listen", "token_env", "token_file"}
    assert {"password_env", "password_file", "request_timeout"} <= section_keys(
        config.UpstreamSettings)
    with pytest.raises(ConfigError, match="never put credentials in the file"):
        _parse(storage={"s3": {"bucket": "b-1", "access_key_id": "AKIA"}})


def test_defaults_come_from_the_dataclass() -> None:
    settings = _parse(cache={}, log={}, server={"workers": 1}, auth={"anonymous": True},
                      access=[{"who": ["*"]}])
    assert settings.cache == config.CacheSettings()
    assert settings.log == config.LogSettings()
    assert settings.server.chunk_size == field_default(config.ServerSettings, "chunk_size")
    assert settings.auth is not None and settings.auth.limits == config.LoginLimits()


def test_a_key_is_read_by_its_grammar_under_its_file_name() -> None:
    settings = _parse(cache={"memory_max_size": "8MiB", "tag_ttl": "2m"},
                      log={"level": "WARNING"}, server={"workers": 1, "event_loop": "asyncio"})
    assert settings.cache.memory_max_bytes == 8 * 2**20 and settings.cache.tag_ttl == 120
    assert settings.log.level == "warning" and settings.server.event_loop == "asyncio"


@pytest.mark.parametrize(("sections", "path", "words"), [
    ({"cache": {"memory_max_bytes": 1}}, "cache.memory_max_bytes",
     "unknown key (expected one of memory_item_max_size, memory_max_size, negative_ttl"),
    ({"cache": {"tag_ttl": "soon"}}, "cache.tag_ttl", "expected a duration like 30s"),
    ({"log": {"level": "loud"}}, "log.level", "expected debug, info, warning or error"),
    ({"server": {"event_loop": "trio"}}, "server.event_loop", "expected asyncio or uvloop"),
    ({"server": {"chunk_size": "1KiB"}}, "server.chunk_size", "between 4KiB and 16MiB"),
    ({"auth": {"anonymous": True, "limits": {"queue": 0}}, "access": [{"who": ["*"]}]},
     "auth.limits.queue", "must be at least 1"),
    ({"sync": {"popular": {"schedule": 1}}}, "sync.popular.schedule", "unknown key"),
])
def test_errors_name_the_key_path(sections: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(**sections)
    assert caught.value.key == path and words in caught.value.message


def test_config_check_still_reports_every_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "mirror.yaml"
    file.write_text("version: 1\ncache: {tag_ttl: soon}\nlog: {level: loud}\n"
                    "server: {nope: 1}\n")
    assert main(["config", "check", str(file)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[2].strip() for line in err[:3]] == [
        "cache.tag_ttl", "log.level", "server.nope"]
    assert err[-1].endswith("3 errors")
