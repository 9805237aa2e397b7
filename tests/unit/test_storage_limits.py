"""The bounded cache in process: limits, pins, a full disk, corruption, the cache commands.

After every scenario the clients got complete, correct bytes (or a clean
error), and the disk holds only what it should.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from mirror.cache import eviction
from mirror.cli import main
from mirror.storage.filesystem import FilesystemStore
from tests.support.fake import FakeRegistry, sha256
from tests.unit.conftest import MirrorFactory

Client = TestClient[Any, Any]
KiB = 1024
MiB = 1024 * KiB


def disk_bytes(root: Path) -> int:
    """Bytes of content and downloads on disk (what the limit is about)."""
    return sum(p.stat().st_size for sub in ("blobs", "manifests", "tmp")
               for p in (root / sub).rglob("*") if p.is_file())


def blob_files(root: Path) -> list[Path]:
    return [p for sub in ("blobs", "tmp") for p in (root / sub).rglob("*") if p.is_file()]


async def pull(mirror: Client, digest: str) -> bytes:
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert response.status == 200, await response.text()
    return await response.read()


async def metric(mirror: Client, name: str) -> float:
    text = await (await mirror.get("/metrics")).text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def test_pulling_three_times_the_limit_stays_inside_it_and_hits_renew(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    limit = 1 * MiB
    mirror = await make_mirror(storage={"path": str(root), "max_size": limit,
                                        "high_watermark": 0.9, "low_watermark": 0.6})
    blobs = {fake.add_blob(os.urandom(100 * KiB)): i for i in range(30)}
    hot = next(iter(blobs))
    peak = 0
    for digest in blobs:
        assert sha256(await pull(mirror, digest)) == digest
        assert sha256(await pull(mirror, hot)) == hot  # a hit renews recency
        peak = max(peak, disk_bytes(root))
    assert peak <= limit
    assert await metric(mirror, "mirror_cache_evictions_total") > 0
    assert fake.count("GET", f"/blobs/{hot}") == 1  # the hot blob was never evicted
    assert await metric(mirror, "mirror_cache_bytes") <= limit


async def test_concurrent_pulls_keep_disk_within_limit_plus_downloads(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    limit = 2 * MiB
    mirror = await make_mirror(storage={"path": str(root), "max_size": limit})
    digests = [fake.add_blob(os.urandom(200 * KiB)) for _ in range(30)]
    fake.fault(kind="drip", path="/blobs/", chunk=64 * KiB, delay=0.005)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, disk_bytes(root))
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    for start in range(0, len(digests), 5):
        batch = digests[start:start + 5]
        bodies = await asyncio.gather(*(pull(mirror, d) for d in batch))
        assert [sha256(b) for b in bodies] == batch
    sampler.cancel()
    assert peak <= limit + 5 * 200 * KiB  # the limit, plus the blobs being downloaded
    assert disk_bytes(root) <= limit


async def test_a_blob_being_read_is_never_evicted(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror(storage={"path": str(root), "max_size": 32 * MiB,
                                        "high_watermark": 0.9, "low_watermark": 0.5})
    data = os.urandom(24 * MiB)  # more than socket buffers hold: the send stays open
    digest = fake.add_blob(data)
    await pull(mirror, digest)
    path = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    # A client that reads the headers and then stops reading, with a small receive
    # buffer: the mirror's send of 24 MiB stays open, its file too.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (mirror.host, mirror.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * KiB)
    writer.write(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
    for _ in range(4):  # 16 MiB more: the blob being read is the least recently used
        await pull(mirror, fake.add_blob(os.urandom(4 * MiB)))
    assert path.exists()
    assert await metric(mirror, "mirror_cache_evictions_total") > 0
    assert sha256(await reader.readexactly(len(data))) == digest
    writer.close()
    await asyncio.sleep(0.05)  # the mirror finishes the response and closes the file
    for _ in range(2):  # once it is read, it may go
        await pull(mirror, fake.add_blob(os.urandom(4 * MiB)))
    assert not path.exists()


async def test_blob_larger_than_max_size_is_streamed_and_not_kept(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror(storage={"path": str(root), "max_size": "100KiB"})
    data = os.urandom(300 * KiB)
    digest = fake.add_blob(data)
    not_kept = await metric(mirror, "mirror_blobs_not_kept_total")  # counters are per process
    with structlog.testing.capture_logs() as logs:
        bodies = await asyncio.gather(*(pull(mirror, digest) for _ in range(3)))
    assert all(body == data for body in bodies)
    assert fake.count("GET", "/blobs/") == 1
    assert any(e["event"] == "blob_not_kept" and e["reason"] == "too_large" for e in logs)
    assert await metric(mirror, "mirror_blobs_not_kept_total") - not_kept == 1
    for _ in range(100):  # the temp file goes once its readers are done
        if not blob_files(root):
            break
        await asyncio.sleep(0.05)
    assert blob_files(root) == []


async def test_corrupt_small_blob_on_disk_is_fetched_again(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data = os.urandom(10 * KiB)
    digest = fake.add_blob(data)
    first = await make_mirror()
    assert await pull(first, digest) == data
    await first.close()
    path = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    path.write_bytes(b"x" * len(data))  # bit rot, same size
    second = await make_mirror()
    assert await pull(second, digest) == data
    assert fake.count("GET", "/blobs/") == 2
    assert await metric(second, "mirror_cache_corrupt_total") >= 1
    assert path.read_bytes() == data


async def test_adopted_large_blob_is_hashed_before_it_is_served(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    """A file with no index entry (a crash after the rename) is verified on first read."""
    root = tmp_path / "cache"
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    first = await make_mirror()
    assert await pull(first, digest) == data
    await first.close()
    path = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    (root / "index.db").unlink()
    for extra in ("index.db-wal", "index.db-shm"):
        (root / extra).unlink(missing_ok=True)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte off
    second = await make_mirror()
    assert await pull(second, digest) == data
    assert fake.count("GET", "/blobs/") == 2


# --- a full disk -------------------------------------------------------------------------

def _mount(kind: str, mount: Path, size_mib: int) -> None:
    """Mount a small file system at ``mount``: a tmpfs, or ext4 on a loop device."""
    mount.mkdir()
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)]
    else:
        image = mount.with_suffix(".img")
        with image.open("wb") as handle:
            handle.truncate(size_mib * MiB)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                              check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 image: {made.stderr.decode().strip()}")
        command = ["mount", "-o", "loop", str(image), str(mount)]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {kind} here (needs root): {result.stderr.decode().strip()}")


def _leave_free(mount: Path, free: int) -> None:
    """Fill the file system at ``mount`` until about ``free`` bytes are left."""
    stat = os.statvfs(mount)
    with (mount / "filler").open("wb") as handle:
        remaining = stat.f_bavail * stat.f_frsize - free
        while remaining > 0:
            remaining -= handle.write(b"\0" * min(remaining, MiB))
        handle.flush()
        os.fsync(handle.fileno())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: writes past it fail with ENOSPC (needs root; skipped otherwise)."""
    mount = tmp_path / "disk"
    _mount("tmpfs", mount, 16)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=["tmpfs", "ext4-loop", "failing-writes"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], Path]]:
    """A storage folder on which blob writes fail once ``free`` more bytes are written.

    ``tmpfs`` and ``ext4-loop`` are real small file systems made by the test
    (root only); ``failing-writes`` patches ``os.pwrite`` so writes under the
    folder fail, and runs anywhere.
    """
    mount = tmp_path / "disk"

    def make(free: int) -> Path:
        if request.param != "failing-writes":
            _mount(request.param, mount, 40)
            _leave_free(mount, free)
            return mount / "cache"
        folder = tmp_path / "failing"
        budget = [free]
        real = os.pwrite

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if str(folder) in os.readlink(f"/proc/self/fd/{fd}"):
                if budget[0] <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                data = memoryview(data)[:budget[0]]
                budget[0] -= len(data)
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        return folder / "cache"

    yield make
    if os.path.ismount(mount):
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_mid_download_relays_complete_bytes_and_keeps_nothing(
        make_mirror: MirrorFactory, fake: FakeRegistry, full_disk: Callable[[int], Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = full_disk(3 * MiB)
    # a small relay window exercises the window's bound; no cap, so the disk fills
    mirror = await make_mirror(storage={"path": str(root), "relay_window": "512KiB",
                                        "max_size": "none"})
    data = os.urandom(6 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=256 * KiB, delay=0.002)
    with structlog.testing.capture_logs() as logs:
        bodies = await asyncio.gather(*(pull(mirror, digest) for _ in range(4)))
    assert all(body == data for body in bodies)
    assert fake.count("GET", "/blobs/") == 1
    assert any(e["event"] == "storage_full" and e["action"] == "relay_from_memory_not_kept"
               for e in logs)
    assert await metric(mirror, "mirror_storage_full_total") >= 1
    assert not list((root / "blobs").rglob("*.*")) and not [
        p for p in (root / "blobs").rglob("*") if p.is_file()]
    # The node keeps serving: small content still fits, and is kept.
    small = os.urandom(10 * KiB)
    small_digest = fake.add_blob(small)
    fake.faults.clear()
    assert await pull(mirror, small_digest) == small
    assert await pull(mirror, digest) == data


async def test_no_room_for_even_a_temp_file_still_serves_complete_bytes(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_inode(_store: FilesystemStore) -> tuple[int, Path]:
        raise OSError(errno.ENOSPC, "No space left on device")

    mirror = await make_mirror()
    monkeypatch.setattr(FilesystemStore, "new_temp", no_inode)
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=256 * KiB, delay=0.002)
    bodies = await asyncio.gather(*(pull(mirror, digest) for _ in range(3)))
    assert all(body == data for body in bodies)
    assert fake.count("GET", "/blobs/") == 1
    assert blob_files(tmp_path / "cache") == []


async def test_disk_full_evicts_old_content_and_keeps_the_new_blob(
        make_mirror: MirrorFactory, fake: FakeRegistry, small_disk: Path) -> None:
    root = small_disk / "cache"
    mirror = await make_mirror(storage={"path": str(root), "max_size": "none"})  # disk-bound
    old = [fake.add_blob(os.urandom(3 * MiB)) for _ in range(4)]
    for digest in old:
        await pull(mirror, digest)
    data = os.urandom(5 * MiB)  # 12 MiB + 5 MiB > 16 MiB: the write fails, eviction frees
    digest = fake.add_blob(data)
    with structlog.testing.capture_logs() as logs:
        assert await pull(mirror, digest) == data
    assert any(e["event"] == "storage_full" and e["action"] == "evicted_and_retried"
               for e in logs)
    assert (root / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    assert await metric(mirror, "mirror_cache_evictions_total") >= 1


# --- the cache commands --------------------------------------------------------------------

def cli(root: Path, *args: str) -> int:
    """``mirror cache ARGS`` with a config naming the fake upstream, as an operator runs it."""
    config = root.parent / "mirror.yaml"
    config.write_text("version: 1\nstorage: {max_size: 1MiB, high_watermark: 0.9, "
                      "low_watermark: 0.5}\n"
                      "upstreams: [{name: fake.test, url: 'http://127.0.0.1:9', default: true}]\n")
    return main(["cache", *args, "--config", str(config), "--storage", str(root)])


async def test_cache_commands_while_serving(make_mirror: MirrorFactory, fake: FakeRegistry,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eviction, "REFRESH_INTERVAL", 0.05)
    monkeypatch.setattr(eviction, "FLUSH_INTERVAL", 0.05)
    root = tmp_path / "cache"
    mirror = await make_mirror(storage={"path": str(root), "max_size": 1 * MiB,
                                        "high_watermark": 0.9, "low_watermark": 0.5})
    amd, amd_body = fake.add_image("app", None, [os.urandom(100 * KiB)], arch="amd64")
    arm, arm_body = fake.add_image("app", None, [os.urandom(100 * KiB)], arch="arm64")
    fake.add_index("app", "v1", [(amd, amd_body, "amd64"), (arm, arm_body, "arm64")])
    await _pull_image(mirror, "v1")
    capsys.readouterr()

    assert await asyncio.to_thread(cli, root, "pin", "fake.test/app:v1") == 0
    assert "pinned fake.test/app:v1: 7 item(s)" in capsys.readouterr().out
    assert await asyncio.to_thread(cli, root, "pin", "fake.test/app:nope") == 1
    assert capsys.readouterr().err.strip() == \
        "mirror: fake.test/app:nope is not cached (no pull of it went through this mirror)"

    for _ in range(12):  # 1.2 MiB of other content: eviction runs, the pinned image stays
        await pull(mirror, fake.add_blob(os.urandom(100 * KiB)))
    assert await metric(mirror, "mirror_cache_evictions_total") > 0
    assert await metric(mirror, "mirror_cache_pinned_bytes") >= 0
    before = fake.count("GET", "/blobs/")
    await _pull_image(mirror, "v1")
    assert fake.count("GET", "/blobs/") == before  # nothing pinned was evicted

    assert await asyncio.to_thread(cli, root, "ls") == 0
    listing = capsys.readouterr().out
    assert "fake.test/app:v1" in listing and "pinned" in listing
    assert await asyncio.to_thread(cli, root, "du") == 0
    assert "limit:       1.0 MiB" in capsys.readouterr().out

    assert await asyncio.to_thread(cli, root, "unpin", "fake.test/app:v1") == 0
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.to_thread(cli, root, "evict", "fake.test/app:v1") == 0
        assert "evicted fake.test/app:v1" in capsys.readouterr().out
        for _ in range(200):  # the server re-reads the index and drops its memory copies
            if any(e["event"] == "cache_changed_elsewhere" for e in logs):
                break
            await asyncio.sleep(0.025)
    gets = fake.count("GET", "/blobs/")
    await _pull_image(mirror, "v1")
    assert fake.count("GET", "/blobs/") > gets


async def _pull_image(mirror: Client, tag: str) -> None:
    accept = {"Accept": "application/vnd.oci.image.index.v1+json, "
                        "application/vnd.oci.image.manifest.v1+json"}
    index = await (await mirror.get(f"/v2/app/manifests/{tag}", headers=accept)).json()
    for child in index["manifests"]:
        manifest = await (await mirror.get(f"/v2/app/manifests/{child['digest']}",
                                           headers=accept)).json()
        for blob in [manifest["config"], *manifest["layers"]]:
            await pull(mirror, blob["digest"])


async def test_fsck_removes_corrupt_content_and_reports(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror()
    good, bad = os.urandom(2 * MiB), os.urandom(2 * MiB)
    good_digest, bad_digest = fake.add_blob(good), fake.add_blob(bad)
    await pull(mirror, good_digest)
    await pull(mirror, bad_digest)
    path = root / "blobs" / "sha256" / bad_digest[7:9] / bad_digest[7:]
    with path.open("r+b") as handle:
        handle.seek(1 * MiB)
        handle.write(b"\xff")
    assert await asyncio.to_thread(cli, root, "fsck") == 1
    out = capsys.readouterr().out
    assert f"removed blob {bad_digest}" in out and "removed 1 corrupt" in out
    assert not path.exists()
    assert await pull(mirror, bad_digest) == bad  # fetched again, not served wrong
    assert await asyncio.to_thread(cli, root, "fsck") == 0


async def test_cache_command_on_a_missing_cache_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(tmp_path / "nowhere", "du") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no cache at" in err
