"""One version, from pyproject.toml (``mirror --version``, the build-info metric), and the
TLS reload that refuses a pair that does not load."""

from __future__ import annotations

import socket
import ssl
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mirror import config
from mirror.cli import main
from mirror.config.checks import tls_context
from mirror.server.tls import ServerTls
from mirror.version import VERSION
from tests.support.tlsca import TestCA

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


def test_a_pair_that_does_not_load_is_refused_and_the_running_one_stays(
        tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    first, second = ca.issue("first"), ca.issue("second")
    settings = config.TlsSettings(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    settings.cert.write_bytes(first.cert_path.read_bytes())
    settings.key.write_bytes(first.key_path.read_bytes())
    tls = ServerTls(settings, tls_context(settings))
    settings.key.write_bytes(second.key_path.read_bytes())  # no longer the certificate's key
    assert tls.reload() is False
    assert _serial(tls) == first.serial
    settings.cert.write_bytes(second.cert_path.read_bytes())
    assert tls.reload() is True
    assert _serial(tls) == second.serial


def _serial(tls: ServerTls) -> int:
    """The serial of the certificate the context presents, from a real handshake."""
    server_sock, client_sock = socket.socketpair()
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with server_sock, client_sock:
        server = tls.context.wrap_socket(server_sock, server_side=True,
                                         do_handshake_on_connect=False)
        peer = client.wrap_socket(client_sock, do_handshake_on_connect=False)
        server.setblocking(False)
        peer.setblocking(False)
        for _ in range(100):  # drive both ends of the handshake on one thread
            done = 0
            for end in (peer, server):
                try:
                    end.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            if done == 2:
                break
        der = peer.getpeercert(binary_form=True)
        peer.close()
        server.close()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
