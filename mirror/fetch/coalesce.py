"""How work on one digest or tag is coalesced: the one protocol the fetcher and the
manifest cache are built with.

::

    Coalescer                     LocalCoalescer          ClaimCoalescer (fetch/claim.py)
      shared                      False                   True: other processes do the same work
      exclusive(name)             an asyncio lock         a node-wide flock on tmp/claims/<name>
      claim(digest) -> BlobClaim  always (a temp file)    the claim, or None: another worker
                      | None                              fills it; follow its .part file
      part(digest)                None                    tmp/claims/<alg>-<hex>.part
      look(digest, published)     the published file      + the .part and .size files
                                                          and the .ok, .relay, .bad marks

Within one process, requests for the same digest join one :class:`~mirror.fetch.Fill`
(the fetcher's table of fills) and requests for the same manifest or tag join one
:class:`~mirror.fetch.SingleFlight` run; the coalescer is what the one request that
does the work goes through, so that with several worker processes one of them asks
upstream and the others find its answer. A node with one process gets the
:class:`LocalCoalescer`; a node with several, a
:class:`~mirror.fetch.claim.ClaimCoalescer` on the storage's ``tmp/claims/`` folder.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror.errors import UpstreamUnavailable
from mirror.fetch.fill import Fill
from mirror.oci import Digest
from mirror.storage.writer import TempWriter


@dataclass(frozen=True)
class Seen:
    """What a follower saw of a fill in another process."""

    published: int | None  # the size of the published blob, if it is published
    size: int | None  # the announced size
    on_disk: int | None  # bytes in the .part file (``None``: no such file)
    verified: bool = False  # the .part file is verified, complete, and will not be kept
    file_id: int | None = None  # the .part file's inode
    relayed: bool = False  # the claimer relays from memory from byte 0 (no room)
    bad_at: float | None = None  # when a fill of the digest last failed on wrong bytes


def file_replaced(fill: Fill, on_disk: int, file_id: int) -> bool:
    """Whether the file ``file_id`` holding ``on_disk`` bytes is not the one ``fill``'s
    bytes were counted in (another process removed it and wrote a new one, or started
    over)."""
    return on_disk < fill.written or fill.file_id not in (None, file_id)


def count_file(fill: Fill, on_disk: int, file_id: int) -> None:
    """Count the ``on_disk`` bytes of the file ``file_id`` in ``fill``: its readers reopen
    it (and wait for bytes they had passed) when it is another file than before."""
    if file_replaced(fill, on_disk, file_id):
        fill.replaced(on_disk, file_id)
        return
    fill.file_id = file_id
    if on_disk > fill.written:
        fill.advance(on_disk - fill.written)


def check_not_bad(fill: Fill, bad_at: float | None) -> None:
    """Cut ``fill``'s readers if the file they read from failed on wrong bytes since
    the fill started (``bad_at``: when a fill of the digest last did): they are never
    finished on another download's tail.

    Raises:
        UpstreamUnavailable: it did.
    """
    # A second of slack: file times come from a coarser clock than time.time().
    if bad_at is not None and bad_at >= fill.started_at - 1.0:
        raise UpstreamUnavailable(f"the download of {fill.digest} that readers followed "
                                  "had wrong bytes", status=502)


class BlobClaim(Protocol):
    """The right to fill one digest, held until :meth:`release`. Blocking calls (threads)."""

    @property
    def part(self) -> Path | None:
        """The file to fill, at a name every holder knows (``None``: a temp file of the
        fetcher's own, which nobody else reads)."""
        ...

    def writer(self, fill: Fill, chunk_size: int) -> TempWriter:
        """The writer of the fill's file, with bytes a previous holder left in it adopted."""
        ...

    def announce(self, size: int | None) -> None:
        """Tell followers the blob's size (once known)."""
        ...

    def mark_verified(self) -> None:
        """The file is verified and complete, and will not be published."""
        ...

    def mark_relayed(self) -> None:
        """Nothing will be written to the file (relayed from memory from byte 0, no
        room): followers download on their own rather than wait on it."""
        ...

    def mark_bad(self) -> None:
        """The bytes in the file proved wrong: followers that read some must be cut,
        not finished on a new download's bytes."""
        ...

    def release(self) -> None:
        """Give the claim up (after publishing, or after a failed fill)."""
        ...


class Coalescer(Protocol):
    """Who does a piece of work when several could: this process, or one of the node's."""

    @property
    def shared(self) -> bool:
        """Whether other processes do the same work (their results must be looked for)."""
        ...

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        """Hold the lock ``name`` (waiting for its holder): one asks, the others then
        find the answer on disk."""
        ...

    async def claim(self, digest: Digest) -> BlobClaim | None:
        """The claim on filling ``digest``, or ``None`` when another process holds it (the
        fetcher then follows that fill with :meth:`look`)."""
        ...

    def part(self, digest: Digest) -> Path | None:
        """Where another process's fill of ``digest`` grows (``None``: none can)."""
        ...

    async def look(self, digest: Digest, published: Path) -> Seen:
        """What is on disk of the fill of ``digest`` (``published``: its blob's path)."""
        ...


class LocalClaim:
    """A claim nobody else can hold: a temp file of this process's own."""

    part: Path | None = None

    def writer(self, fill: Fill, chunk_size: int) -> TempWriter:
        return TempWriter(fill.temp, fill.digest)

    def announce(self, size: int | None) -> None:
        return None

    def mark_verified(self) -> None:
        return None

    def mark_relayed(self) -> None:
        return None

    def mark_bad(self) -> None:
        return None

    def release(self) -> None:
        return None


LOCAL_CLAIM = LocalClaim()


class LocalCoalescer:
    """One process does all the work there is: claims are always granted, and a named
    lock is an :class:`asyncio.Lock` of this process."""

    shared = False

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._holders[name] += 1
        try:
            async with lock:
                yield
        finally:
            self._holders[name] -= 1
            if self._holders[name] <= 0:
                del self._holders[name]
                del self._locks[name]

    async def claim(self, digest: Digest) -> BlobClaim | None:
        return LOCAL_CLAIM

    def part(self, digest: Digest) -> Path | None:
        return None

    async def look(self, digest: Digest, published: Path) -> Seen:
        try:
            size = await asyncio.to_thread(lambda: published.stat().st_size)
        except FileNotFoundError:
            return Seen(None, None, None)
        return Seen(size, None, None)
