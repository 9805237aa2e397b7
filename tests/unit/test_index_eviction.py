"""The cache index (SQLite), start-up reconciliation and the eviction policy, without HTTP."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mirror import config
from mirror.cache.eviction import Evictor
from mirror.errors import ConfigError
from mirror.fetch.relay import RelayWindow
from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Index
from tests.support.stored import put_blob


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "cache")
    store.startup()
    return store


def test_index_tracks_totals_pins_and_recency(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    index.open()
    index.add("blob", "sha256:a", 100, last_use=1.0)
    index.add("blob", "sha256:b", 50, last_use=2.0)
    index.add("manifest", "sha256:c", 7, last_use=3.0)
    index.add("blob", "sha256:a", 100, last_use=1.0)  # replacing does not double count
    assert (index.total_bytes, index.total_entries) == (157, 3)
    index.touch([("blob", "sha256:a", 10.0)])
    assert [e.digest for e in index.least_recent(10)] == ["sha256:b", "sha256:c", "sha256:a"]
    index.pin(["sha256:b"], "reg/app:v1")
    assert [e.digest for e in index.least_recent(10)] == ["sha256:c", "sha256:a"]
    assert index.pinned_bytes() == 50
    assert index.remove([("blob", "sha256:a"), ("blob", "sha256:zz")]) == 100
    assert (index.total_bytes, index.total_entries) == (57, 2)
    index.close()
    again = Index(tmp_path / "index.db")  # pins and entries survive a restart
    again.open()
    assert again.pins() == {"sha256:b": ["reg/app:v1"]}
    assert again.total_bytes == 57
    assert again.unpin("sha256:b") == 1  # a digest pinned through an image
    assert again.pins() == {}


def test_startup_reconciles_index_with_disk(store: FilesystemStore) -> None:
    kept = put_blob(store, b"kept")
    lost = put_blob(store, b"lost")
    truncated = put_blob(store, b"truncated blob")
    store.blob_path(lost).unlink()  # entry without a file
    store.blob_path(truncated).write_bytes(b"trunc")  # size differs from its entry
    orphan = Digest("sha256", hashlib.sha256(b"orphan").hexdigest())
    store.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    store.blob_path(orphan).write_bytes(b"orphan")  # file without an entry (crash)
    (store.tmp / "fill-partial").write_bytes(b"partial")
    store.index.close()

    again = FilesystemStore(store.root)
    report = again.startup()
    assert (report.temp_removed, report.adopted, report.dropped) == (1, 1, 1)
    assert {e.digest for e in again.index.all()} == {str(kept), str(orphan), str(truncated)}
    assert again.blob_info(orphan) == (6, False)  # adopted: hashed before it is served
    assert again.blob_info(truncated) == (5, False)  # size differs: hashed before served
    assert again.blob_info(kept) == (4, True)
    assert again.verify("blob", truncated) is False and not store.blob_path(truncated).exists()
    assert list(again.tmp.iterdir()) == []


def test_verify_removes_corrupt_content(store: FilesystemStore) -> None:
    digest = put_blob(store, b"good bytes")
    assert store.verify("blob", digest) is True
    store.blob_path(digest).write_bytes(b"evil bytes")
    assert store.verify("blob", digest) is False
    assert not store.blob_path(digest).exists()
    assert store.index.get("blob", str(digest)) is None


def _evictor(store: FilesystemStore, max_size: int, busy: set[str] | None = None) -> Evictor:
    settings = config.StorageSettings(path=store.root, max_size=max_size,
                                      high_watermark=0.9, low_watermark=0.5)
    evictor = Evictor(store, settings)
    evictor.wire(lambda d: d in (busy or set()), lambda _e: None)
    return evictor


async def test_eviction_is_lru_skips_pinned_and_busy_and_stops_at_low(
        store: FilesystemStore) -> None:
    digests = [put_blob(store, bytes([i]) * 100) for i in range(10)]  # 1000 bytes
    for age, digest in enumerate(digests):
        store.index.touch([("blob", str(digest), 1000.0 + age)])
    store.index.pin([str(digests[0])], str(digests[0]))
    evictor = _evictor(store, max_size=1000, busy={str(digests[1])})
    evictor.touch("blob", str(digests[2]))  # a hit not yet flushed: now the most recent
    freed = await evictor.check()
    assert freed == 500
    left = {e.digest for e in store.index.all()}
    assert left == {str(d) for d in (digests[0], digests[1], digests[2], digests[8],
                                     digests[9])}
    assert store.index.total_bytes == 500
    assert await evictor.check() == 0  # under the high watermark: nothing to do


async def test_reservations_make_room_before_a_download_publishes(
        store: FilesystemStore) -> None:
    for i in range(8):
        put_blob(store, bytes([i]) * 100)
    evictor = _evictor(store, max_size=1000)
    assert await evictor.check() == 0  # 800 < 900
    await evictor.reserve(300)  # a 300 byte download starts: 1100 > 900, evict to 500
    assert store.index.total_bytes == 200
    evictor.release(300)
    assert store.index.total_bytes == 200
    assert evictor.fits(1000) and not evictor.fits(1001)
    assert await evictor.admit(800)
    assert not await evictor.admit(1001)


async def test_admit_refuses_when_pinned_content_fills_the_limit(
        store: FilesystemStore) -> None:
    digests = [put_blob(store, bytes([i]) * 400) for i in range(2)]
    store.index.pin([str(d) for d in digests], "all")
    evictor = _evictor(store, max_size=1000)
    assert not await evictor.admit(300)
    assert store.index.total_bytes == 800


def test_storage_config_is_validated_with_key_paths(tmp_path: Path) -> None:
    def parse(storage: dict[str, object]) -> config.StorageSettings:
        return config.parse({"storage": {"path": str(tmp_path), **storage}}, env={}).storage

    parsed = parse({"max_size": "50GiB"})
    assert parsed.max_size == 50 * 2**30 and parsed.high_watermark == 0.95
    assert parsed.high_bytes == int(50 * 2**30 * 0.95)
    assert parse({}).max_size is None and parse({}).max_size_auto  # resolved at start
    assert parse({"max_size": "none"}).max_size is None
    assert not parse({"max_size": "none"}).max_size_auto
    for bad, key in (({"max_size": "lots"}, "storage.max_size"),
                     ({"max_size": 0}, "storage.max_size"),
                     ({"high_watermark": 1.5}, "storage.high_watermark"),
                     ({"low_watermark": "x"}, "storage.low_watermark"),
                     ({"low_watermark": 0.9, "high_watermark": 0.8}, "storage.low_watermark"),
                     ({"max_bytes": 1}, "storage.max_bytes")):
        with pytest.raises(ConfigError) as error:
            parse(bad)
        assert error.value.key == key, bad


def test_relay_window_keeps_what_the_slowest_reader_needs() -> None:
    window = RelayWindow(start=100, max_bytes=6)
    for chunk in (b"abcd", b"efgh", b"ijkl"):
        window.append(chunk)
    assert window.read(104, 6) == b"efgh"  # never across a chunk: the reader asks again
    window.trim([106, 112], written=112)  # full (12 > 6): drop what both passed
    assert window.read(100, 4) is None and window.dropped
    assert window.read(106, 4) == b"gh"
    window.trim([], written=112)  # nobody reads: everything may go
    assert window.bytes == 0 and not window.full
