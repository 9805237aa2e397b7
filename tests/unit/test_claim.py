"""Claims across worker processes, with two fetchers on one storage folder (flock holds
between two open files even in one process, as between two processes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mirror.errors import FillError
from mirror.fetch import Fetcher
from mirror.fetch.claim import ClaimCoalescer, ClaimRefused, Claims
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


async def _read(fill: Fill, size: int) -> bytes:
    """What a client reads: after the headers (the size), as the handlers do; a reader
    that opened the fill before its claimer created the .part file would not find it."""
    assert await fill.wait_size() == size
    return b"".join([piece async for piece in fill.read(0, size, CHUNK)])


async def test_a_second_worker_follows_the_first_ones_download(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
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
    data = os.urandom(40 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
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
