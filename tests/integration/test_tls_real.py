"""TLS as an operator runs it: a private CA, real clients that verify, SIGHUP reloads.

The mirror serves a certificate issued by a CA made in the test; skopeo
(``--src-cert-dir``) and containerd (``ca =`` in ``hosts.toml``) trust only
that CA and pull through it with every digest checked. A new certificate is
loaded on SIGHUP while a keep-alive connection made before it goes on working.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.containerd import Containerd
from tests.support.images import Image, Index
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import SkopeoError, manifest_digest, skopeo_copy, verify_dir
from tests.support.tlsca import ServerCert, TestCA

pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    """A private CA for this test."""
    return TestCA(tmp_path / "ca")


def _tls_mirror(workdir: Path, registry: Registry, cert: ServerCert) -> MirrorProcess:
    upstream = {"name": "registry.test", "url": registry.url, "default": True}
    config = mirror_config(free_port(), workdir / "cache", [upstream])
    # The files the mirror reads; a rotation replaces them (as cert-manager or certbot do).
    live_cert, live_key = workdir / "tls.crt", workdir / "tls.key"
    workdir.mkdir(parents=True, exist_ok=True)
    live_cert.write_bytes(cert.cert_path.read_bytes())
    live_key.write_bytes(cert.key_path.read_bytes())
    config["tls"] = {"cert": str(live_cert), "key": str(live_key)}
    return MirrorProcess(workdir, config)


@pytest.fixture
def tls_mirror(tmp_path: Path, ca: TestCA, registry_anon: Registry) -> Iterator[MirrorProcess]:
    """The mirror over https with a certificate from ``ca``, in front of Distribution."""
    mirror = _tls_mirror(tmp_path / "mirror", registry_anon, ca.issue("server-1"))
    mirror.start()
    yield mirror
    mirror.stop()


def _events(mirror: MirrorProcess, event: str) -> list[dict[str, Any]]:
    return mirror.events(event)


def _wait_event(mirror: MirrorProcess, event: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(_events(mirror, event)) < count:
        assert time.monotonic() < deadline, f"no {event} in the log:\n{mirror.log_tail()}"
        time.sleep(0.05)


def _presented_serial(port: int) -> int:
    """The serial of the certificate a new connection to the mirror is shown."""
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def _replace(src: Path, dest: Path) -> None:
    """Swap ``dest`` for a copy of ``src`` in one rename, as a rotation does."""
    tmp = dest.with_suffix(".new")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dest)


def test_skopeo_pulls_over_tls_trusting_only_the_private_ca(
        tls_mirror: MirrorProcess, ca: TestCA, std_images: list[Image | Index],
        tmp_path: Path) -> None:
    image = next(i for i in std_images if isinstance(i, Image))
    ref = f"127.0.0.1:{tls_mirror.port}/{image.repo}:{image.tag}"
    (tmp_path / "no-ca").mkdir()
    with pytest.raises(SkopeoError, match="certificate signed by unknown authority"):
        skopeo_copy(ref, tmp_path / "untrusted", cert_dir=tmp_path / "no-ca")
    out = skopeo_copy(ref, tmp_path / "pulled", cert_dir=ca.trust_dir)
    assert manifest_digest(out) == image.manifest.digest
    assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}
    started = _events(tls_mirror, "mirror_started")[0]
    assert started["tls"] is True and started["listen"] == f"127.0.0.1:{tls_mirror.port}"
    assert started["version"]


def test_containerd_pulls_over_tls_with_the_ca_in_hosts_toml(
        tls_mirror: MirrorProcess, ca: TestCA, containerd: Containerd,
        registry_anon: Registry, std_images: list[Image | Index]) -> None:
    hosts = containerd.hosts_dir(registry_anon.host, tls_mirror.url, ca=ca.cert_path)
    for item in std_images:
        containerd.fetch(f"{registry_anon.host}/{item.repo}:{item.tag}", hosts,
                         namespace="tls")
    stored = containerd.content_digests(namespace="tls")
    for item in std_images:
        assert {item.manifest.digest, *(b.digest for b in item.blobs())} <= stored
    api = [r for r in _events(tls_mirror, "request") if r.get("route") in ("manifest", "blob")]
    assert api and all(r["status"] == 200 for r in api)


@pytest.mark.parametrize("workers", [1, 2])
def test_mirror_reload_loads_a_new_certificate_and_keeps_open_connections(
        tmp_path: Path, ca: TestCA, registry_anon: Registry, workers: int) -> None:
    """``mirror reload`` (SIGHUP to the pid file's process): with two workers, the
    supervisor passes it on and every worker loads the new pair."""
    tls_mirror = _tls_mirror(tmp_path / "mirror", registry_anon, ca.issue("server-1"))
    tls_mirror.config["server"] = {"workers": workers}
    tls_mirror.start(timeout=60)
    try:
        _wait_event(tls_mirror, "mirror_started", workers, timeout=30)
        _reload_twice(tls_mirror, ca, workers)
    finally:
        tls_mirror.stop()


def _reload(mirror: MirrorProcess) -> None:
    result = subprocess.run([sys.executable, "-m", "mirror", "reload", "--config",
                             str(mirror.config_path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reload: sent SIGHUP to the mirror (pid {mirror.pid})"


def _reload_twice(tls_mirror: MirrorProcess, ca: TestCA, workers: int) -> None:
    first, second = ca.issue("server-1"), ca.issue("server-2")
    live_cert = Path(tls_mirror.config["tls"]["cert"])
    live_key = Path(tls_mirror.config["tls"]["key"])
    before = _presented_serial(tls_mirror.port)

    client = ssl.create_default_context(cafile=str(ca.cert_path))
    conn = http.client.HTTPSConnection("127.0.0.1", tls_mirror.port, context=client)
    conn.request("GET", "/v2/")
    assert conn.getresponse().read() is not None
    sock = conn.sock
    assert sock is not None
    old_peer = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True) or b"")

    _replace(second.cert_path, live_cert)
    _replace(second.key_path, live_key)
    _reload(tls_mirror)
    _wait_event(tls_mirror, "tls_reloaded", workers)
    for _ in range(4 * workers):  # new connections, to any worker
        assert _presented_serial(tls_mirror.port) == second.serial != before

    # The connection opened before the reload is the same one and still answers.
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    assert conn.sock is sock and old_peer.serial_number == before
    conn.close()

    # A key that does not match is refused; the running certificate stays.
    _replace(first.key_path, live_key)
    _reload(tls_mirror)
    _wait_event(tls_mirror, "tls_reload_failed", workers)
    for _ in range(4 * workers):
        assert _presented_serial(tls_mirror.port) == second.serial
    assert len(_events(tls_mirror, "tls_reloaded")) == workers


def test_sighup_without_tls_is_logged_and_serving_goes_on(
        registry_anon: Registry, tmp_path: Path) -> None:
    upstream = {"name": "registry.test", "url": registry_anon.url, "default": True}
    mirror = MirrorProcess(tmp_path / "plain", mirror_config(free_port(), tmp_path / "c",
                                                             [upstream]))
    mirror.start()
    try:
        mirror.send_signal(signal.SIGHUP)
        _wait_event(mirror, "sighup_ignored", 1)
        started = _events(mirror, "mirror_started")[0]
        assert started["tls"] is False
    finally:
        code = mirror.stop()
    assert code == 0
    stopping, stopped = _events(mirror, "mirror_stopping"), _events(mirror, "mirror_stopped")
    assert len(stopping) == 1 and len(stopped) == 1 and stopped[0]["version"]
