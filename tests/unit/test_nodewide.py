"""The node's budget with several processes, without HTTP.

Two evictors on one storage folder stand for two worker processes (two index
connections, two process ids): each sees the other's reservations.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror import config
from mirror.cache.eviction import Evictor
from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore


def _put(store: FilesystemStore, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fd, temp = store.new_temp()
    os.write(fd, data)
    os.close(fd)
    store.publish_blob(temp, digest)
    return digest


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
        _put(first, bytes([i]) * 100)  # 800 bytes stored
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
        _put(first, bytes([i]) * 100)
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
