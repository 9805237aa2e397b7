"""``mirror import`` with the site's signature policy: every image of a bundle judged offline
by the same gate, with the signatures the bundle carries (cosign's ``.sig`` layout, written
here per SIGNATURE_SPEC, and a keyed sigstore bundle among the referrers).

Bundles are built entry by entry, as ``mirror export --referrers`` lays them out; the
real-process case (export from a mirror in front of real Distribution, import, pull with
skopeo) is ``tests/integration/test_import_policy_real.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import diskcache
import pytest

from mirror import cli
from mirror.bundle import layout
from mirror.bundle.importer import Importer, Report
from mirror.bundle.manifest import BundleManifest
from mirror.cache.tags import tag_key
from mirror.node import policy_gate
from mirror.oci import Digest
from mirror.routing import Router
from mirror.storage.filesystem import FilesystemStore
from tests.support import cosign_sign as cs
from tests.support.bundles import tar_of
from tests.support.images import Blob, Image, make_image, make_layer
from tests.unit.conftest import mirror_settings

REGISTRY = "fake.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SHARED = make_layer(4000, seed=90)  # a layer both the signed and the unsigned image hold


def _image(repo: str, seed: int) -> Image:
    return make_image(repo, "v1", layers=[SHARED, make_layer(3000 + seed, seed=seed)],
                      fmt="oci")


def _sig(digest: str, key: cs.PrivateKey, *, tamper: bool = False) -> list[Blob]:
    """cosign's ``.sig`` manifest for ``digest`` (first) and the blobs it names."""
    body = cs.payload(digest, reference=f"{REGISTRY}/app")
    data, notes = cs.legacy_layer(key, body)
    if tamper:  # one byte of the signature changed: a consistent bundle, a bad signature
        raw = bytearray(base64.b64decode(notes["dev.cosignproject.cosign/signature"]))
        raw[-1] ^= 1
        notes = {"dev.cosignproject.cosign/signature": base64.b64encode(raw).decode()}
    image = cs.sig_manifest([(data, notes)])
    config = Blob.of(b"{}", "application/vnd.oci.image.config.v1+json")
    return [Blob.of(image.manifest, OCI_MANIFEST), config,
            *(Blob.of(b, cs.SIMPLESIGNING) for b in image.blobs.values())]


def _bundle_sig(digest: str, size: int, key: cs.PrivateKey) -> list[Blob]:
    """A keyed sigstore bundle attached as a referrer of ``digest`` (manifest first)."""
    bundle = Blob.of(json.dumps(cs.dsse_bundle(key, digest)).encode(), cs.BUNDLE_V03)
    empty = Blob.of(b"{}", "application/vnd.oci.empty.v1+json")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": cs.BUNDLE_V03,
           "config": empty.descriptor(), "layers": [bundle.descriptor()],
           "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": size}}
    return [Blob.of(json.dumps(doc).encode(), OCI_MANIFEST), empty, bundle]


class Layout:
    """A bundle built as ``mirror export`` writes one: tagged images, then referrers."""

    def __init__(self) -> None:
        self.refs: list[dict[str, Any]] = []
        self.descriptors: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}

    def tag(self, repo: str, tag: str, manifest: Blob, blobs: list[Blob]) -> None:
        name = f"{REGISTRY}/{repo}:{tag}"
        self.refs.append({"name": name, "registry": REGISTRY, "repository": repo, "tag": tag,
                          "digest": manifest.digest, "mediaType": manifest.media_type,
                          "size": manifest.size})
        self.descriptors.append({**manifest.descriptor(),
                                 "annotations": {layout.REF_NAME: name}})
        self._add([manifest, *blobs])

    def image(self, image: Image) -> None:
        self.tag(image.repo, image.tag, image.manifest, [image.config, *image.layers])

    def signature(self, repo: str, digest: str, blobs: list[Blob]) -> None:
        self.tag(repo, digest.replace(":", "-", 1) + ".sig", blobs[0], blobs[1:])

    def referrer(self, blobs: list[Blob]) -> None:
        self.descriptors.append({**blobs[0].descriptor(), "artifactType": cs.BUNDLE_V03})
        self._add(blobs)

    def _add(self, blobs: list[Blob]) -> None:
        for blob in blobs:
            self.blobs[blob.digest] = blob.data

    def tar(self) -> bytes:
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": self.descriptors}).encode()
        bundle = BundleManifest(tool_version="test", references=self.refs)
        for name, data in ((layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.INDEX, index)):
            bundle.files[name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                  "size": len(data)}
        bundle.blobs = {d: len(b) for d, b in self.blobs.items()}
        entries = [(layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.BUNDLE, bundle.to_bytes()),
                   (layout.INDEX, index), *((layout.blob_name(d), b)
                                            for d, b in self.blobs.items())]
        return tar_of(entries)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, cs.PrivateKey]:
    trusted = cs.new_key("p256")
    (tmp_path / "release.pub").write_bytes(cs.public_pem(trusted))
    return {"trusted": trusted, "stranger": cs.new_key("p256")}


def _policy(tmp_path: Path, mode: str = "enforce") -> dict[str, Any]:
    return {"keys": [{"name": "release", "file": str(tmp_path / "release.pub")}],
            "rules": [{"repositories": ["app/*"], "require": ["release"], "mode": mode}],
            "default": "allow"}


def _import(tmp_path: Path, data: bytes, mode: str | None = "enforce") -> Report:
    (tmp_path / "bundle.tar").write_bytes(data)
    settings = mirror_settings(tmp_path / "cache", "http://127.0.0.1:1",
                               **({"policy": _policy(tmp_path, mode)} if mode else {}))
    store = FilesystemStore(tmp_path / "cache")
    store.open_shared()
    try:
        importer = Importer(store, Router(settings.upstreams), gate=policy_gate(settings))
        with importer.locked():
            return importer.run([tmp_path / "bundle.tar"])
    finally:
        store.index.close()


def _tags(tmp_path: Path) -> dict[str, str]:
    with diskcache.Cache(str(tmp_path / "cache" / "tags")) as cache:
        return {str(k): cache[k]["digest"] for k in cache}


def _held(tmp_path: Path, digest: str) -> bool:
    store = FilesystemStore(tmp_path / "cache")
    parsed = Digest.parse(digest)
    return store.blob_size(parsed) is not None or store.manifest_path(parsed).is_file()


def _matrix(keys: dict[str, cs.PrivateKey]) -> tuple[Layout, dict[str, Image]]:
    images = {name: _image(f"app/{name}", seed) for seed, name in
              enumerate(["good", "bundled", "unsigned", "stranger", "wrongdigest"], start=1)}
    bundle = Layout()
    for image in images.values():
        bundle.image(image)
    digest = {name: image.manifest.digest for name, image in images.items()}
    bundle.signature("app/good", digest["good"], _sig(digest["good"], keys["trusted"]))
    bundle.signature("app/stranger", digest["stranger"],
                     _sig(digest["stranger"], keys["stranger"]))
    bundle.signature("app/wrongdigest", digest["wrongdigest"],
                     _sig(digest["good"], keys["trusted"]))
    bundled = images["bundled"]
    referrer = _bundle_sig(bundled.manifest.digest, bundled.manifest.size, keys["trusted"])
    bundle.referrer(referrer)
    fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**referrer[0].descriptor(), "artifactType": cs.BUNDLE_V03}]}).encode()
    bundle.tag("app/bundled", bundled.manifest.digest.replace(":", "-"),  # cosign's fallback
               Blob.of(fallback, OCI_INDEX), [])
    return bundle, images


def test_enforce_imports_only_the_images_signed_by_the_required_key(
        tmp_path: Path, keys: dict[str, cs.PrivateKey]) -> None:
    bundle, images = _matrix(keys)
    report = _import(tmp_path, bundle.tar())
    refused = {line.split(" ", 1)[0]: line for line in report.refused}
    assert set(refused) == {f"{REGISTRY}/app/{n}:v1"
                            for n in ("unsigned", "stranger", "wrongdigest")}
    assert all("rule 1: no signature by release" in line for line in refused.values())
    tags = _tags(tmp_path)
    assert tags[tag_key(REGISTRY, "app/good", "v1")] == images["good"].manifest.digest
    assert tags[tag_key(REGISTRY, "app/bundled", "v1")] == images["bundled"].manifest.digest
    good_sig = images["good"].manifest.digest.replace(":", "-") + ".sig"
    assert tag_key(REGISTRY, "app/good", good_sig) in tags  # its signature travels with it
    fallback = images["bundled"].manifest.digest.replace(":", "-")
    assert tag_key(REGISTRY, "app/bundled", fallback) in tags  # the referrers tag schema
    assert not any("app/unsigned" in k or "app/stranger" in k or "app/wrongdigest" in k
                   for k in tags)
    for name in ("good", "bundled"):
        assert all(_held(tmp_path, b.digest) for b in images[name].blobs())
    for name in ("unsigned", "stranger", "wrongdigest"):
        image = images[name]
        assert not _held(tmp_path, image.manifest.digest)
        assert not _held(tmp_path, image.layers[1].digest)  # its own layer: not published
    assert _held(tmp_path, SHARED.digest)  # the shared layer: the good image uses it
    assert report.withheld > 0


def test_warn_imports_everything_with_a_warning_line(
        tmp_path: Path, keys: dict[str, cs.PrivateKey]) -> None:
    bundle, images = _matrix(keys)
    report = _import(tmp_path, bundle.tar(), mode="warn")
    assert report.refused == [] and report.withheld == 0
    assert len(report.warned) == 3
    assert all("no signature by release" in line for line in report.warned)
    assert all(_held(tmp_path, b.digest) for image in images.values() for b in image.blobs())


def test_without_a_policy_everything_is_imported(
        tmp_path: Path, keys: dict[str, cs.PrivateKey]) -> None:
    bundle, images = _matrix(keys)
    report = _import(tmp_path, bundle.tar(), mode=None)
    assert report.refused == report.warned == []
    assert len(report.tags) == len(images) + 4


def test_a_tampered_signature_in_a_consistent_bundle_is_refused_by_the_policy(
        tmp_path: Path, keys: dict[str, cs.PrivateKey]) -> None:
    image = _image("app/good", 1)
    bundle = Layout()
    bundle.image(image)
    bundle.signature("app/good", image.manifest.digest,
                     _sig(image.manifest.digest, keys["trusted"], tamper=True))
    report = _import(tmp_path, bundle.tar())
    assert len(report.refused) == 1 and "no signature by release" in report.refused[0]
    assert report.tags == []
    assert not _held(tmp_path, image.manifest.digest)
    assert not _held(tmp_path, SHARED.digest)  # nothing else uses it


def test_a_deny_rule_refuses_whatever_signs_it(
        tmp_path: Path, keys: dict[str, cs.PrivateKey]) -> None:
    image = _image("app/good", 1)
    bundle = Layout()
    bundle.image(image)
    bundle.signature("app/good", image.manifest.digest,
                     _sig(image.manifest.digest, keys["trusted"]))
    (tmp_path / "bundle.tar").write_bytes(bundle.tar())
    policy = {**_policy(tmp_path), "rules": [{"repositories": ["app/good"], "deny": True}]}
    settings = mirror_settings(tmp_path / "cache", "http://127.0.0.1:1", policy=policy)
    store = FilesystemStore(tmp_path / "cache")
    store.open_shared()
    try:
        importer = Importer(store, Router(settings.upstreams), gate=policy_gate(settings))
        with importer.locked():
            report = importer.run([tmp_path / "bundle.tar"])
    finally:
        store.index.close()
    assert len(report.refused) == 1 and "rule 1" in report.refused[0]
    assert "denied by rule 1" in report.refused[0]


def _write_config(tmp_path: Path, mode: str = "enforce") -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps({
        "version": 1, "storage": {"path": str(tmp_path / "cache")},
        "upstreams": [{"name": REGISTRY, "url": "http://127.0.0.1:1", "default": True}],
        "policy": _policy(tmp_path, mode)}))
    return path


def test_cli_names_each_refused_image_and_exits_3(
        tmp_path: Path, keys: dict[str, cs.PrivateKey],
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _ = _matrix(keys)
    (tmp_path / "bundle.tar").write_bytes(bundle.tar())
    config = _write_config(tmp_path)
    code = cli.main(["import", str(tmp_path / "bundle.tar"), "--config", str(config), "-q"])
    out = capsys.readouterr()
    assert code == 3, out.err
    refused = [line for line in out.err.splitlines() if line.startswith("  refused: ")]
    assert len(refused) == 3
    assert any(f"{REGISTRY}/app/unsigned:v1" in line and "no signature by release" in line
               for line in refused)
    assert "the policy refused 3 image(s)" in out.err
    assert f"tag {REGISTRY}/app/good:v1" in out.out

    again = cli.main(["import", str(tmp_path / "bundle.tar"), "--config", str(config), "-q",
                      "--no-policy"])
    assert again == 0  # --no-policy: as the bundle says
    assert tag_key(REGISTRY, "app/unsigned", "v1") in _tags(tmp_path)


def test_cli_warn_mode_exits_0_with_warning_lines(
        tmp_path: Path, keys: dict[str, cs.PrivateKey],
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _ = _matrix(keys)
    (tmp_path / "bundle.tar").write_bytes(bundle.tar())
    config = _write_config(tmp_path, "warn")
    code = cli.main(["import", str(tmp_path / "bundle.tar"), "--config", str(config), "-q"])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("  warning: imported, but ") == 3
