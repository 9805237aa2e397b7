"""storage.s3 settings: defaults, credentials from env or file, errors naming their key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror import config
from mirror.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "mirror.example.yaml"


def _s3(section: dict[str, Any], **env: str) -> config.S3Settings:
    settings = config.parse({"storage": {"s3": section}}, env=env)
    assert settings.storage.s3 is not None
    return settings.storage.s3


def test_no_s3_section_means_no_shared_tier() -> None:
    assert config.parse({}, env={}).storage.s3 is None


def test_defaults_and_the_standard_aws_chain() -> None:
    s3 = _s3({"bucket": "mirror-eu"})
    assert (s3.bucket, s3.prefix, s3.region, s3.endpoint_url) == ("mirror-eu", "", None, None)
    assert s3.access_key_id is None and s3.secret_access_key is None
    assert not s3.redirect and s3.part_size == 16 << 20


def test_credentials_from_env_and_file_are_never_shown(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("file-secret\n")
    s3 = _s3({"bucket": "b-1", "prefix": "/team/mirror/", "endpoint_url": "http://minio:9000",
              "access_key_id_env": "KEY", "secret_access_key_file": str(tmp_path / "secret"),
              "redirect": True, "redirect_ttl": "5m", "part_size": "32MiB"}, KEY="env-key")
    assert s3.access_key_id is not None and s3.access_key_id.reveal() == "env-key"
    assert s3.secret_access_key is not None and s3.secret_access_key.reveal() == "file-secret"
    assert s3.prefix == "team/mirror" and str(s3.endpoint_url) == "http://minio:9000"
    assert s3.redirect and s3.redirect_ttl == 300 and s3.part_size == 32 << 20
    assert "file-secret" not in repr(s3) and "env-key" not in repr(s3)


@pytest.mark.parametrize(("section", "key"), [
    ({}, "storage.s3.bucket"),
    ({"bucket": "Not_A_Bucket"}, "storage.s3.bucket"),
    ({"bucket": "b-1", "prefix": "a/../b"}, "storage.s3.prefix"),
    ({"bucket": "b-1", "endpoint_url": "minio:9000"}, "storage.s3.endpoint_url"),
    ({"bucket": "b-1", "access_key_id_env": "NOPE", "secret_access_key_env": "NOPE"},
     "storage.s3.access_key_id_env"),
    ({"bucket": "b-1", "access_key_id_env": "KEY"}, "storage.s3"),
    ({"bucket": "b-1", "secret_access_key": "plain"}, "storage.s3.secret_access_key"),
    ({"bucket": "b-1", "redirect": "yes"}, "storage.s3.redirect"),
    ({"bucket": "b-1", "redirect_ttl": "30d"}, "storage.s3.redirect_ttl"),
    ({"bucket": "b-1", "part_size": "1MiB"}, "storage.s3.part_size"),
    ({"bucket": "b-1", "max_connections": 0}, "storage.s3.max_connections"),
    ({"bucket": "b-1", "failure_backoff": "later"}, "storage.s3.failure_backoff"),
])
def test_errors_name_their_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.parse({"storage": {"s3": section}}, env={"KEY": "k"})
    assert error.value.key == key
    if key.endswith("secret_access_key"):
        assert "never" in error.value.message


def test_the_example_s3_section_is_valid_once_uncommented() -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  # s3:")))
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(re.sub(r"^  # ?", "  ", line))
    section = yaml.safe_load("\n".join(block))["s3"]
    s3 = _s3(section, MIRROR_S3_KEY_ID="id", MIRROR_S3_SECRET="secret")
    assert s3.bucket == "mirror-eu" and str(s3.endpoint_url) == "http://minio:9000"
    assert set(section) == config._S3_KEYS - {"access_key_id_file", "secret_access_key_file"}
