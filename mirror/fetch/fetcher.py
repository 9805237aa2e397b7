"""The fetcher: owns every fill of this node, one per digest.

It runs each fill as its own task, resumes a dropped download with a
``Range`` request, reserves and admits bytes through a :class:`Space`, and
handles a full disk (ENOSPC): make room and retry once, else relay from memory
and keep nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import aiohttp
import structlog

from mirror import metrics
from mirror.errors import DigestMismatch, UpstreamUnavailable
from mirror.fetch.body import UpstreamOpener, check_response, read_chunk
from mirror.fetch.coalesce import (
    LOCAL_CLAIM,
    BlobClaim,
    Coalescer,
    LocalCoalescer,
    Seen,
    check_not_bad,
    count_file,
    file_replaced,
)
from mirror.fetch.fill import Fill
from mirror.fetch.hints import SizeHints
from mirror.fetch.relay import RELAY_MAX_BYTES
from mirror.fetch.space import Space, Unbounded
from mirror.oci import Digest
from mirror.storage.base import BodyResponse
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.writer import DISK_FULL_ERRNOS, TempWriter
from mirror.tasks import TaskGroup

log = structlog.get_logger(__name__)

RESUME_ATTEMPTS = 3
#: How long an unkept blob's temp file outlives its last reader (for late joiners).
UNKEPT_GRACE = 1.0
#: Seconds between two looks at another process's fill (the latency a follower adds).
FOLLOW_POLL = 0.02


class Fetcher:
    """Owns every fill of this process: one per digest, and with a shared
    :class:`~mirror.fetch.coalesce.Coalescer`, one per digest for the node.

    Args:
        coalescer: who fills a digest that several processes want (default: this
            process, always); with a :class:`~mirror.fetch.claim.ClaimCoalescer`, the
            process that holds the digest's claim, which the others follow.
    """

    def __init__(self, store: FilesystemStore, chunk_size: int = 1 << 20,
                 space: Space | None = None, hints: SizeHints | None = None,
                 relay_max_bytes: int = RELAY_MAX_BYTES, *,
                 coalescer: Coalescer | None = None) -> None:
        self.store = store
        self.coalescer: Coalescer = coalescer or LocalCoalescer()
        self._held: dict[Fill, BlobClaim] = {}  # the claim each fill downloads under
        self.hints = hints or SizeHints()  # sizes from manifests (see hints.py)
        self.chunk_size = chunk_size
        self.space: Space = space or Unbounded()
        self.relay_max_bytes = relay_max_bytes
        self._fills: dict[Digest, Fill] = {}
        self._tasks = TaskGroup("fills")  # every fill's task, joinable or not
        self._reading: Counter[Digest] = Counter()

    def current(self, digest: Digest) -> Fill | None:
        """The fill under way for ``digest``, if any."""
        return self._fills.get(digest)

    def fills(self) -> list[Fill]:
        """Every download under way (for the status page)."""
        return list(self._fills.values())

    def busy(self, digest: Digest) -> bool:
        """Whether ``digest`` is being downloaded or read from a fill."""
        return digest in self._fills or self._reading[digest] > 0

    def _count_reader(self, digest: Digest, delta: int) -> None:
        self._reading[digest] += delta
        if self._reading[digest] <= 0:
            del self._reading[digest]

    def _forget(self, fill: Fill) -> None:
        """New requests for this digest no longer join ``fill``."""
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    async def start(self, digest: Digest, opener: UpstreamOpener, registry: str,
                    expected_size: int | None = None) -> tuple[Fill, bool]:
        """Join this process's fill of ``digest``, follow another process's, or claim the
        digest and fill it.

        Returns:
            The fill, and whether this call joined (or follows) one already under way.
        """
        existing = self._fills.get(digest)
        if existing is not None and existing.joinable:
            metrics.FILL_JOINS.inc()
            return existing, True
        if existing is not None or (expected_size is not None
                                    and not self.space.fits(expected_size)):
            # Larger than storage.max_size: relayed from memory by whoever downloads it,
            # so there is no file for another process to follow.
            return self._spawn(self._new_fill(digest, registry, expected_size, LOCAL_CLAIM),
                               opener, registry, LOCAL_CLAIM), False
        claim = await self.coalescer.claim(digest)
        existing = self._fills.get(digest)
        if existing is not None:  # another request of this process got here meanwhile
            if claim is not None:
                await asyncio.to_thread(claim.release)
            return await self.start(digest, opener, registry, expected_size)
        fill = self._new_fill(digest, registry, expected_size, claim)
        if claim is None:
            metrics.FILL_JOINS.inc()
            fill.source = "worker"
            fill.task = self._tasks.spawn(self._follow(fill, opener, registry), "fill")
            return fill, True
        if claim.part is not None:  # published by another process after this one's miss?
            seen = await self.coalescer.look(digest, self.store.blob_path(digest))
            if await self._caught_up(fill, seen):
                await asyncio.to_thread(claim.release)
                self._forget(fill)
                return fill, True
        return self._spawn(fill, opener, registry, claim), False

    def _new_fill(self, digest: Digest, registry: str, expected_size: int | None,
                  claim: BlobClaim | None) -> Fill:
        """A fill of ``digest``, joinable from now on, writing where ``claim`` says (a new
        temp file of this process when the claim names none)."""
        temp = claim.part if claim is not None else self.coalescer.part(digest)
        if claim is not None and temp is None:
            temp = self._new_temp()
        fill = Fill(digest, temp, expected_size, self._count_reader, self.relay_max_bytes)
        fill.registry = registry
        fill.destination = self.store.blob_path(digest)
        self._fills[digest] = fill
        return fill

    def _new_temp(self) -> Path | None:
        # mkstemp is a single metadata call: cheap enough here, and readers
        # that join from now on need the file to exist.
        try:
            fd, temp = self.store.new_temp()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            return None  # not even an empty file fits: the fill relays from memory from byte 0
        os.close(fd)
        return temp

    def _spawn(self, fill: Fill, opener: UpstreamOpener, registry: str,
               claim: BlobClaim) -> Fill:
        """Download ``fill`` here, under ``claim``."""
        if claim is not LOCAL_CLAIM:
            self._held[fill] = claim
        fill.task = self._tasks.spawn(self._run(fill, opener, registry), "fill")
        return fill

    async def close(self, grace: float = 0.0) -> None:
        """At shutdown: give fills ``grace`` seconds, cancel the rest, await their cleanup."""
        await self._tasks.close(grace)

    async def _run(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        try:
            await self._run_fill(fill, opener, registry)
        finally:
            self._settled(fill)

    # What the fill's claim is told (see mirror.fetch.coalesce.BlobClaim).
    def _claim(self, fill: Fill) -> BlobClaim:
        return self._held.get(fill, LOCAL_CLAIM)

    async def _writer(self, fill: Fill) -> TempWriter:
        """The writer of a fill's file (a previous holder's bytes in it adopted)."""
        claim = self._claim(fill)
        if claim is LOCAL_CLAIM:
            return TempWriter(fill.temp, fill.digest)
        return await asyncio.to_thread(claim.writer, fill, self.chunk_size)

    async def _sized(self, fill: Fill) -> None:
        """The fill's size is known (or known to be unknown) from the response headers."""
        claim = self._claim(fill)
        if claim is not LOCAL_CLAIM:
            await asyncio.to_thread(claim.announce, fill.size)

    def _settled(self, fill: Fill) -> None:
        """The fill is over: published, failed, or its unkept temp file removed."""
        claim = self._held.pop(fill, None)
        if claim is not None:
            claim.release()

    async def _relayed(self, fill: Fill) -> None:
        """The fill is relayed from memory from its first byte: its file stays empty, so
        followers in other processes download on their own."""
        claim = self._held.get(fill)
        if claim is not None:
            await asyncio.to_thread(claim.mark_relayed)

    async def _failing(self, fill: Fill, error: BaseException) -> None:
        """The fill failed with ``error`` (its file is about to be removed): after wrong
        bytes, followers that read some are cut rather than finished on a new file."""
        claim = self._held.get(fill)
        if claim is not None and isinstance(error, DigestMismatch) and fill.written:
            await asyncio.to_thread(claim.mark_bad)

    async def _run_fill(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        try:
            writer = await self._writer(fill)
        except BaseException as exc:  # e.g. a planted link refused: tell readers, not hang
            log.warning("fill_failed", digest=str(fill.digest), registry=registry, bytes=0,
                        error=str(exc) or type(exc).__name__)
            self._forget(fill)
            fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        metrics.FILLS_IN_FLIGHT.inc()
        unkept = None
        try:
            durable = await self._download_verified(fill, opener, registry, writer)
            unkept = await self._publish(fill, durable)  # still reserved: counted all along
            if unkept is None:
                self._release(fill)  # the stored blob counts now
            metrics.FILLS.labels("ok").inc()
            log.info("fill_done", digest=str(fill.digest), bytes=fill.written, registry=registry,
                     source=fill.source, kept=unkept is None)
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            metrics.FILLS.labels(reason).inc()
            if isinstance(exc, DigestMismatch):
                metrics.UPSTREAM_ERRORS.labels(registry, "digest_mismatch").inc()
            log.warning("fill_failed", digest=str(fill.digest), registry=registry,
                        bytes=fill.written, error=str(exc) or type(exc).__name__)
            if fill.expected_size is not None:
                # It streamed on a manifest's size and failed: the hint may be why.
                self.hints.drop(fill.digest, fill.hint)
            await asyncio.shield(self._failing(fill, exc))
            # Clean up before telling readers, so no one sees a half-removed fill.
            await asyncio.shield(asyncio.to_thread(writer.discard))
            fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if unkept is None:  # a file not kept stays reserved until it is removed
                self._release(fill)
            metrics.FILLS_IN_FLIGHT.dec()
            self._forget(fill)
        if unkept is not None:
            try:
                await self._discard_after_readers(fill)
            finally:  # also at shutdown: open readers keep their bytes through their fd
                await asyncio.shield(asyncio.to_thread(writer.discard))
                self._release(fill)

    async def _download_verified(self, fill: Fill, opener: UpstreamOpener, registry: str,
                                 writer: TempWriter) -> bool:
        """Download and verify; start over from the next source after wrong bytes, while
        no reader has seen any (a reader that has must be cut instead).

        Returns:
            Whether the verified bytes are durable on disk.
        """
        while True:
            await self._download(fill, opener, registry, writer)
            try:
                return await asyncio.to_thread(writer.verify_and_close, fill.size,
                                               fill.expected_size, fill.relay_from is None)
            except DigestMismatch:
                wrong_bytes = getattr(opener, "wrong_bytes", None)
                again = wrong_bytes() if wrong_bytes is not None else False
                if not again or fill.ever_read or fill.relay_from is not None:
                    raise
                log.warning("fill_restart", digest=str(fill.digest), rejected=fill.source)
                await asyncio.to_thread(writer.restart)
                fill.restart()

    def _release(self, fill: Fill) -> None:
        if fill.reserved:
            self.space.release(fill.reserved)
            fill.reserved = 0

    async def _publish(self, fill: Fill, durable: bool) -> str | None:
        """Publish a verified blob if it may be kept; else the reason it is not (and
        followers in other processes are told to finish on the file they read)."""
        reason = await self._publish_here(fill, durable)
        claim = self._held.get(fill)
        if reason is not None and claim is not None and fill.relay_from is None:
            await asyncio.to_thread(claim.mark_verified)
        return reason

    async def _publish_here(self, fill: Fill, durable: bool) -> str | None:
        reason = None
        temp = fill.temp
        if fill.relay_from is not None or not durable or temp is None:
            reason = fill.relay_reason or "disk_full"
        elif not self.space.fits(fill.written):
            reason = "too_large"
        elif not await self.space.admit(fill.written, held=fill.reserved):
            reason = "no_room"
        if reason is None and temp is not None:
            try:
                fill.finish(await asyncio.to_thread(self.store.publish_blob, temp, fill.digest))
                return None
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                reason = "disk_full"
        reason = reason or "disk_full"  # (no temp file means a full disk)
        if temp is not None:  # held for readers that open it after its name is gone
            fd = await asyncio.to_thread(_open_verified, temp, None, None)
            if fd is not None:
                fill.hold(fd)
        fill.finish(None)
        metrics.NOT_KEPT.labels(reason).inc()
        log.warning("blob_not_kept", digest=str(fill.digest), bytes=fill.written, reason=reason,
                    hint={"too_large": "the blob is larger than storage.max_size",
                          "no_room": "pinned or busy content fills storage.max_size",
                          "disk_full": "the disk is full"}[reason])
        return reason

    async def _discard_after_readers(self, fill: Fill) -> None:
        """Wait until no reader needs an unkept blob's temp file (and a grace for joiners)."""
        while True:
            await fill.unread()
            await asyncio.sleep(UNKEPT_GRACE)
            if not fill.readers:
                break

    async def _download(self, fill: Fill, opener: UpstreamOpener, registry: str,
                        writer: TempWriter) -> None:
        attempts = 0
        while True:
            if fill.size is not None and 0 < fill.size == fill.written:
                return  # every byte is here (taken over, or cut after the last): verify
            try:
                async with opener(fill.written) as response:
                    fill.source = getattr(opener, "source", "") or registry
                    check_response(response, fill)
                    if fill.hint_wrong:
                        self._wrong_hint(fill, response.content_length)
                    if fill.size is not None and fill.written == 0 \
                            and not self.space.fits(fill.size):
                        self._relay_too_large(fill)
                    await self._sized(fill)
                    if not fill.reserved and fill.size and self.space.fits(fill.size):
                        fill.reserved = fill.size
                        if not await self.space.reserve(fill.size):
                            fill.reserved = 0  # no room for the node: keep nothing
                            if fill.written == 0 and fill.relay_from is None:
                                self._relay_no_room(fill)
                                await self._relayed(fill)
                    await self._copy_body(fill, response, registry, writer)
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                    TimeoutError) as exc:
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    metrics.UPSTREAM_ERRORS.labels(registry, "truncated").inc()
                    raise UpstreamUnavailable(f"upstream connection lost after {fill.written} "
                                              f"bytes: {type(exc).__name__}", status=502) from exc
                log.warning("fill_resume", digest=str(fill.digest), offset=fill.written,
                            attempt=attempts)
                await asyncio.sleep(0.05 * attempts)

    def _relay_too_large(self, fill: Fill) -> None:
        """A blob larger than ``storage.max_size`` is never kept: rather than write it
        whole and delete it, hand it to its readers from memory from its first byte.

        Only when its length is known before the first byte (upstream's
        Content-Length, or a manifest's size): readers of a blob of unknown length
        wait for the end, which a bounded window cannot hold for them.
        """
        fill.start_relay(reason="too_large")
        log.info("blob_relayed", digest=str(fill.digest), size=fill.size, offset=fill.written,
                 reason="too_large", hint="larger than storage.max_size: streamed from "
                 "memory to its readers, not written to disk")

    def _relay_no_room(self, fill: Fill) -> None:
        """Pinned content and other downloads fill ``storage.max_size``: writing this blob
        would take the disk over the cap, so it is relayed from memory and not kept."""
        fill.start_relay(reason="no_room")
        log.info("blob_relayed", digest=str(fill.digest), size=fill.size, offset=fill.written,
                 reason="no_room", hint="no room under storage.max_size: streamed from "
                 "memory to its readers, not written to disk")

    def _wrong_hint(self, fill: Fill, length: int | None) -> None:
        """A manifest declared another size than upstream sends: the digest will tell."""
        fill.hint_wrong = False
        self.hints.drop(fill.digest, fill.hint)
        metrics.UPSTREAM_ERRORS.labels(fill.registry, "size_hint_wrong").inc()
        log.warning("size_hint_ignored", digest=str(fill.digest), size_hint=fill.hint,
                    upstream_length=length, hint="a manifest declared another size for this "
                    "digest; upstream's length is used and the bytes are verified")

    async def _copy_body(self, fill: Fill, response: BodyResponse, registry: str,
                         writer: TempWriter) -> None:
        while True:
            chunk = await read_chunk(response.content, self.chunk_size)
            if not chunk:
                break
            if fill.size is not None and fill.written + len(chunk) > fill.size:
                raise UpstreamUnavailable("upstream sent more bytes than announced", status=502)
            await self._store_chunk(fill, writer, chunk)
            if fill.pace is not None and not fill.readers:
                await fill.pace(len(chunk))
        if fill.size is not None and fill.written < fill.size:
            raise aiohttp.ClientPayloadError(f"body ended at {fill.written} of {fill.size} bytes")

    async def _store_chunk(self, fill: Fill, writer: TempWriter, chunk: bytes) -> None:
        if fill.relay_from is None:
            try:
                await asyncio.to_thread(writer.write, chunk)
                fill.advance(len(chunk))
                return
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                if await self._room_after_full(fill, writer, chunk):
                    return
        await asyncio.to_thread(writer.hash_only, chunk)
        fill.relay(chunk)
        if not await fill.relay_backpressure():
            raise UpstreamUnavailable("no reader is left for a blob that is not kept",
                                      status=503)

    async def _room_after_full(self, fill: Fill, writer: TempWriter, chunk: bytes) -> bool:
        """ENOSPC: evict and retry the write once; else switch the fill to a relay."""
        remaining = (fill.size - fill.written) if fill.size else len(chunk)
        freed = await self.space.make_room(max(remaining, len(chunk)))
        if freed > 0:
            try:
                await asyncio.to_thread(writer.write, chunk)
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
            else:
                metrics.DISK_FULL.labels("retried").inc()
                log.warning("storage_full", digest=str(fill.digest), offset=fill.written,
                            action="evicted_and_retried", freed=freed)
                fill.advance(len(chunk))
                return True
        metrics.DISK_FULL.labels("relayed").inc()
        log.warning("storage_full", digest=str(fill.digest), offset=fill.written,
                    action="relay_from_memory_not_kept", freed=freed, readers=fill.readers)
        fill.start_relay()
        self._forget(fill)
        return False

    # --- following another process's fill (a shared coalescer) ---------------------------
    async def _follow(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        """Follow another process's fill until it is published; take it over if that
        process stops without publishing while its file is still there."""
        destination = self.store.blob_path(fill.digest)
        try:
            while True:
                seen = await self.coalescer.look(fill.digest, destination)
                reason = self._not_followable(fill, seen)
                if reason is not None:
                    await self._own(fill, opener, registry, reason)
                    return
                if await self._caught_up(fill, seen):
                    return
                claim = await self.coalescer.claim(fill.digest)
                if claim is not None:
                    await self._taken(fill, claim, opener, registry, destination)
                    return
                await asyncio.sleep(FOLLOW_POLL)
        except BaseException as exc:
            if not fill.done:
                fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._forget(fill)

    def _not_followable(self, fill: Fill, seen: Seen) -> str | None:
        """Why ``fill`` cannot follow the claimer (it relays from memory what no other
        process can read), or ``None``."""
        if seen.published is not None or fill.written:
            return None
        if seen.size is not None and not self.space.fits(seen.size):
            return "too_large"
        return "no_room" if seen.relayed else None

    async def _own(self, fill: Fill, opener: UpstreamOpener, registry: str,
                   reason: str) -> None:
        """Download ``fill`` here, unclaimed: the claimer relays from memory (a blob
        larger than ``storage.max_size``, or no room), which no other process can follow."""
        fd, temp = await asyncio.to_thread(self.store.new_temp)
        try:
            file_id = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        fill.temp, fill.source = temp, ""
        # Readers that opened the claimer's (empty) .part file open this one instead.
        fill.replaced(0, file_id)
        log.info("fill_not_shared", digest=str(fill.digest), reason=reason)
        await self._run(fill, opener, registry)

    async def _caught_up(self, fill: Fill, seen: Seen) -> bool:
        """Advance ``fill`` to what is on disk; ``True`` once the blob is published (or
        verified and not kept, its file then held open for the fill's readers)."""
        if seen.published is not None:
            if fill.size is None:
                fill.set_size(seen.published)
            if seen.published > fill.written:
                fill.advance(seen.published - fill.written)
            fill.finish(self.store.blob_path(fill.digest))
            return True
        if seen.size is not None and fill.size is None:
            fill.set_size(seen.size)
        if seen.on_disk is not None and seen.file_id is not None:
            if file_replaced(fill, seen.on_disk, seen.file_id):
                check_not_bad(fill, seen.bad_at)
            count_file(fill, seen.on_disk, seen.file_id)
        if seen.verified and seen.on_disk == fill.size and fill.temp is not None:
            # Verified, not kept: readers read on from the .part file, which the claimer
            # removes once its own readers are done, and the next claim creates again.
            fd = await asyncio.to_thread(_open_verified, fill.temp, seen.file_id, seen.on_disk)
            if fd is None:
                return False  # removed meanwhile: its claim is free at the next look
            fill.hold(fd)
            fill.finish(None)
            return True
        return False

    async def _taken(self, fill: Fill, claim: BlobClaim, opener: UpstreamOpener, registry: str,
                     destination: Path) -> None:
        """The claim was free: the other process is done, failed, or died."""
        seen = await self.coalescer.look(fill.digest, destination)
        if await self._caught_up(fill, seen):
            await asyncio.to_thread(claim.release)
            return
        if seen.on_disk is None and fill.written > 0:
            try:
                check_not_bad(fill, seen.bad_at)
            except UpstreamUnavailable:
                await asyncio.to_thread(claim.release)
                raise
        log.warning("fill_taken_over", digest=str(fill.digest), bytes=fill.written,
                    part="kept" if seen.on_disk is not None else "new")
        metrics.FILL_TAKEOVERS.inc()
        fill.source = ""
        self._held[fill] = claim
        await self._run(fill, opener, registry)


def _open_verified(path: Path, file_id: int | None, size: int | None) -> int | None:
    """A descriptor of the verified file at ``path`` (no link followed), or ``None`` when
    it is gone or is another file than the one seen (inode ``file_id``, ``size`` bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone (or a link planted at its name)
        return None
    stat = os.fstat(fd)
    if (file_id is not None and stat.st_ino != file_id) or (
            size is not None and stat.st_size != size):
        os.close(fd)
        return None
    return fd
