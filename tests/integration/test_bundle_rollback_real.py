"""Signed bundles through the real CLI and the real server (issue 19 item 6).

Two bundles signed by one key set the same tag to two images; the newer is imported
first, then the older: the real ``mirror import`` leaves the tag alone and says so, and
the real server (one process, or a supervisor with two workers) answers the newer
digest with its upstream unreachable. With ``import.trusted_keys`` in the config, an
unsigned bundle is refused by every import, even one that names no key.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.bundles import bundle_entries, tar_of
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port

pytestmark = pytest.mark.integration
REGISTRY = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _bundle(path: Path, image: Image, created: str, key: Ed25519PrivateKey | None) -> Path:
    """A bundle of ``image`` as mirror export lays it out, made at ``created``."""
    entries = bundle_entries(REGISTRY, image, key,
                             edit=lambda bundle: setattr(bundle, "created", created))
    path.write_bytes(tar_of(entries))
    return path


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def _public(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "bundle.pub"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_an_older_signed_bundle_does_not_move_a_served_tag(tmp_path: Path,
                                                           workers: int) -> None:
    key = Ed25519PrivateKey.generate()
    public = _public(tmp_path, key)
    old = make_image("app/web", "v1", layers=[make_layer(4000, 1)], fmt="oci")
    new = make_image("app/web", "v1", layers=[make_layer(4000, 9)], fmt="oci")
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": REGISTRY, "url": f"http://127.0.0.1:{free_port()}",
                             "default": True, "retries": 0}])
    config["server"] = {"workers": workers}
    config_path = tmp_path / "mirror.yaml"
    config_path.write_text(yaml.safe_dump(config))
    newer = _bundle(tmp_path / "new.tar", new, "2026-12-01T10:00:00.000002Z", key)
    older = _bundle(tmp_path / "old.tar", old, "2026-12-01T10:00:00.000001Z", key)
    first = _cli("import", "-q", "--config", config_path, "--verify-key", public, newer)
    assert first.returncode == 0, first.stderr
    second = _cli("import", "-q", "--config", config_path, "--verify-key", public, older)
    assert second.returncode == 0, second.stderr
    assert f"{REGISTRY}/app/web:v1: left alone" in second.stdout
    assert "--allow-rollback" in second.stdout

    mirror = MirrorProcess(tmp_path, config)
    mirror.start()
    try:
        request = urllib.request.Request(
            f"{mirror.url}/v2/app/web/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        for _ in range(2 * workers):  # whichever worker answers
            with _DIRECT.open(request, timeout=10) as answer:
                assert answer.headers["Docker-Content-Digest"] == new.manifest.digest
    finally:
        mirror.stop()

    rolled = _cli("import", "-q", "--config", config_path, "--verify-key", public,
                  "--allow-rollback", older)
    assert rolled.returncode == 0 and f"tag {REGISTRY}/app/web:v1" in rolled.stdout


def test_trusted_keys_make_every_import_require_a_signature(tmp_path: Path) -> None:
    trusted, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    image = make_image("app/web", "v1", layers=[make_layer(2000, 3)], fmt="oci")
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": REGISTRY, "url": "http://127.0.0.1:1", "default": True}])
    config["import"] = {"trusted_keys": [str(_public(tmp_path, trusted))]}
    config_path = tmp_path / "mirror.yaml"
    config_path.write_text(yaml.safe_dump(config))
    for name, key, message in (("unsigned", None, "is not signed"),
                               ("stranger", stranger, "not by sha256:")):
        bundle = _bundle(tmp_path / f"{name}.tar", image, "2026-12-01T10:00:00Z", key)
        refused = _cli("import", "-q", "--config", config_path, bundle)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1
    assert not [p for p in (tmp_path / "cache").rglob("blobs/**/*") if p.is_file()]
    signed = _bundle(tmp_path / "signed.tar", image, "2026-12-01T10:00:00Z", trusted)
    accepted = _cli("import", "-q", "--config", config_path, signed)
    assert accepted.returncode == 0 and "verified with key sha256:" in accepted.stdout
