"""Claims on digests across the worker processes of one node: one download per digest
per node, not per process.

::

    tmp/claims/<alg>-<hex>.claim   flock(LOCK_EX) held by the worker that fills the digest
    tmp/claims/<alg>-<hex>.part    the growing file, at a name every worker knows
    tmp/claims/<alg>-<hex>.size    the announced size, once known (written, then renamed)
    tmp/claims/<alg>-<hex>.ok      the bytes verified but are not kept (larger than
                                   storage.max_size, no room): followers finish on them
    tmp/claims/<alg>-<hex>.relay   the claimer relays from memory from byte 0 (no room):
                                   followers download on their own rather than wait
    tmp/claims/<alg>-<hex>.bad     a fill failed on wrong bytes at this time (mtime)

The :class:`ClaimCoalescer` is how a :class:`~mirror.fetch.Fetcher` and a manifest cache
built with it get these claims (see :mod:`mirror.fetch.coalesce`).

The claimer downloads as a lone process would, into the ``.part`` file, and publishes it
by rename only after verification. A worker that finds the claim held follows instead:
its :class:`~mirror.fetch.fill.Fill` advances as the ``.part`` file grows (checked every
:data:`POLL` seconds) and finishes only when the published file appears, so its readers
never get the final byte of bytes that did not verify.

When the claim is free again and nothing was published, the claimer died (``kill -9``)
or its fill failed or was not kept. If the ``.part`` file is still there (a dead claimer
leaves it), the follower takes the claim and goes on from the bytes in it: they are
hashed again and the rest is asked with ``Range``, so its readers keep reading the same
file. If it is gone (a failed fill removes it, and so does one relayed from memory when
its last reader is done), the new claimer downloads into a new ``.part`` file from byte
0. Readers follow the file, not a descriptor: when the file at the name is another one
(its inode changed) or holds fewer bytes than counted, the fill is *replaced*
(:meth:`~mirror.fetch.fill.Fill.replaced`): its readers open the new file and wait there
until it reaches the bytes they had passed, whichever worker writes it. The one
exception is a fill that failed on wrong bytes (it leaves a ``.bad`` marker): readers
that took bytes of it are cut, as readers of a failed fill are in one process, never
finished with another download's tail.

A worker killed while it filled leaves its ``.part`` file, in no budget once its
reservation is gone: a worker that starts removes every one whose claim nobody holds
(:meth:`Claims.sweep`).

Every file here is opened with ``O_NOFOLLOW``: a symbolic link planted in ``tmp/claims/``
(to make a worker lock, truncate or write a file elsewhere) is refused, never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from mirror.errors import UpstreamUnavailable
from mirror.fetch.coalesce import BlobClaim, Seen, check_not_bad, count_file, file_replaced
from mirror.fetch.fill import Fill
from mirror.oci import Digest
from mirror.storage.writer import TempWriter

log = structlog.get_logger(__name__)

#: Seconds between two looks at a followed fill (the latency a follower adds).
POLL = 0.02
#: Flags every file of the claims folder is opened with: a planted link is refused.
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class ClaimRefused(UpstreamUnavailable):
    """A file of the claims folder is a symbolic link (or otherwise not ours)."""


def open_claim_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a file in the claims folder, refusing symbolic links.

    Raises:
        ClaimRefused: ``path`` is a symbolic link.
    """
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        log.error("claim_file_refused", path=str(path), reason="symbolic link")
        raise ClaimRefused(f"{path.name} in the claims folder is a symbolic link: refused",
                           status=500) from None


def _read_small(path: Path) -> str:
    """The text of a small file of the claims folder (no link followed)."""
    fd = open_claim_file(path, os.O_RDONLY)
    try:
        return os.read(fd, 64).decode("ascii", "replace")
    finally:
        os.close(fd)


def _write_small(path: Path, text: str) -> None:
    """Create ``path`` (no link followed, none replaced) holding ``text``."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = open_claim_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@dataclass
class Claim:
    """A held claim on a digest: the lock's fd and the files at the digest's names."""

    fd: int
    lock: Path
    part: Path
    size: Path

    def writer(self, fill: Fill, chunk_size: int) -> TempWriter:
        """The writer of the ``.part`` file, with the bytes already in it (a claimer that
        died left them) hashed again and kept, when their total size is known."""
        writer = TempWriter(self.part, fill.digest)
        fd = open_claim_file(self.part, os.O_RDWR | os.O_CREAT)
        try:
            stat = os.fstat(fd)
            on_disk = stat.st_size
            if file_replaced(fill, on_disk, stat.st_ino):
                check_not_bad(fill, _mtime(self.bad))
            size = fill.size or self.announced() or fill.expected_size
            if on_disk and size is not None and on_disk <= size:
                offset = 0
                while offset < on_disk:
                    data = os.pread(fd, min(chunk_size, on_disk - offset), offset)
                    if not data:
                        break
                    writer.hash_only(data)
                    offset += len(data)
                if offset == on_disk:
                    if fill.size is None:
                        fill.set_size(size)
                    count_file(fill, on_disk, stat.st_ino)
                    log.info("fill_adopted", digest=str(fill.digest), bytes=on_disk)
                    return writer
                writer = TempWriter(self.part, fill.digest)
            if on_disk:
                os.ftruncate(fd, 0)
            count_file(fill, 0, stat.st_ino)  # readers of bytes it held wait for them again
            return writer
        finally:
            os.close(fd)

    def announced(self) -> int | None:
        """The size announced for the digest, if any."""
        try:
            return int(_read_small(self.size))
        except (FileNotFoundError, ValueError):
            return None

    def announce(self, size: int | None) -> None:
        """Tell followers the blob's size (once known)."""
        if size is None:
            return
        temp = self.size.with_suffix(f".size.{os.getpid()}")
        _write_small(temp, str(size))
        os.replace(temp, self.size)

    @property
    def verified(self) -> Path:
        """The marker of bytes verified but not kept."""
        return self.size.with_suffix(".ok")

    def mark_verified(self) -> None:
        """The ``.part`` file is verified and complete, and will not be published."""
        os.close(open_claim_file(self.verified, os.O_WRONLY | os.O_CREAT))

    @property
    def relayed(self) -> Path:
        """The marker of a fill relayed from memory from its first byte."""
        return self.size.with_suffix(".relay")

    def mark_relayed(self) -> None:
        """Nothing will be written to the ``.part`` file: followers must not wait on it."""
        os.close(open_claim_file(self.relayed, os.O_WRONLY | os.O_CREAT))

    @property
    def bad(self) -> Path:
        """The marker of a fill that failed on wrong bytes (its mtime says when)."""
        return self.size.with_suffix(".bad")

    def mark_bad(self) -> None:
        """The bytes in the ``.part`` file proved wrong: followers that read some must
        be cut, not finished on a new download's bytes."""
        fd = open_claim_file(self.bad, os.O_WRONLY | os.O_CREAT)
        try:
            os.utime(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the claim up (after publishing, or after a failed fill removed the part)."""
        for done in (self.size, self.verified, self.relayed):
            with contextlib.suppress(FileNotFoundError):
                done.unlink()
        # Removed while held, so that nobody locks a file that is no longer at the name.
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def _mtime(path: Path) -> float | None:
    """When the marker ``path`` was last touched (``None``: there is none)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


class Claims:
    """The claims folder shared by the workers of one node (blocking calls: use threads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _names(self, digest: Digest) -> tuple[Path, Path, Path]:
        stem = f"{digest.algorithm}-{digest.hex}"
        return (self.folder / f"{stem}.claim", self.folder / f"{stem}.part",
                self.folder / f"{stem}.size")

    def part(self, digest: Digest) -> Path:
        """Where the growing file of ``digest`` is."""
        return self._names(digest)[1]

    def try_claim(self, digest: Digest) -> Claim | None:
        """Take the claim on ``digest``, or ``None`` when another process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock, part, size = self._names(digest)
        return self._lock(lock, part, size)

    def _lock(self, lock: Path, part: Path | None = None, size: Path | None = None
              ) -> Claim | None:
        part = part or lock.with_suffix(".part")
        size = size or lock.with_suffix(".size")
        while True:
            fd = open_claim_file(lock, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Claim(fd, lock, part, size)
            os.close(fd)  # the holder released (and removed) it meanwhile: lock the new one

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """Hold the node-wide lock ``name`` (waiting for another worker that holds it):
        what manifests and tag checks use, so that one worker asks upstream and the
        others then find its answer on disk."""
        lock = self.folder / f"{name}.claim"
        held: Claim | None = None
        while held is None:
            held = await asyncio.to_thread(self._try_lock, lock)
            if held is None:
                await asyncio.sleep(POLL)
        try:
            yield
        finally:
            await asyncio.to_thread(held.release)

    def _try_lock(self, lock: Path) -> Claim | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self._lock(lock)

    def look(self, digest: Digest, published: Path) -> Seen:
        """What is on disk of a fill another process runs."""
        try:
            return Seen(published.stat().st_size, None, None)
        except FileNotFoundError:
            pass
        _, part, size_file = self._names(digest)
        try:
            size: int | None = int(_read_small(size_file))
        except (FileNotFoundError, ValueError):
            size = None
        on_disk: int | None = None
        file_id: int | None = None
        with contextlib.suppress(FileNotFoundError):
            stat = part.stat()
            on_disk, file_id = stat.st_size, stat.st_ino
        return Seen(None, size, on_disk, size_file.with_suffix(".ok").exists(), file_id,
                    size_file.with_suffix(".relay").exists(),
                    _mtime(size_file.with_suffix(".bad")))

    def sweep(self) -> int:
        """Remove the ``.part`` files nobody holds the claim of: what a worker killed
        while it filled left, that no follower took over (at a worker's start, after
        the one before it died). Their bytes are on disk but in no budget.

        Returns:
            How many were removed.
        """
        removed = 0
        for part in self.folder.glob("*.part") if self.folder.is_dir() else ():
            claim = self._lock(part.with_suffix(".claim"))
            if claim is None:
                continue  # filled, or followed and taken over, right now
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
                removed += 1
            claim.release()
        if removed:
            log.info("claims_swept", parts=removed, reason="left by a worker that died")
        return removed


class ClaimCoalescer:
    """The coalescer of a node with several worker processes: claims in ``claims``' folder.

    The fetcher fills a digest only under its claim, and follows the fills of other
    workers; manifests and tag checks are asked upstream under a named claim.
    """

    shared = True

    def __init__(self, claims: Claims) -> None:
        self.claims = claims

    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.claims.exclusive(name)

    async def claim(self, digest: Digest) -> BlobClaim | None:
        return await asyncio.to_thread(self.claims.try_claim, digest)

    def part(self, digest: Digest) -> Path | None:
        return self.claims.part(digest)

    async def look(self, digest: Digest, published: Path) -> Seen:
        return await asyncio.to_thread(self.claims.look, digest, published)
