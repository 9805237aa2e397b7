"""One version, from pyproject.toml: ``mirror --version``, the build-info metric, the TLS
context a bad certificate makes a config error."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.cli import main
from mirror.errors import ConfigError
from mirror.server.tls import ServerTls
from mirror.version import VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_pyprojects() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == VERSION


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mirror {VERSION}"


async def test_build_info_metric(mirror: Any) -> None:
    text = await (await mirror.get("/metrics")).text()
    line = next(line for line in text.splitlines() if line.startswith("mirror_build_info{"))
    assert f'version="{VERSION}"' in line and line.endswith(" 1.0")


def test_unloadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"^tls: cannot load the certificate"):
        ServerTls(config.TlsSettings(cert=cert, key=key))
