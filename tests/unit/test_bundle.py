"""Bundles in process: every bad bundle refused with one line and nothing published; parts;
imported tags served while the upstream fails.

Bundles are built here entry by entry (the way ``mirror export`` lays them out, or broken
on purpose); the export's planning through the pull service runs against real Distribution
in ``tests/integration/test_bundle_real.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mirror import cli, config
from mirror.bundle import layout
from mirror.bundle.importer import Importer
from mirror.bundle.manifest import BundleManifest, sign
from mirror.bundle.parts import Output, expand
from mirror.bundle.progress import Progress
from mirror.cache.tags import tag_key
from mirror.clock import ManualClock
from mirror.errors import BundleError, OciError
from mirror.oci import Digest
from mirror.routing import Router
from mirror.storage.filesystem import FilesystemStore
from tests.support.bundles import Entries, bundle_entries, tar_of
from tests.support.fake import FakeRegistry
from tests.support.images import Image, make_image, make_layer
from tests.unit.conftest import cache_files, mirror_settings

REGISTRY = "fake.test"


def _image(tag: str = "v1", seed: int = 1) -> Image:
    return make_image("app/web", tag, layers=[make_layer(3000, seed), make_layer(5000, seed + 1)],
                      fmt="oci")


def _entries(image: Image, key: Ed25519PrivateKey | None = None,
             edit: Callable[[BundleManifest], None] = lambda _b: None) -> Entries:
    """The entries of a bundle of ``image`` as mirror export writes them."""
    return bundle_entries(REGISTRY, image, key, edit)


def _store(tmp_path: Path) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "cache")
    store.open_shared()
    return store


def _importer(store: FilesystemStore, **kwargs: Any) -> Importer:
    settings = mirror_settings(store.root, "http://127.0.0.1:1")
    return Importer(store, Router(settings.upstreams), **kwargs)


def _import(tmp_path: Path, data: bytes, name: str = "bundle.tar", **kwargs: Any) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_bytes(data)
    store = _store(tmp_path)
    try:
        importer = _importer(store, **kwargs)
        with importer.locked():
            return importer.run([path])
    finally:
        store.index.close()


def _nothing_published(tmp_path: Path) -> None:
    assert cache_files(tmp_path / "cache") == []
    with diskcache.Cache(str(tmp_path / "cache" / "tags")) as tags:
        assert len(tags) == 0


def _keypair(tmp_path: Path, name: str = "key") -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    public = tmp_path / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, public


def _public(path: Path) -> Any:
    return serialization.load_pem_public_key(path.read_bytes())


# --- a good bundle -------------------------------------------------------------------------
def test_a_good_bundle_is_published_with_its_tag_and_is_idempotent(tmp_path: Path) -> None:
    image = _image()
    data = tar_of(_entries(image))
    report = _import(tmp_path, data)
    assert report.blobs_new == 3 and report.manifests_new == 1
    assert report.tags == [f"{REGISTRY}/app/web:v1"]
    store = FilesystemStore(tmp_path / "cache")
    for blob in image.blobs():
        assert store.blob_path(Digest.parse(blob.digest)).read_bytes() == blob.data
    assert store.read_manifest(Digest.parse(image.manifest.digest)) == (
        image.manifest.data, image.manifest.media_type)
    again = _import(tmp_path, data)
    assert again.blobs_new == 0 and again.manifests_new == 0 and again.skipped == 4
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_registry_not_configured_here_imports_content_without_its_tag(
        tmp_path: Path) -> None:
    image = _image()
    report = _import(tmp_path, tar_of(_entries(image, edit=lambda b: b.references[0].update(
        registry="other.test", name="other.test/app/web:v1"))))
    assert report.blobs_new == 3 and report.tags == []
    assert "registry 'other.test' is not configured here" in report.notes[0]


def test_pin_keeps_the_whole_image(tmp_path: Path) -> None:
    image = _image()
    _import(tmp_path, tar_of(_entries(image)), pin=True)
    store = _store(tmp_path)
    try:
        pins = store.index.pins()
    finally:
        store.index.close()
    assert set(pins) == {image.manifest.digest, image.config.digest,
                         *(b.digest for b in image.layers)}
    assert all(sources == [f"{REGISTRY}/app/web:v1"] for sources in pins.values())


def test_zstd_and_parts_round_trip(tmp_path: Path) -> None:
    image = _image()
    out = Output(tmp_path / "b.tar.zst", max_part_size=4000)
    writer = layout.LayoutWriter(out, compress=True)
    for name, data in _entries(image):
        writer.add_bytes(name, data)
    writer.close()
    files = out.commit()
    assert files[-1].name == "b.tar.zst.sha256" and len(files) > 2
    assert not list(tmp_path.glob(".*partial"))
    groups = expand([files[0]])
    assert groups == [files[:-1]]
    store = _store(tmp_path)
    importer = _importer(store)
    with importer.locked():
        report = importer.run(groups[0])
    assert report.blobs_new == 3 and report.tags


def test_a_damaged_part_is_refused(tmp_path: Path) -> None:
    out = Output(tmp_path / "b.tar", max_part_size=6000)
    writer = layout.LayoutWriter(out, compress=False)
    for name, data in _entries(_image()):
        writer.add_bytes(name, data)
    writer.close()
    files = out.commit()
    second = bytearray(files[1].read_bytes())
    second[100] ^= 1
    files[1].write_bytes(bytes(second))
    store = _store(tmp_path)
    with pytest.raises(BundleError, match=r"b\.tar\.002: its sha256 is not the one"):
        _importer(store).run(files[:-1])
    assert cache_files(tmp_path / "cache") == []


# --- bad bundles: one line, nothing published ----------------------------------------------
def _flip_layer(entries: Entries) -> Entries:
    name, data = entries[-1]
    return [*entries[:-1], (name, data[:-1] + bytes([data[-1] ^ 1]))]


def _with(entries: Entries, name: str, data: bytes) -> Entries:
    return [(n, data if n == name else d) for n, d in entries]


def _link(kind: bytes) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        info.type = kind
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return add


def _absurd_index() -> bytes:
    """oci-layout, bundle.json, then an index.json header announcing 3 GiB."""
    out = b""
    for name, data in _entries(_image())[:2]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out += info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    info = tarfile.TarInfo(layout.INDEX)
    info.size = 3 << 30
    return out + info.tobuf(tarfile.PAX_FORMAT) + bytes(4096)


BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated": (lambda: tar_of(_entries(_image()))[:9000], "truncated"),
    "tampered blob": (lambda: tar_of(_flip_layer(_entries(_image()))),
                      "does not hash to its name"),
    "tampered index.json": (lambda: tar_of(_with(_entries(_image()), layout.INDEX,
                                               b'{"schemaVersion":2,"manifests":[]}')),
                            "index.json does not match the sha256 in bundle.json"),
    "dot-dot": (lambda: tar_of([*_entries(_image()), ("blobs/../../etc/evil", b"x")]),
                "has '..' in its path"),
    "absolute": (lambda: tar_of([("/etc/evil", b"x"), *_entries(_image())]),
                 "has an absolute path"),
    "symlink": (lambda: tar_of(_entries(_image()), _link(tarfile.SYMTYPE)), "is a link"),
    "hardlink": (lambda: tar_of(_entries(_image()), _link(tarfile.LNKTYPE)), "is a link"),
    "duplicate": (lambda: tar_of([*_entries(_image()), _entries(_image())[-1]]),
                  "comes twice"),
    "unknown version": (lambda: tar_of(_with(_entries(_image()), layout.BUNDLE,
                                           b'{"bundleVersion": 99}')),
                        "bundleVersion 99; this mirror reads version 1"),
    "absurd index.json": (_absurd_index, "index.json is 3221225472 bytes"),
    "blob not listed": (lambda: tar_of([*_entries(_image()), (layout.blob_name(
        "sha256:" + hashlib.sha256(b"extra").hexdigest()), b"extra")]),
                        "is not listed in bundle.json"),
    "listed blob missing": (lambda: tar_of(_entries(_image())[:-1]), "the bundle is truncated"),
    "not a tar": (lambda: b"hello" * 1000, "not a tar archive"),
    "bad tag in bundle.json": (lambda: tar_of(_entries(_image(), edit=lambda b: b.references[0]
                                                     .update(tag="../x"))), "invalid tag"),
    "reference to no image": (lambda: tar_of(_entries(_image(), edit=lambda b: b.references[0]
                                                    .update(digest="sha256:" + "0" * 64))),
                              "which index.json does not lead to"),
    "zstd cut short": (lambda: zstandard.ZstdCompressor().compress(
        tar_of(_entries(_image())))[:-50], "truncated"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_bundle_publishes_nothing(tmp_path: Path, case: str) -> None:
    make, message = BAD[case]
    with pytest.raises(BundleError, match=message):
        _import(tmp_path, make())
    _nothing_published(tmp_path)


def test_a_layout_missing_a_layer_fails_listing_it(tmp_path: Path) -> None:
    image = _image()
    entries = [e for e in _entries(image) if e[0] != layout.BUNDLE
               and e[0] != layout.blob_name(image.layers[1].digest)]
    with pytest.raises(BundleError, match=image.layers[1].digest):
        _import(tmp_path, tar_of(entries))
    _nothing_published(tmp_path)


def test_signatures(tmp_path: Path) -> None:
    key, public = _keypair(tmp_path)
    _, other = _keypair(tmp_path, "other")
    image = _image()
    signed = _entries(image, key)
    report = _import(tmp_path / "ok", tar_of(signed), verify_key=_public(public))
    assert report.key_id is not None and report.key_id.startswith("sha256:")

    cases = {
        "unsigned": (tar_of(_entries(image)), public, "not signed"),
        "other key": (tar_of(signed), other, "signed by key sha256:"),
        "tampered bundle.json": (tar_of(_with(signed, layout.BUNDLE, signed[1][1].replace(
            b'"sequence": 0', b'"sequence": 7'))), public, "does not verify with key"),
        "tampered signature": (tar_of(_with(signed, layout.SIGNATURE, sign(b"other", key))),
                               public, "does not verify with key"),
    }
    for case, (data, pub, message) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        with pytest.raises(BundleError, match=message):
            _import(folder, data, verify_key=_public(pub))
        _nothing_published(folder)


def test_cli_says_one_line_and_exits_non_zero(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(tar_of(_flip_layer(_entries(_image()))))
    config = tmp_path / "mirror.yaml"
    config.write_text(json.dumps({"version": 1, "storage": {"path": str(tmp_path / "cache")},
                                  "upstreams": [{"name": REGISTRY, "url": "http://127.0.0.1:1",
                                                 "default": True}]}))
    assert cli.main(["import", "--config", str(config), str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mirror: blob sha256:") and err.count("\n") == 1
    assert cache_files(tmp_path / "cache") == []


# --- imported tags offline -----------------------------------------------------------------
@pytest.mark.parametrize("state", ["fresh", "stale"])
async def test_an_imported_tag_is_served_while_upstream_fails(
        tmp_path: Path, make_mirror: Any, fake: FakeRegistry, clock: ManualClock,
        state: str) -> None:
    image = _image()
    path = tmp_path / "b.tar"
    path.write_bytes(tar_of(_entries(image)))
    store = _store(tmp_path)
    importer = _importer(store, tag_state=state, tag_ttl=300.0, clock=clock.time)
    with importer.locked():
        importer.run([path])
    store.index.close()
    fake.fault(kind="status", status=503)
    client = await make_mirror(clock=clock)
    accept = {"Accept": image.manifest.media_type}
    resp = await client.get(f"/v2/{image.repo}/manifests/v1", headers=accept)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.manifest.digest
    if state == "fresh":
        assert fake.count() == 0  # answered from the import, upstream not asked
    else:
        assert fake.count() > 0  # revalidation tried, failed, imported digest served
    clock.advance(3600)  # past tag_ttl: revalidation fails, the imported digest is served
    resp = await client.get(f"/v2/{image.repo}/manifests/v1", headers=accept)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.manifest.digest
    for blob in image.blobs():
        resp = await client.get(f"/v2/{image.repo}/blobs/{blob.digest}")
        assert resp.status == 200 and await resp.read() == blob.data


def test_gzip_and_xz_layouts_import(tmp_path: Path) -> None:
    data = tar_of(_entries(_image()))
    assert _import(tmp_path / "gz", gzip.compress(data), "b.tar.gz").blobs_new == 3
    assert _import(tmp_path / "xz", lzma.compress(data), "b.tar.xz").blobs_new == 3


@pytest.mark.parametrize("text", ["nginx:1", "library/nginx:1", "docker.io/nginx:1",
                                  "index.docker.io/library/nginx:1",
                                  "registry-1.docker.io/library/nginx:1"])
def test_references_are_normalised_as_docker_does(text: str) -> None:
    router = Router(config.default_settings().upstreams)
    target = router.image(text)
    assert target.upstream is not None
    assert (target.upstream.name, target.repository, target.reference) == \
        ("docker.io", "library/nginx", "1")


def test_references_by_digest_and_default_tag() -> None:
    router = Router(config.default_settings().upstreams)
    digest = "sha256:" + "a" * 64
    assert router.image(f"nginx@{digest}").reference == digest
    assert router.image(f"nginx:1@{digest}").digest == Digest.parse(digest)
    assert router.image("org/app").reference == "latest"
    with pytest.raises(OciError):
        router.image("quay.io/org/app:1")  # not a configured registry


def test_progress_is_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("import b.tar", 1000, stream=out)
    for done in range(0, 1001, 50):
        bar.set(done)
    bar.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in out.getvalue()
    assert lines[0].startswith("import b.tar [---") and "100%" in lines[-1]


async def test_an_imported_image_is_known_under_its_registry_and_repository(
        tmp_path: Path) -> None:
    """Isolation by registry: an offline node serves imported content by digest under
    the repository the bundle names it with, and only there."""
    from mirror.cache.membership import FILE_NAME, Membership  # noqa: PLC0415

    image = _image()
    _import(tmp_path, tar_of(_entries(image)))
    members = Membership(tmp_path / "cache" / FILE_NAME)
    members.open()
    try:
        for blob in (image.manifest, *image.blobs()):
            assert await members.known(REGISTRY, "app/web", blob.digest)
        assert not await members.known(REGISTRY, "app/other", image.manifest.digest)
        assert not await members.known_in("docker.io", image.manifest.digest)
    finally:
        members.close()
# --- issue 19 item 6: rollback, required signatures, junk blobs ----------------------------
def _tag_digest(tmp_path: Path, tag: str = "v1") -> str:
    with diskcache.Cache(str(tmp_path / "cache" / "tags")) as tags:
        return str(tags[tag_key(REGISTRY, "app/web", tag)]["digest"])


def test_an_older_signed_bundle_leaves_the_tag_alone_unless_rollback_is_allowed(
        tmp_path: Path) -> None:
    key, public = _keypair(tmp_path)
    old, new = _image(seed=1), _image(seed=7)  # the same tag, two images
    older = tar_of(_entries(old, key, edit=lambda b: setattr(b, "created", "2026-01-01T00:00:00Z")))
    newer = tar_of(_entries(new, key, edit=lambda b: setattr(b, "created", "2026-02-01T00:00:00Z")))
    verify = _public(public)
    _import(tmp_path, newer, verify_key=verify)
    report = _import(tmp_path, older, verify_key=verify)
    assert report.kept == [f"{REGISTRY}/app/web:v1"] and report.tags == []
    assert "left alone" in " ".join(report.notes) and "--allow-rollback" in " ".join(report.notes)
    assert _tag_digest(tmp_path) == new.manifest.digest
    again = _import(tmp_path, newer, verify_key=verify)  # the same bundle again: not older
    assert again.tags == [f"{REGISTRY}/app/web:v1"]
    rolled = _import(tmp_path, older, verify_key=verify, allow_rollback=True)
    assert rolled.tags == [f"{REGISTRY}/app/web:v1"] and rolled.kept == []
    assert _tag_digest(tmp_path) == old.manifest.digest


def test_rollback_is_judged_per_signer(tmp_path: Path) -> None:
    first, first_pub = _keypair(tmp_path, "first")
    second, second_pub = _keypair(tmp_path, "second")
    old, new = _image(seed=1), _image(seed=7)
    keys = [_public(first_pub), _public(second_pub)]
    _import(tmp_path, tar_of(_entries(new, first, edit=lambda b: setattr(
        b, "created", "2026-02-01T00:00:00Z"))), trusted_keys=keys)
    report = _import(tmp_path, tar_of(_entries(old, second, edit=lambda b: setattr(
        b, "created", "2026-01-01T00:00:00Z"))), trusted_keys=keys)
    assert report.tags == [f"{REGISTRY}/app/web:v1"]
    assert _tag_digest(tmp_path) == old.manifest.digest


def test_trusted_keys_refuse_unsigned_and_foreign_bundles(tmp_path: Path) -> None:
    _, trusted_pub = _keypair(tmp_path, "trusted")
    other, _ = _keypair(tmp_path, "other")
    also, also_pub = _keypair(tmp_path, "also")
    keys = [_public(trusted_pub), _public(also_pub)]
    image = _image()
    for case, data, message in (
            ("unsigned", tar_of(_entries(image)), "not signed"),
            ("other", tar_of(_entries(image, other)), "which is not one of the trusted keys")):
        with pytest.raises(BundleError, match=message):
            _import(tmp_path / case, data, trusted_keys=keys)
        _nothing_published(tmp_path / case)
    assert _import(tmp_path / "ok", tar_of(_entries(image, also)), trusted_keys=keys).tags


def test_the_config_requires_signatures_for_every_import(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, public = _keypair(tmp_path)
    unsigned, signed = tmp_path / "unsigned.tar", tmp_path / "signed.tar"
    unsigned.write_bytes(tar_of(_entries(_image())))
    signed.write_bytes(tar_of(_entries(_image(), key)))
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps({
        "version": 1, "storage": {"path": str(tmp_path / "cache")},
        "import": {"trusted_keys": [str(public)]},
        "upstreams": [{"name": REGISTRY, "url": "http://127.0.0.1:1", "default": True}]}))
    assert cli.main(["import", "-q", "--config", str(path), str(unsigned)]) == 1
    err = capsys.readouterr().err
    assert "not signed" in err and err.count("\n") == 1
    assert cache_files(tmp_path / "cache") == []
    assert cli.main(["import", "-q", "--config", str(path), str(signed)]) == 0
    assert "verified with key sha256:" in capsys.readouterr().out


def test_the_trusted_keys_config_is_checked(tmp_path: Path) -> None:
    (tmp_path / "not-a-key.pem").write_text("hello")
    with pytest.raises(config.ConfigError, match=r"import\.trusted_keys\[0\]: .* not a PEM"):
        config.parse({"import": {"trusted_keys": ["not-a-key.pem"]}}, env={}, base=tmp_path)


def test_blobs_no_manifest_references_are_not_published(tmp_path: Path) -> None:
    image = _image()
    junk = [(f"junk-{i}".encode()) for i in range(50)]
    junk_digests = {"sha256:" + hashlib.sha256(j).hexdigest(): j for j in junk}
    entries = _entries(image, edit=lambda b: b.blobs.update(
        {d: len(j) for d, j in junk_digests.items()}))
    entries += [(layout.blob_name(d), j) for d, j in junk_digests.items()]
    report = _import(tmp_path, tar_of(entries))
    assert report.blobs_new == 3 and report.unreferenced == 50
    assert "50 blob(s) of the bundle that no manifest references" in " ".join(report.notes)
    store = FilesystemStore(tmp_path / "cache")
    assert all(store.blob_size(Digest.parse(d)) is None for d in junk_digests)
    assert not list((tmp_path / "cache" / "tmp").glob("import-*"))


# --- zstd decoded in bounded steps (issue 19 item 5) ---------------------------------------
def _unzstd(data: bytes) -> tuple[bytes, int]:
    """Everything ``_Unzstd`` gives for ``data`` and the largest piece one read returned."""
    reader = layout._Unzstd(io.BytesIO(data))
    pieces = []
    while piece := reader.read(layout.CHUNK):
        pieces.append(piece)
    return b"".join(pieces), max((len(p) for p in pieces), default=0)


def test_zstd_frames_of_every_kind_decode_whole() -> None:
    plain = zstandard.ZstdCompressor(level=3)
    checked = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=False)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    parts = [b"a" * 300_000, bytes(range(256)) * 4000, b"", b"tail"]
    data = plain.compress(parts[0]) + skippable + checked.compress(parts[1]) + \
        plain.compress(parts[2]) + skippable + checked.compress(parts[3])
    assert _unzstd(data)[0] == b"".join(parts)


def test_a_zstd_bomb_is_decoded_a_bounded_piece_at_a_time() -> None:
    size = 64 << 20
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(size))
    assert len(bomb) < 4096
    reader = layout._Unzstd(io.BytesIO(bomb))
    total = 0
    while piece := reader.read(1 << 30):  # asking for everything still gives a bounded piece
        assert len(piece) <= 8 * 128 * 1024
        total += len(piece)
    assert total == size


def test_a_zstd_stream_cut_anywhere_inside_a_frame_is_truncated() -> None:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    first = compressor.compress(b"x" * 200_000 + bytes(range(256)) * 100)
    data = first + compressor.compress(b"y" * 1000)
    for cut in range(1, len(data)):
        if cut == len(first):
            continue  # a frame boundary: whole frames, the tar reader sees what is missing
        with pytest.raises(BundleError, match=r"truncated|corrupt"):
            _unzstd(data[:cut])


def test_garbage_after_a_zstd_frame_is_refused() -> None:
    data = zstandard.ZstdCompressor().compress(b"x" * 1000) + b"not zstd at all"
    with pytest.raises(BundleError, match="corrupt"):
        _unzstd(data)


def test_export_of_cached_content_needs_no_upstream_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    unset = "MIRROR_TEST_NEVER_SET_7f3a"
    bundle = tmp_path / "in.tar"
    bundle.write_bytes(tar_of(_entries(_image())))
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps({
        "version": 1, "storage": {"path": str(tmp_path / "cache")},
        "upstreams": [{"name": REGISTRY, "url": "http://127.0.0.1:1", "default": True,
                       "username": "robot", "password_env": unset, "retries": 0}]}))
    assert cli.main(["import", "-q", "--config", str(path), str(bundle)]) == 0
    out = tmp_path / "out.tar"
    # export sets up the process's logging (on this test's stderr): not for the next tests
    monkeypatch.setattr(cli.log, "setup", lambda _settings: None)
    assert cli.main(["export", "-q", "--config", str(path), f"{REGISTRY}/app/web:v1",
                     "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file() and out.stat().st_size > 8000
