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

from mirror import metrics
from mirror.errors import DigestMismatch, UpstreamUnavailable
from mirror.fetch.body import UpstreamOpener
from mirror.fetch.fetcher import Fetcher
from mirror.fetch.fill import Fill
from mirror.fetch.hints import SizeHints
from mirror.fetch.relay import RELAY_MAX_BYTES
from mirror.fetch.space import Space
from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore
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

    def announce(self, size: int | None) -> None:
        """Tell followers the blob's size (once known)."""
        if size is None:
            return
        temp = self.size.with_suffix(f".size.{os.getpid()}")
        _write_small(temp, str(size))
        os.replace(temp, self.size)

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

    @property
    def verified(self) -> Path:
        """The marker of bytes verified but not kept."""
        return self.size.with_suffix(".ok")

    def mark_verified(self) -> None:
        """The ``.part`` file is verified and complete, and will not be published."""
        os.close(open_claim_file(self.verified, os.O_WRONLY | os.O_CREAT))

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


@dataclass(frozen=True)
class Seen:
    """What a follower saw of a fill in another process."""

    published: int | None  # the size of the published blob, if it is published
    size: int | None  # the announced size
    on_disk: int | None  # bytes in the .part file (``None``: no such file)
    verified: bool = False  # the .part file is verified, complete, and will not be kept
    file_id: int | None = None  # the .part file's inode
    relayed: bool = False  # the claimer relays from memory from byte 0 (no room)


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
                    size_file.with_suffix(".relay").exists())

    def failed_on_wrong_bytes(self, digest: Digest, since: float) -> bool:
        """Whether a fill of ``digest`` failed on wrong bytes at or after ``since``."""
        try:
            # A second of slack: file times come from a coarser clock than time.time().
            return self._names(digest)[2].with_suffix(".bad").stat().st_mtime >= since - 1.0
        except FileNotFoundError:
            return False

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

    def announced(self, digest: Digest) -> int | None:
        """The size a claimer announced for ``digest``, if any."""
        try:
            return int(_read_small(self._names(digest)[2]))
        except (FileNotFoundError, ValueError):
            return None


class ClaimingFetcher(Fetcher):
    """A :class:`~mirror.fetch.fetcher.Fetcher` for one worker among several: it fills a
    digest only under the node-wide claim, and follows the fills of other workers."""

    def __init__(self, store: FilesystemStore, chunk_size: int = 1 << 20,
                 space: Space | None = None, hints: SizeHints | None = None,
                 relay_max_bytes: int = RELAY_MAX_BYTES, *, claims: Claims) -> None:
        super().__init__(store, chunk_size, space, hints, relay_max_bytes)
        self.claims = claims
        # By fill, not digest: a fill this process starts beside a relay that can no
        # longer be joined (its window moved on) must not take the relay's claim.
        self._held: dict[Fill, Claim] = {}

    async def start(self, digest: Digest, opener: UpstreamOpener, registry: str,
                    expected_size: int | None = None) -> tuple[Fill, bool]:
        """Join this process's fill, follow another worker's, or claim the digest and fill.

        Returns:
            The fill, and whether this call joined (or follows) one already under way.
        """
        if digest in self._fills or (expected_size is not None
                                     and not self.space.fits(expected_size)):
            # Joined here, or larger than storage.max_size: relayed from memory by whoever
            # downloads it, so there is no file for another worker to follow.
            return await super().start(digest, opener, registry, expected_size)
        claim = await asyncio.to_thread(self.claims.try_claim, digest)
        if digest in self._fills:  # another request of this process got here meanwhile
            if claim is not None:
                await asyncio.to_thread(claim.release)
            return await super().start(digest, opener, registry, expected_size)
        fill = self._new_fill(digest, registry, expected_size)
        if claim is not None:  # published by another worker after this one's cache miss?
            destination = self.store.blob_path(digest)
            seen = await asyncio.to_thread(self.claims.look, digest, destination)
            if self._caught_up(fill, seen, destination):
                await asyncio.to_thread(claim.release)
                self._forget(fill)
                return fill, True
        if claim is None:
            metrics.FILL_JOINS.inc()
            fill.source = "worker"
            fill.task = self._tasks.spawn(self._follow(fill, opener, registry), "fill")
            return fill, True
        self._held[fill] = claim
        fill.task = self._tasks.spawn(self._run(fill, opener, registry), "fill")
        return fill, False

    def _new_fill(self, digest: Digest, registry: str, expected_size: int | None) -> Fill:
        fill = Fill(digest, self.claims.part(digest), expected_size, self._count_reader,
                    self.relay_max_bytes)
        fill.registry = registry
        fill.destination = self.store.blob_path(digest)
        self._fills[digest] = fill
        return fill

    async def _writer(self, fill: Fill) -> TempWriter:
        """The writer of the ``.part`` file, with the bytes already in it (a claimer that
        died left them) hashed again and kept, when their total size is known."""
        return await asyncio.to_thread(self._adopt, fill)

    def _adopt(self, fill: Fill) -> TempWriter:
        assert fill.temp is not None
        writer = TempWriter(fill.temp, fill.digest)
        fd = open_claim_file(fill.temp, os.O_RDWR | os.O_CREAT)
        try:
            stat = os.fstat(fd)
            on_disk = stat.st_size
            if self._replaced(fill, on_disk, stat.st_ino):
                self._check_not_bad(fill)
            size = fill.size or self.claims.announced(fill.digest) or fill.expected_size
            if on_disk and size is not None and on_disk <= size:
                offset = 0
                while offset < on_disk:
                    data = os.pread(fd, min(self.chunk_size, on_disk - offset), offset)
                    if not data:
                        break
                    writer.hash_only(data)
                    offset += len(data)
                if offset == on_disk:
                    if fill.size is None:
                        fill.set_size(size)
                    self._advance(fill, on_disk, stat.st_ino)
                    log.info("fill_adopted", digest=str(fill.digest), bytes=on_disk)
                    return writer
                writer = TempWriter(fill.temp, fill.digest)
            if on_disk:
                os.ftruncate(fd, 0)
            self._advance(fill, 0, stat.st_ino)
            return writer
        finally:
            os.close(fd)

    @staticmethod
    def _replaced(fill: Fill, on_disk: int, file_id: int) -> bool:
        """Whether the ``.part`` file is not the one ``fill``'s bytes were counted in."""
        return on_disk < fill.written or fill.file_id not in (None, file_id)

    def _advance(self, fill: Fill, on_disk: int, file_id: int) -> None:
        """Count the ``on_disk`` bytes of the ``.part`` file ``file_id`` in ``fill``."""
        if self._replaced(fill, on_disk, file_id):
            fill.replaced(on_disk, file_id)
            return
        fill.file_id = file_id
        if on_disk > fill.written:
            fill.advance(on_disk - fill.written)

    def _check_not_bad(self, fill: Fill) -> None:
        """Cut ``fill``'s readers if the file they read from failed on wrong bytes.

        Raises:
            UpstreamUnavailable: it did.
        """
        if self.claims.failed_on_wrong_bytes(fill.digest, fill.started_at):
            raise UpstreamUnavailable(f"the download of {fill.digest} that readers followed "
                                      "had wrong bytes", status=502)

    async def _relayed(self, fill: Fill) -> None:
        claim = self._held.get(fill)
        if claim is not None:
            await asyncio.to_thread(claim.mark_relayed)

    async def _failing(self, fill: Fill, error: BaseException) -> None:
        claim = self._held.get(fill)
        if claim is not None and isinstance(error, DigestMismatch) and fill.written:
            await asyncio.to_thread(claim.mark_bad)

    async def _sized(self, fill: Fill) -> None:
        claim = self._held.get(fill)
        if claim is not None:
            await asyncio.to_thread(claim.announce, fill.size)

    async def _publish(self, fill: Fill, durable: bool) -> str | None:
        reason = await super()._publish(fill, durable)
        claim = self._held.get(fill)
        if reason is not None and claim is not None and fill.relay_from is None:
            await asyncio.to_thread(claim.mark_verified)
        return reason

    def _settled(self, fill: Fill) -> None:
        claim = self._held.pop(fill, None)
        if claim is not None:
            claim.release()

    async def _follow(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        """Follow another worker's fill until it is published; take it over if that
        worker stops without publishing while the ``.part`` file is still there."""
        destination = self.store.blob_path(fill.digest)
        try:
            while True:
                seen = await asyncio.to_thread(self.claims.look, fill.digest, destination)
                reason = self._not_followable(fill, seen)
                if reason is not None:
                    await self._own(fill, opener, registry, reason)
                    return
                if self._caught_up(fill, seen, destination):
                    return
                claim = await asyncio.to_thread(self.claims.try_claim, fill.digest)
                if claim is not None:
                    await self._taken(fill, claim, opener, registry, destination)
                    return
                await asyncio.sleep(POLL)
        except BaseException as exc:
            if not fill.done:
                fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._forget(fill)

    def _not_followable(self, fill: Fill, seen: Seen) -> str | None:
        """Why ``fill`` cannot follow the claimer (it relays from memory what no other
        worker can read), or ``None``."""
        if seen.published is not None or fill.written:
            return None
        if seen.size is not None and not self.space.fits(seen.size):
            return "too_large"
        return "no_room" if seen.relayed else None

    async def _own(self, fill: Fill, opener: UpstreamOpener, registry: str,
                   reason: str) -> None:
        """Download ``fill`` here, unclaimed: the claimer relays from memory (a blob
        larger than ``storage.max_size``, or no room), which no other worker can follow."""
        fd, temp = await asyncio.to_thread(self.store.new_temp)
        os.close(fd)
        fill.temp, fill.source = temp, ""
        log.info("fill_not_shared", digest=str(fill.digest), reason=reason)
        await self._run(fill, opener, registry)

    def _caught_up(self, fill: Fill, seen: Seen, destination: Path) -> bool:
        """Advance ``fill`` to what is on disk; ``True`` once the blob is published."""
        if seen.published is not None:
            if fill.size is None:
                fill.set_size(seen.published)
            if seen.published > fill.written:
                fill.advance(seen.published - fill.written)
            fill.finish(destination)
            return True
        if seen.size is not None and fill.size is None:
            fill.set_size(seen.size)
        if seen.on_disk is not None and seen.file_id is not None:
            if self._replaced(fill, seen.on_disk, seen.file_id):
                self._check_not_bad(fill)
            self._advance(fill, seen.on_disk, seen.file_id)
        if seen.verified and seen.on_disk == fill.size:
            fill.finish(None)  # verified, not kept: readers read on from the .part file
            return True
        return False

    async def _taken(self, fill: Fill, claim: Claim, opener: UpstreamOpener, registry: str,
                     destination: Path) -> None:
        """The claim was free: the other worker is done, failed, or died."""
        seen = await asyncio.to_thread(self.claims.look, fill.digest, destination)
        if self._caught_up(fill, seen, destination):
            await asyncio.to_thread(claim.release)
            return
        if seen.on_disk is None and fill.written > 0:
            try:
                self._check_not_bad(fill)
            except UpstreamUnavailable:
                await asyncio.to_thread(claim.release)
                raise
        log.warning("fill_taken_over", digest=str(fill.digest), bytes=fill.written,
                    part="kept" if seen.on_disk is not None else "new")
        metrics.FILL_TAKEOVERS.inc()
        fill.source = ""
        self._held[fill] = claim
        await self._run(fill, opener, registry)
