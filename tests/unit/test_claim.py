"""Claims across worker processes, with two fetchers on one storage folder (flock holds
between two open files even in one process, as between two processes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mirror.errors import FillError
from mirror.fetch import Fetcher
from mirror.fetch.claim import Claim, ClaimCoalescer, ClaimRefused, Claims
from mirror.fetch.fill import Fill
from mirror.oci import Digest
from mirror.storage.base import BodyResponse
from mirror.storage.filesystem import FilesystemStore

CHUNK = 64 * 1024


class _Body:
    """An upstream answer from ``offset``, a chunk per ``step`` seconds."""

    def __init__(self, data: bytes, offset: int, step: float) -> None:
        self.status = 200 if offset == 0 else 206
        self.content_length = len(data) - offset
        self.headers = {"Content-Range": f"bytes {offset}-{len(data) - 1}/{len(data)}"}
        self._rest = data[offset:]
        self._step = step
        self.content = self

    async def read(self, n: int = -1) -> bytes:
        await asyncio.sleep(self._step)
        piece, self._rest = self._rest[:CHUNK], self._rest[CHUNK:]
        return piece

    def read_nowait(self, n: int = -1) -> bytes:
        return b""


class _Upstream:
    def __init__(self, data: bytes, step: float = 0.001) -> None:
        self.data, self.step = data, step
        self.offsets: list[int] = []

    @asynccontextmanager
    async def __call__(self, offset: int) -> AsyncIterator[BodyResponse]:
        self.offsets.append(offset)
        yield _Body(self.data, offset, self.step)  # type: ignore[misc]


def _worker(root: Path, index: int) -> Fetcher:
    store = FilesystemStore(root, temp_folder=f"w{index}")
    store.open()
    return Fetcher(store, CHUNK, coalescer=ClaimCoalescer(Claims(root / "tmp" / "claims")))


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def _read(fill: Fill, size: int) -> bytes:
    """What a client reads: after the headers (the size), as the handlers do; a reader
    that opened the fill before its claimer created the .part file would not find it."""
    assert await fill.wait_size() == size
    return b"".join([piece async for piece in fill.read(0, size, CHUNK)])


def _blob(size: int = 40 * CHUNK) -> tuple[bytes, Digest]:
    """Random bytes and their digest."""
    data = os.urandom(size)
    return data, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def _claimed_empty(claims: Claims, digest: Digest, size: int) -> Claim:
    """A claim of ``digest`` by another worker, its size announced, its .part still empty
    (what a claimer that relays from memory leaves)."""
    claim = claims.try_claim(digest)
    assert claim is not None
    claim.announce(size)
    claim.part.write_bytes(b"")
    return claim


async def test_a_second_worker_follows_the_first_ones_download(tmp_path: Path) -> None:
    data, digest = _blob()
    upstream = _Upstream(data)
    first, second = _worker(tmp_path, 0), _worker(tmp_path, 1)
    fill_a, joined_a = await first.start(digest, upstream, "r")
    fill_b, joined_b = await second.start(digest, upstream, "r")
    assert (joined_a, joined_b) == (False, True)
    got_a, got_b = await asyncio.gather(_read(fill_a, len(data)), _read(fill_b, len(data)))
    assert got_a == got_b == data
    assert upstream.offsets == [0]  # one download for both
    assert first.store.blob_path(digest).read_bytes() == data
    await asyncio.gather(first.close(), second.close())


async def test_a_follower_takes_over_what_a_dead_claimer_left(tmp_path: Path) -> None:
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    dead = claims.try_claim(digest)  # a worker that claimed, wrote some, and was killed
    assert dead is not None
    dead.announce(len(data))
    dead.part.write_bytes(data[:10 * CHUNK])
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    reading = asyncio.create_task(_read(fill, len(data)))
    await asyncio.sleep(0.1)
    assert upstream.offsets == []  # it follows while the claim is held
    os.close(dead.fd)  # kill -9: the lock goes, the files stay
    assert await reading == data
    assert upstream.offsets == [10 * CHUNK]  # the rest only, with Range
    assert follower.store.blob_path(digest).read_bytes() == data
    await follower.close()


async def test_a_follower_never_gets_the_last_byte_of_bytes_that_do_not_verify(
        tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(b"something else").hexdigest())
    upstream = _Upstream(data)
    first, second = _worker(tmp_path, 0), _worker(tmp_path, 1)
    fill_a, _ = await first.start(digest, upstream, "r", expected_size=len(data))
    fill_b, joined = await second.start(digest, upstream, "r", expected_size=len(data))
    assert joined
    got = bytearray()
    with pytest.raises(FillError):
        async for piece in fill_b.read(0, len(data), CHUNK):
            got += piece
    assert len(got) < len(data)
    assert not first.store.blob_path(digest).exists()
    with pytest.raises(FillError):
        await fill_a.wait_done()
    await asyncio.gather(first.close(), second.close())


@pytest.mark.parametrize("planted", [".claim", ".part", ".size"])
async def test_a_symlink_planted_in_the_claims_folder_is_refused_not_followed(
        tmp_path: Path, planted: str) -> None:
    data = os.urandom(4 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    claims = Claims(tmp_path / "tmp" / "claims")
    claims.folder.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (claims.folder / f"sha256-{digest.hex}{planted}").symlink_to(victim)
    worker = _worker(tmp_path, 0)
    with pytest.raises((ClaimRefused, FillError)) as caught:
        if planted == ".size":
            claim = claims.try_claim(digest)
            assert claim is not None
            claim.announced()
        else:
            fill, _ = await worker.start(digest, _Upstream(data), "r")
            await fill.wait_done()
    error: BaseException | None = caught.value
    while error is not None and not isinstance(error, ClaimRefused):
        error = error.__cause__
    assert error is not None and "symbolic link" in str(error)
    assert victim.read_bytes() == b"precious"  # neither locked, truncated nor written
    assert not worker.store.blob_path(digest).exists()
    await worker.close()


async def test_a_follower_that_joins_before_the_claimers_file_exists_waits_for_it(
        tmp_path: Path) -> None:
    # What made the first test flaky ("download vanished"): a reader opened the .part
    # file before the claimer's task had created it.
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    slow = claims.try_claim(digest)  # claimed; its task has not created the file yet
    assert slow is not None and not slow.part.exists()
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    reading = asyncio.create_task(_read(fill, len(data)))
    await asyncio.sleep(0.1)
    assert not reading.done()  # waiting for the file, not failed
    slow.announce(len(data))
    slow.part.write_bytes(data[:10 * CHUNK])
    os.close(slow.fd)  # then killed
    assert await reading == data
    assert upstream.offsets == [10 * CHUNK]
    await follower.close()


@pytest.mark.parametrize("kept", [0, 10])
async def test_a_follower_reads_the_new_file_of_a_takeover_not_the_removed_one(
        tmp_path: Path, kept: int) -> None:
    # The claimer relayed from memory (or failed) and removed its .part file: the
    # follower that takes over writes a new one, which its readers must read.
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    first = claims.try_claim(digest)
    assert first is not None
    first.announce(len(data))
    first.part.write_bytes(data[:kept * CHUNK])
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    reading = asyncio.create_task(_read(fill, len(data)))
    await _until(lambda: fill.written >= kept * CHUNK and fill.readers > 0)
    first.part.unlink()  # relayed (or failed): its file removed, then the claim let go
    first.release()
    assert await reading == data
    assert upstream.offsets == [0]  # the new file starts at byte 0
    assert follower.store.blob_path(digest).read_bytes() == data
    await follower.close()


async def test_followers_of_bytes_that_proved_wrong_are_cut_not_finished_on_new_ones(
        tmp_path: Path) -> None:
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    first = claims.try_claim(digest)
    assert first is not None
    first.announce(len(data))
    first.part.write_bytes(b"x" * 10 * CHUNK)  # wrong bytes
    follower = _worker(tmp_path, 1)
    fill, _ = await follower.start(digest, _Upstream(data), "r")
    reading = asyncio.create_task(_read(fill, len(data)))
    await _until(lambda: fill.written >= 10 * CHUNK and fill.readers > 0)
    first.mark_bad()  # what the claimer does when the digest does not match
    first.part.unlink()
    first.release()
    with pytest.raises(FillError):
        await reading
    await follower.close()


async def test_a_follower_downloads_on_its_own_when_the_claimer_relays_from_memory(
        tmp_path: Path) -> None:
    # No room under the cap: the claimer relays from memory, and its .part file stays
    # empty until it is done; its followers must not wait for all of that first.
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    relaying = _claimed_empty(claims, digest, len(data))
    relaying.mark_relayed()
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    assert await _read(fill, len(data)) == data  # while the claim is still held
    assert upstream.offsets == [0]
    relaying.release()
    assert not relaying.relayed.exists()
    await follower.close()


def test_a_part_left_by_a_dead_claimer_is_swept_one_still_held_is_not(
        tmp_path: Path) -> None:
    claims = Claims(tmp_path / "tmp" / "claims")
    left, held = (Digest.parse("sha256:" + hashlib.sha256(bytes([n])).hexdigest())
                  for n in range(2))
    dead, alive = claims.try_claim(left), claims.try_claim(held)
    assert dead is not None and alive is not None
    for claim in (dead, alive):
        claim.announce(100)
        claim.part.write_bytes(b"x" * 10)
    os.close(dead.fd)  # kill -9, and no follower took it over
    assert claims.sweep() == 1
    assert not dead.part.exists() and not dead.size.exists() and not dead.lock.exists()
    assert alive.part.exists() and alive.size.exists()
    alive.release()


async def test_a_fill_beside_a_relay_nobody_can_join_leaves_the_relays_claim_alone(
        tmp_path: Path) -> None:
    # A relay whose window moved on cannot be joined: a new request of the same worker
    # starts a fill of its own. When that one ends, it must not give up the claim the
    # relay still holds (another worker would take it and remove the relay's file).
    data = os.urandom(4 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    worker = _worker(tmp_path, 0)
    relay, joined = await worker.start(digest, _Upstream(data, step=30), "r")
    assert not joined
    relay.start_relay("no_room")
    relay.window._first = 1  # type: ignore[union-attr]  # its window moved on
    beside, joined = await worker.start(digest, _Upstream(data), "r")
    assert not joined and beside is not relay
    assert await _read(beside, len(data)) == data
    await beside.wait_done()
    await asyncio.sleep(0)  # the fill's task settles
    assert Claims(tmp_path / "tmp" / "claims").try_claim(digest) is None  # still held
    await worker.close()


@pytest.mark.parametrize("next_claim", [False, True])
async def test_a_late_reader_of_a_followed_fill_verified_not_kept_gets_every_byte(
        tmp_path: Path, next_claim: bool) -> None:
    # The claimer verified the blob but could not keep it (no room): the follower finishes
    # on its .part file. A request that joined the follower's fill and opens it only after
    # the claimer removed that file (its own readers done), or after a new claim made an
    # empty .part at the same name, must still get the verified bytes, not 0 of them.
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    claimer = claims.try_claim(digest)
    assert claimer is not None
    claimer.announce(len(data))
    claimer.part.write_bytes(data)
    claimer.mark_verified()
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    await _until(lambda: fill.done)
    claimer.part.unlink()  # the claimer's readers are done: its file goes
    claimer.release()
    if next_claim:
        again = claims.try_claim(digest)
        assert again is not None
        again.part.write_bytes(b"")
    assert await _read(fill, len(data)) == data
    assert upstream.offsets == []
    await follower.close()


async def test_a_late_reader_of_a_published_fill_reads_the_blob_not_a_new_part(
        tmp_path: Path) -> None:
    # The claims' .part name is reused by the next fill of the digest (after an eviction):
    # a reader of the published fill that opens late must read the published blob.
    data, digest = _blob()
    first = _worker(tmp_path, 0)
    fill, joined = await first.start(digest, _Upstream(data), "r")
    assert not joined
    await fill.wait_done()
    again = Claims(tmp_path / "tmp" / "claims").try_claim(digest)
    assert again is not None
    again.part.write_bytes(b"")
    assert await _read(fill, len(data)) == data
    again.release()
    await first.close()


async def test_a_reader_that_opened_the_claimers_file_reads_the_followers_own_download(
        tmp_path: Path) -> None:
    # The claimer starts relaying from memory (no room) after a reader of the follower
    # opened its empty .part file: the follower downloads on its own into a new file, and
    # the reader must read that one, not the claimer's empty file ("shrank", 0 bytes).
    data, digest = _blob()
    claims = Claims(tmp_path / "tmp" / "claims")
    relaying = _claimed_empty(claims, digest, len(data))
    upstream = _Upstream(data)
    follower = _worker(tmp_path, 1)
    fill, joined = await follower.start(digest, upstream, "r")
    assert joined
    reading = asyncio.create_task(_read(fill, len(data)))
    await _until(lambda: fill.readers == 1)
    relaying.mark_relayed()
    assert await reading == data
    assert upstream.offsets == [0]
    relaying.release()
    await follower.close()


class _NoRoomAtTheEnd:
    """A budget that reserves every download but keeps none of them (pinned content)."""

    def __init__(self) -> None:
        self.reserved = 0

    def fits(self, size: int) -> bool:
        return True

    async def reserve(self, size: int) -> bool:
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved -= size

    async def admit(self, size: int, held: int = 0) -> bool:
        return False

    async def make_room(self, size: int) -> int:
        return 0


async def test_a_verified_file_not_kept_stays_in_the_budget_until_it_is_removed(
        tmp_path: Path) -> None:
    # Not kept (no room): its .part file stays on disk for its readers; its bytes stay
    # reserved until it is removed, or the disk goes over the cap by such files.
    data, digest = _blob()
    space = _NoRoomAtTheEnd()
    worker = _worker(tmp_path, 0)
    worker.space = space
    fill, _ = await worker.start(digest, _Upstream(data), "r")
    reader = fill.read(0, len(data), CHUNK)
    first = await reader.__anext__()  # a reader still reading keeps the file
    await fill.wait_done()
    await asyncio.sleep(0.1)  # the fill task goes on: not kept, waiting for its reader
    part = Claims(tmp_path / "tmp" / "claims").part(digest)
    assert part.exists()
    assert space.reserved == len(data)
    rest = b"".join([piece async for piece in reader])
    assert first + rest == data
    await _until(lambda: not part.exists())
    await _until(lambda: space.reserved == 0)
    await worker.close()
