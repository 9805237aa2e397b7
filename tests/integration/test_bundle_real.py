"""Tests of record for air-gapped bundles: real Distribution, real skopeo and containerd.

- The air-gap: export from a mirror in front of Distribution (while it serves), import
  into a second mirror whose upstream is a port that counts connections, then skopeo and
  containerd pull every image through the second mirror: zero connections upstream.
- Round trip with skopeo: skopeo reads our bundle (``oci-archive:``) and checks every
  digest; our import reads an archive skopeo made from the registry.
- A differential holds only the new blobs; without its base it fails listing them.
- ``kill -9`` during an import: nothing half-published, the second run finishes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.containerd import Containerd
from tests.support.images import Blob, Image, Index, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import (
    child_manifests,
    manifest_digest,
    skopeo_copy,
    verify_dir,
    write_registries_conf,
)

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CountingPort:
    """A loopback port that accepts and drops every connection, counting them.

    The upstream of an air-gapped mirror: any attempt to reach it is counted.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def offline_port() -> Iterator[CountingPort]:
    port = CountingPort()
    yield port
    port.close()


def _config(tmp: Path, name: str, upstream_url: str, **cache: Any) -> Path:
    config = mirror_config(free_port(), tmp / f"{name}-cache",
                           [{"name": UPSTREAM, "url": upstream_url, "default": True,
                             "aliases": ["reg"]}])
    if cache:
        config["cache"] = cache
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mirror_cli(*args: str | Path, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGS`` with its output captured."""
    proc = subprocess.run([sys.executable, "-m", "mirror", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"mirror {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def _keys(tmp: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = tmp / "key.pem", tmp / "key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _serve(tmp: Path, config: Path) -> MirrorProcess:
    process = MirrorProcess(tmp / config.stem, yaml.safe_load(config.read_text()))
    process.start()
    return process


def _skopeo_verify(mirror: MirrorProcess, item: Image | Index, dest: Path) -> None:
    conf = write_registries_conf(dest.parent / f"{dest.name}.conf", UPSTREAM,
                                 f"127.0.0.1:{mirror.port}")
    out = skopeo_copy(f"{UPSTREAM}/{item.repo}:{item.tag}", dest, all_platforms=True,
                      registries_conf=conf)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == {b.digest: b.size for b in item.blobs()}
    children = item.children if isinstance(item, Index) else []
    assert child_manifests(out) == {c.manifest.digest: c.manifest.size for c in children}


def _read_bundle(bundle: Path) -> tuple[list[str], dict[str, Any]]:
    """The entry names and the bundle.json of a bundle (.tar or .tar.zst)."""
    data = bundle.read_bytes()
    if bundle.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("bundle.json")
        assert member is not None
        return tar.getnames(), json.load(member)


def test_air_gap_export_import_then_skopeo_and_containerd_pull_offline(
        tmp_path: Path, registry_anon: Registry, std_images: list[Image | Index],
        offline_port: CountingPort, containerd: Containerd) -> None:
    online = _config(tmp_path, "online", registry_anon.url)
    source = _serve(tmp_path, online)
    try:
        # One image already in the cache, the others fetched by the export itself.
        _skopeo_verify(source, std_images[0], tmp_path / "warm")
        private, public = _keys(tmp_path)
        bundle = tmp_path / "site.tar.zst"
        refs = [f"{UPSTREAM}/{std_images[0].repo}:v1", f"reg/{std_images[1].repo}:v1",
                f"{std_images[2].repo}:v1", f"{std_images[3].repo}@{std_images[3].manifest.digest}",
                f"{std_images[3].repo}:v1"]
        out = mirror_cli("export", "--config", online, *refs, "--sign-key", private,
                         "-o", bundle, "-q").stdout
        assert "signed bundle.json with key sha256:" in out
    finally:
        source.stop()

    offline = _config(tmp_path, "offline", f"http://127.0.0.1:{offline_port.port}",
                      tag_ttl="1h")
    out = mirror_cli("import", "--config", offline, bundle, "--verify-key", public, "-q").stdout
    assert "signature of bundle.json verified with key sha256:" in out
    for item in std_images:
        assert f"tag {UPSTREAM}/{item.repo}:v1" in out
    again = mirror_cli("import", "--config", offline, bundle, "-q").stdout
    assert "0 new blob(s) and 0 manifest(s)" in again  # idempotent

    target = _serve(tmp_path, offline)
    try:
        for n, item in enumerate(std_images):
            _skopeo_verify(target, item, tmp_path / f"pulled-{n}")
        hosts = containerd.hosts_dir(UPSTREAM, target.url)
        for item in std_images:
            containerd.fetch(f"{UPSTREAM}/{item.repo}:{item.tag}", hosts, namespace="airgap")
        stored = containerd.content_digests("airgap")
        assert {b.digest for item in std_images for b in item.blobs()} <= stored
    finally:
        target.stop()
    assert offline_port.connections == 0


def test_skopeo_reads_our_bundle_and_we_import_skopeo_archives(
        tmp_path: Path, registry_anon: Registry, std_images: list[Image | Index],
        skopeo_bin: str, offline_port: CountingPort) -> None:
    online = _config(tmp_path, "online", registry_anon.url)
    bundle = tmp_path / "plain.tar"
    docker, oci_image, oci_index = std_images[0], std_images[1], std_images[2]
    assert isinstance(oci_index, Index)
    mirror_cli("export", "--config", online, f"{docker.repo}:v1", f"{oci_image.repo}:v1",
               f"{oci_index.repo}:v1", "--platform", "linux/arm64", "-o", bundle, "-q")
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    amd64, arm64 = oci_index.children
    assert f"blobs/sha256/{arm64.layers[0].digest[7:]}" in names
    assert f"blobs/sha256/{amd64.layers[0].digest[7:]}" not in names  # platform left out

    # skopeo reads it as an OCI archive and checks every digest on the way to dir:
    # (skopeo 1.9 looks up OCI-typed descriptors only; the Docker image is in the bundle
    # with its original bytes all the same, for our import and newer tools)
    out = tmp_path / "from-bundle"
    _skopeo(skopeo_bin, "copy", f"oci-archive:{bundle}:{UPSTREAM}/{oci_image.repo}:v1",
            f"dir:{out}")
    assert manifest_digest(out) == oci_image.manifest.digest
    assert verify_dir(out) == {b.digest: b.size for b in oci_image.blobs()}
    assert f"blobs/sha256/{docker.manifest.digest[7:]}" in names
    arm = tmp_path / "arm"
    _skopeo(skopeo_bin, "--override-arch", "arm64", "copy",
            f"oci-archive:{bundle}:{UPSTREAM}/{oci_index.repo}:v1", f"dir:{arm}")
    assert verify_dir(arm) == {b.digest: b.size for b in arm64.blobs()}

    # An archive skopeo made from the registry (an OCI image keeps its digest).
    made = tmp_path / "skopeo.tar"
    _skopeo(skopeo_bin, "copy", "--src-tls-verify=false", "--all",
            f"docker://{registry_anon.host}/{oci_index.repo}:v1",
            f"oci-archive:{made}:{UPSTREAM}/{oci_index.repo}:v1")
    made2 = tmp_path / "skopeo-bare.tar"
    _skopeo(skopeo_bin, "copy", "--src-tls-verify=false",
            f"docker://{registry_anon.host}/{oci_image.repo}:v1", f"oci-archive:{made2}:v1")
    offline = _config(tmp_path, "offline", f"http://127.0.0.1:{offline_port.port}",
                      tag_ttl="1h")
    printed = mirror_cli("import", "--config", offline, made, "-q").stdout
    assert f"tag {UPSTREAM}/{oci_index.repo}:v1" in printed
    printed = mirror_cli("import", "--config", offline, made2, "--repository",
                         f"{UPSTREAM}/{oci_image.repo}", "-q").stdout
    assert f"tag {UPSTREAM}/{oci_image.repo}:v1" in printed
    target = _serve(tmp_path, offline)
    try:
        _skopeo_verify(target, oci_index, tmp_path / "pulled-index")
        _skopeo_verify(target, oci_image, tmp_path / "pulled-image")
    finally:
        target.stop()
    assert offline_port.connections == 0


def _skopeo(binary: str, *args: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp",
           "HTTP_PROXY": "http://127.0.0.1:1", "HTTPS_PROXY": "http://127.0.0.1:1",
           "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.run([binary, "--insecure-policy", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, f"skopeo {' '.join(args)}:\n{proc.stderr}"


def test_differential_holds_only_new_blobs_and_needs_its_base(
        tmp_path: Path, registry_anon: Registry, offline_port: CountingPort) -> None:
    base_layers = [make_layer(300_000, seed=7101), make_layer(200_000, seed=7102)]
    v1 = make_image("diff/app", "v1", layers=base_layers, fmt="oci")
    v2 = make_image("diff/app", "v2", layers=[*base_layers, make_layer(100_000, seed=7103)],
                    fmt="oci")
    registry_anon.push(v1)
    registry_anon.push(v2)
    online = _config(tmp_path, "online", registry_anon.url)
    first, second = tmp_path / "first.tar", tmp_path / "second.tar.zst"
    mirror_cli("export", "--config", online, "diff/app:v1", "-o", first, "-q")
    dry = mirror_cli("export", "--config", online, "diff/app:v1", "diff/app:v2", "--since",
                     first, "--dry-run").stdout
    assert "3 to write" in dry and "4 left out" in dry and not second.exists()
    mirror_cli("export", "--config", online, "diff/app:v1", "diff/app:v2", "--since", first,
               "-o", second, "-q")
    _, base = _read_bundle(first)
    names, diff = _read_bundle(second)
    blobs = {n for n in names if n.startswith("blobs/")}
    new = {v2.manifest.digest, v2.config.digest, v2.layers[2].digest}
    assert blobs == {f"blobs/sha256/{d[7:]}" for d in new}
    assert diff["base"] == base["id"] and diff["sequence"] == base["sequence"] + 1

    offline = _config(tmp_path, "offline", f"http://127.0.0.1:{offline_port.port}",
                      tag_ttl="1h")
    failed = mirror_cli("import", "--config", offline, second, "-q", check=False)
    assert failed.returncode == 1
    line = failed.stderr.strip()
    assert "\n" not in line and "import the bundles it is based on first" in line
    for digest in (v1.manifest.digest, v1.config.digest, *(b.digest for b in base_layers)):
        assert digest in line
    cache = tmp_path / "offline-cache"
    assert not any((cache / "blobs").rglob("*")) and not any((cache / "manifests").rglob("*"))

    mirror_cli("import", "--config", offline, first, "-q")
    target = _serve(tmp_path, offline)
    try:
        _skopeo_verify(target, v1, tmp_path / "v1")
        mirror_cli("import", "--config", offline, second, "-q")  # beside the running server
        _skopeo_verify(target, v2, tmp_path / "v2")
    finally:
        target.stop()
    assert offline_port.connections == 0


def test_kill_9_during_import_then_a_second_run_finishes(
        tmp_path: Path, registry_anon: Registry, big_image: Image,
        offline_port: CountingPort) -> None:
    online = _config(tmp_path, "online", registry_anon.url)
    bundle = tmp_path / "big.tar"
    mirror_cli("export", "--config", online, f"{big_image.repo}:v1", "-o", bundle,
               "--max-part-size", "16MiB", "-q")
    parts = sorted(tmp_path.glob("big.tar.0*"))
    assert len(parts) == 5 and (tmp_path / "big.tar.sha256").is_file()

    offline = _config(tmp_path, "offline", f"http://127.0.0.1:{offline_port.port}",
                      tag_ttl="1h")
    cache = tmp_path / "offline-cache"
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "import", "--config",
                             str(offline), str(parts[0]), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > (8 << 20) for p in (cache / "tmp").glob("import-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(p.is_file() for p in (cache / "blobs").rglob("*"))  # nothing half-published

    printed = mirror_cli("import", "--config", offline, parts[0], "-q").stdout
    assert f"tag {UPSTREAM}/{big_image.repo}:v1" in printed
    assert not list((cache / "tmp").glob("import-*"))
    target = _serve(tmp_path, offline)
    try:
        _skopeo_verify(target, big_image, tmp_path / "big")
    finally:
        target.stop()
    assert offline_port.connections == 0


def _artifact(layer: bytes, layer_type: str, subject: Blob | None = None) -> tuple[Blob, Blob,
                                                                                   Blob]:
    """A cosign-like artifact manifest: an empty config, one layer, maybe a subject."""
    config = Blob.of(b"{}", "application/vnd.oci.image.config.v1+json")
    blob = Blob.of(layer, layer_type)
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                "config": config.descriptor(), "layers": [blob.descriptor()]}
    if subject is not None:
        document["subject"] = subject.descriptor()
    return config, blob, Blob.of(json.dumps(document).encode(), OCI_MANIFEST)


def test_referrers_and_cosign_tags_come_along_and_are_served_offline(
        tmp_path: Path, registry_anon: Registry, offline_port: CountingPort) -> None:
    image = make_image("signed/app", "v1", layers=[make_layer(50_000, seed=7201)], fmt="oci")
    registry_anon.push(image)
    hex_ = image.manifest.digest[7:]
    sig_config, sig_layer, signature = _artifact(b'{"critical": {}}',
                                                 "application/vnd.dev.cosign.simplesigning.v1+json")
    _, sbom_layer, sbom = _artifact(b'{"spdxVersion": "SPDX-2.3"}',
                                    "application/spdx+json", subject=image.manifest)
    # Distribution 2.8 has no referrers API: the referrers tag schema stands in for it.
    schema = Blob.of(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**sbom.descriptor(), "artifactType": "application/spdx+json"}]}).encode(), OCI_INDEX)
    registry_anon.push_raw("signed/app", [sig_config, sig_layer, sbom_layer],
                           [(signature, f"sha256-{hex_}.sig"), (sbom, sbom.digest),
                            (schema, f"sha256-{hex_}")])
    online = _config(tmp_path, "online", registry_anon.url)
    bundle = tmp_path / "signed.tar"
    mirror_cli("export", "--config", online, "signed/app:v1", "--referrers", "-o", bundle, "-q")
    names, document = _read_bundle(bundle)
    for blob in (signature, sig_layer, sbom, sbom_layer, schema):
        assert f"blobs/sha256/{blob.digest[7:]}" in names
    tags = {r["tag"] for r in document["references"]}
    assert tags == {"v1", f"sha256-{hex_}.sig", f"sha256-{hex_}"}

    offline = _config(tmp_path, "offline", f"http://127.0.0.1:{offline_port.port}",
                      tag_ttl="1h")
    mirror_cli("import", "--config", offline, bundle, "-q")
    target = _serve(tmp_path, offline)
    try:
        accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        for reference, blob in ((f"sha256-{hex_}.sig", signature), (sbom.digest, sbom),
                                (f"sha256-{hex_}", schema)):
            with _DIRECT.open(urllib.request.Request(
                    f"{target.url}/v2/signed/app/manifests/{reference}", headers=accept)) as resp:
                assert resp.read() == blob.data
    finally:
        target.stop()
    assert offline_port.connections == 0
