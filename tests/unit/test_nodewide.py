"""The node's budget and counts with several processes, without HTTP.

Two evictors on one storage folder stand for two worker processes (two index
connections, two process ids): each sees the other's reservations. Pull counts
count pulls, not requests, and a worker reads the others' counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror import config
from mirror.cache.eviction import Evictor
from mirror.cache.manifests import Manifest
from mirror.clock import ManualClock
from mirror.oci import DOCKER_MANIFEST, Digest
from mirror.storage.filesystem import FilesystemStore
from mirror.sync.popularity import Popularity
from tests.support.stored import put_blob


@pytest.fixture
def stores(tmp_path: Path) -> tuple[FilesystemStore, FilesystemStore]:
    first = FilesystemStore(tmp_path / "cache")
    first.startup()
    second = FilesystemStore(tmp_path / "cache")
    second.open_shared()
    return first, second


def _evictor(store: FilesystemStore, pid: int | None = None) -> Evictor:
    settings = config.StorageSettings(path=store.root, max_size=1000,
                                      high_watermark=0.9, low_watermark=0.5)
    evictor = Evictor(store, settings, pid=pid)
    evictor.wire(lambda _d: False, lambda _e: None)
    return evictor


async def test_a_reservation_in_one_process_counts_in_another(
        stores: tuple[FilesystemStore, FilesystemStore]) -> None:
    first, second = stores
    for i in range(8):
        put_blob(first, bytes([i]) * 100)  # 800 bytes stored
    mine, other = _evictor(first), _evictor(second, pid=os.getppid())
    await other.reserve(50)  # 850: under the high watermark (900)
    assert first.index.total_bytes == 800
    await mine.reserve(80)  # 930 for the node (this process alone: 880): evict to 500
    assert first.index.total_bytes == 300
    # The other process's download published: its reservation became an entry.
    assert await other.admit(50, held=50)
    other.release(50)
    await other.stop()
    await mine.stop()


@pytest.fixture
def dead() -> int:
    """The id of a process that has exited."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(gone.stdout)


async def test_reservations_of_a_dead_process_do_not_count(
        stores: tuple[FilesystemStore, FilesystemStore], dead: int) -> None:
    first, second = stores
    for i in range(5):
        put_blob(first, bytes([i]) * 100)
    second.index.budget(dead, 10_000)  # a worker killed -9 in the middle of a download
    mine = _evictor(first)
    assert await mine.check() == 0  # 500 stored, the dead reservation ignored
    assert first.index.budget(os.getpid(), 0) == (500, 0)
    await mine.stop()


async def test_release_reaches_the_other_processes(
        stores: tuple[FilesystemStore, FilesystemStore]) -> None:
    first, second = stores
    mine = _evictor(first)
    await mine.reserve(400)
    assert second.index.budget(os.getppid(), 0) == (0, 400)
    mine.release(400)
    await mine.stop()  # waits for the write
    assert second.index.budget(os.getppid(), 0) == (0, 0)


async def test_no_room_under_the_cap_is_refused_and_given_back(
        stores: tuple[FilesystemStore, FilesystemStore]) -> None:
    first, second = stores
    digests = [str(put_blob(first, bytes([i]) * 100)) for i in range(8)]
    first.index.pin(digests, "pinned/image:v1")  # 800 pinned bytes under a 1000 cap
    mine, other = _evictor(first), _evictor(second, pid=os.getppid())
    assert await other.reserve(150)  # 950: room
    assert not await mine.reserve(100)  # 1050: nothing can be evicted, so no room
    assert second.index.budget(os.getppid(), 150) == (800, 150)  # given back at once
    await mine.stop()
    await other.stop()


def _manifest(tag: str) -> Manifest:
    data = json.dumps({"schemaVersion": 2, "tag": tag}).encode()
    return Manifest(Digest.of(data), data, DOCKER_MANIFEST)


def test_heads_and_repeats_are_not_pulls() -> None:
    clock = ManualClock()
    popularity = Popularity(None, window=3600, per_client=3, clock=clock)
    x, y, z, w = (_manifest(t) for t in "xyzw")
    for _ in range(300):
        popularity.tag_pulled("r", "app", "x", x, "10.0.0.1", head=True)
        popularity.tag_pulled("r", "app", "z", z, "10.0.0.1")
    for client in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        popularity.tag_pulled("r", "app", "y", y, client)
    popularity.tag_pulled("r", "app", "w", w, "10.0.0.5", head=True)  # containerd: HEAD,
    popularity.manifest_pulled(str(w.digest), "10.0.0.5")  # then GET by digest: a pull
    popularity.manifest_pulled(str(w.digest), "10.0.0.5")
    assert [(p.tag, round(p.score)) for p in popularity.top_tags(5)] == [
        ("y", 3), ("w", 1), ("z", 1)]
    clock.advance(3600)  # a new window: the same client counts again
    popularity.tag_pulled("r", "app", "z", z, "10.0.0.1")
    scores = {p.tag: round(p.score, 2) for p in popularity.top_tags(5)}
    assert scores["z"] == round(1 / 2.718281828 + 1, 2)


def test_one_clients_share_is_capped() -> None:
    popularity = Popularity(None, per_client=3)
    for n in range(10):
        popularity.record(f"r/app:t{n}", "10.0.0.9")
    popularity.record("r/app:t0", "10.0.0.8")
    assert len(popularity.top_tags(20)) == 3
    assert popularity.top_tags(1)[0].tag == "t0"


def test_a_worker_reads_the_other_workers_counts(tmp_path: Path) -> None:
    folder = tmp_path / "sync"
    zero = Popularity(folder / "popularity-w0.json")
    one = Popularity(folder / "popularity-w1.json")
    zero.record("r/app:a", "10.0.0.1")
    one.record("r/app:a", "10.0.0.2")
    one.record("r/app:b", "10.0.0.2")
    one.save(one.snapshot())
    zero.save(zero.snapshot())
    zero.read_others()
    one.read_others()
    for popularity in (zero, one):
        assert [(p.tag, round(p.score)) for p in popularity.top_tags(5)] == [("a", 2), ("b", 1)]
        assert popularity.repositories("r") == {"app"}
        assert popularity.as_json()["processes"] == 2
    reader = Popularity(folder / "popularity.json")  # `mirror sync status` without a server
    reader.read_others()
    assert round(reader.top_tags(1)[0].score) == 2
