"""``mirror import`` applies the site's signature policy offline, with the signatures the
bundle carries: real Distribution with Docker-Hub-like token auth, images signed here per
cosign's SIGNATURE_SPEC (the ``sha256-<hex>.sig`` layout), a real mirror process that
exports them (``--referrers``, no policy), real mirror processes (one worker and two) that
serve what was imported to skopeo, digests checked:

* a node with ``policy`` enforce requiring the trusted key imports only the images that key
  signed (a ``.sig``, and a keyed sigstore bundle with the referrers tag schema, with
  their signatures); the unsigned one and the one a stranger signed are refused, one
  line each naming the rule and the reason, exit status 3, their own blobs not published
  (the layer they share with the signed image is); the signed ones pull with skopeo from
  the importing mirror, its upstream unreachable (the bundle read from the imported
  referrers tag schema);
* a bundle whose signature payload blob was altered is refused whole by the bundle check
  (the blob does not hash to its name): exit status 1, nothing published.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore
from tests.integration.test_bundle_real import CountingPort
from tests.support import cosign_sign as cs
from tests.support.cosign_push import push_bundle, push_legacy
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import SkopeoError, manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration
UPSTREAM = "registry.test"
SHARED = make_layer(6000, seed=61)


@dataclass
class Exported:
    """The bundle exported from the online mirror, the images in it, the trusted key."""

    bundle: Path
    images: dict[str, Image]
    public_pem: bytes
    payload_digest: str  # the good image's signature payload blob


def _mirror(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def exported(registry_token: Registry, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Push the images, sign two of them, export all three through a mirror."""
    tmp = tmp_path_factory.mktemp("import-policy")
    trusted, stranger = cs.new_key("p256"), cs.new_key("p256")
    images = {name: make_image(f"acme/imp-{name}", "v1",
                               layers=[SHARED, make_layer(5000 + seed, seed=seed)], fmt="oci")
              for seed, name in enumerate(["good", "unsigned", "stranger", "bundled"], start=62)}
    for image in images.values():
        registry_token.push(image)
    push_legacy(registry_token, "acme/imp-good", images["good"].manifest.digest, trusted)
    bundled = images["bundled"]  # a keyed sigstore bundle, with the referrers tag schema
    push_bundle(registry_token, "acme/imp-bundled", bundled.manifest.digest,
                bundled.manifest.size, trusted)
    push_legacy(registry_token, "acme/imp-stranger", images["stranger"].manifest.digest,
                stranger)
    config = mirror_config(free_port(), tmp / "online-cache",
                           [{"name": UPSTREAM, "url": registry_token.url, "default": True}])
    (tmp / "online.yaml").write_text(yaml.safe_dump(config))
    bundle = tmp / "site.tar"
    refs = [f"{UPSTREAM}/acme/imp-{name}:v1" for name in images]
    export = _mirror("export", "--config", tmp / "online.yaml", "--referrers", *refs,
                     "-o", bundle, "-q")
    assert export.returncode == 0, export.stdout + export.stderr
    body = cs.payload(images["good"].manifest.digest,
                      reference=f"{registry_token.host}/acme/imp-good")
    return Exported(bundle, images, cs.public_pem(trusted), str(Digest.of(body)))


@pytest.fixture
def offline_port() -> Iterator[CountingPort]:
    port = CountingPort()
    yield port
    port.close()


def _site(tmp: Path, exported: Exported, upstream_port: int, workers: int) -> Path:
    """The importing node's config: upstream unreachable, ``policy`` enforce on acme/*."""
    (tmp / "release.pub").write_bytes(exported.public_pem)
    config = mirror_config(free_port(), tmp / "site-cache",
                           [{"name": UPSTREAM, "url": f"http://127.0.0.1:{upstream_port}",
                             "default": True}])
    config["server"] = {"workers": workers}
    config["cache"] = {"tag_ttl": "1h"}
    config["policy"] = {"keys": [{"name": "release", "file": str(tmp / "release.pub")}],
                        "rules": [{"repositories": ["acme/*"], "require": ["release"]}],
                        "default": "allow"}
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _held(cache: Path, digest: str) -> bool:
    store = FilesystemStore(cache)
    parsed = Digest.parse(digest)
    return store.blob_size(parsed) is not None or store.manifest_path(parsed).is_file()


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_enforce_imports_only_the_signed_image_which_then_pulls_offline(
        tmp_path: Path, exported: Exported, offline_port: CountingPort, workers: int) -> None:
    site = _site(tmp_path, exported, offline_port.port, workers)
    result = _mirror("import", "--config", site, exported.bundle, "-q")
    assert result.returncode == 3, result.stdout + result.stderr
    refused = [line for line in result.stderr.splitlines() if line.startswith("  refused: ")]
    assert len(refused) == 2, result.stderr
    for name in ("unsigned", "stranger"):
        assert any(f"{UPSTREAM}/acme/imp-{name}:v1" in line and "rule 1" in line
                   and "no signature by release" in line for line in refused), refused
    assert f"tag {UPSTREAM}/acme/imp-good:v1" in result.stdout
    good = exported.images["good"]
    sig_tag = good.manifest.digest.replace(":", "-") + ".sig"
    assert f"tag {UPSTREAM}/acme/imp-good:{sig_tag}" in result.stdout
    bundled = exported.images["bundled"]
    assert f"tag {UPSTREAM}/acme/imp-bundled:v1" in result.stdout
    assert f"tag {UPSTREAM}/acme/imp-bundled:{bundled.manifest.digest.replace(':', '-')}" \
        in result.stdout  # the referrers tag schema's index, listing the bundle
    assert "imp-unsigned" not in result.stdout and "imp-stranger" not in result.stdout

    cache = tmp_path / "site-cache"
    for name in ("unsigned", "stranger"):
        image = exported.images[name]
        assert not _held(cache, image.manifest.digest)
        assert not _held(cache, image.layers[1].digest)  # only the refused image has it
    assert _held(cache, SHARED.digest)  # the signed image uses it too

    process = MirrorProcess(tmp_path / "site", yaml.safe_load(site.read_text()))
    process.start(timeout=30)
    try:
        for image in (good, bundled):
            out = skopeo_copy(f"127.0.0.1:{process.port}/{image.repo}:v1",
                              tmp_path / image.repo.replace("/", "-"))
            assert manifest_digest(out) == image.manifest.digest
            assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}
        # (the serving node's gate asks upstream's referrers API first; unreachable, it
        # reads the referrers tag schema the import recorded)
        with pytest.raises(SkopeoError):
            skopeo_copy(f"127.0.0.1:{process.port}/acme/imp-unsigned:v1",
                        tmp_path / "unsigned")
    finally:
        process.stop()


def _alter_blob(source: Path, digest: str, target: Path) -> None:
    """A copy of the bundle with one byte of the blob ``digest`` flipped, in place."""
    name = "blobs/" + digest.replace(":", "/")
    out = io.BytesIO()
    with tarfile.open(source) as tar, tarfile.open(fileobj=out, mode="w",
                                                   format=tarfile.PAX_FORMAT) as copy:
        for member in tar:
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if member.name == name:
                data = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
            copy.addfile(member, io.BytesIO(data))
    target.write_bytes(out.getvalue())


def test_an_altered_signature_blob_is_refused_by_the_bundle_check(
        tmp_path: Path, exported: Exported, offline_port: CountingPort) -> None:
    altered = tmp_path / "altered.tar"
    _alter_blob(exported.bundle, exported.payload_digest, altered)
    site = _site(tmp_path, exported, offline_port.port, 1)
    result = _mirror("import", "--config", site, altered, "-q")
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "does not hash to its name" in line, line
    assert exported.payload_digest in line
    cache = tmp_path / "site-cache"
    assert not any(_held(cache, b.digest) for image in exported.images.values()
                   for b in image.blobs())
