"""Single-flight upstream fills with fan-out streaming and verification.

One :class:`Fill` per digest downloads a blob into a temp file, hashing as it
writes. Every request for that digest, the first and all later ones, reads the
growing temp file through its own file descriptor and sends bytes as soon as
they are on disk; nobody waits for the whole blob. Only a file whose size and
digest match is published (atomic rename). When the download fails, every
reader raises :class:`FillError` and aborts its connection, and the temp file
is removed.

The fill runs as a task owned by the :class:`Fetcher`, never by a request: a
client that disconnects does not cancel a download that others are reading.
A connection dropped mid-download is resumed with a ``Range`` request before
readers are failed.

Space is asked of a :class:`Space` (the evictor): a fill reserves its size when
the headers arrive; a verified blob is published only if it may be kept,
otherwise (larger than ``storage.max_size``, or no room left that eviction
could make) it is streamed to its readers and deleted after them. When a write
fails with ENOSPC, the fill asks for room and retries once; if the disk is
still full it turns into a relay: the bytes already on disk are read from the
temp file, the rest from a bounded window in memory that advances with the
slowest reader. The blob is verified as always and never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import aiohttp
import structlog

from mirror import metrics, relay
from mirror.errors import BlobUnknown, FillError, OciError, UpstreamUnavailable
from mirror.oci import Digest
from mirror.relay import RelayWindow
from mirror.storage.base import BodyReader, BodyResponse
from mirror.storage.filesystem import FilesystemStore

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Opens the body of a blob from a byte offset (0, or a resume point): an upstream
#: ``aiohttp.ClientResponse``, or any source with the same small interface (S3).
UpstreamOpener = Callable[[int], AbstractAsyncContextManager[BodyResponse]]

RESUME_ATTEMPTS = 3
#: How long an unkept blob's temp file outlives its last reader (for late joiners).
UNKEPT_GRACE = 1.0
_FULL = (errno.ENOSPC, errno.EDQUOT)


class Space(Protocol):
    """What fills ask of the cache's byte budget (see mirror.cache.eviction)."""

    def fits(self, size: int) -> bool: ...

    async def reserve(self, size: int) -> None: ...

    def release(self, size: int) -> None: ...

    async def admit(self, size: int) -> bool: ...

    async def make_room(self, size: int) -> int: ...


class Unbounded:
    """No byte budget: everything fits, nothing is evicted."""

    def fits(self, size: int) -> bool:
        return True

    async def reserve(self, size: int) -> None:
        return None

    def release(self, size: int) -> None:
        return None

    async def admit(self, size: int) -> bool:
        return True

    async def make_room(self, size: int) -> int:
        return 0


class DigestMismatch(UpstreamUnavailable):
    """Upstream sent bytes whose hash is not the digest asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502)


class SingleFlight(Generic[K, V]):
    """Runs one task per key; concurrent callers share its result.

    The task belongs to this object: a caller that is cancelled stops waiting
    but never cancels the work others wait on.
    """

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def in_flight(self, key: K) -> bool:
        """Whether work for ``key`` is under way."""
        return key in self._tasks

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Run ``work`` for ``key`` or join the run under way.

        Returns:
            The result, and whether this call joined another's run.
        """
        task = self._tasks.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        return await asyncio.shield(task), joined

    async def close(self) -> None:
        """Cancel and await everything under way (at shutdown)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Fill:
    """One download of one blob into a temp file, readable while it grows."""

    def __init__(self, digest: Digest, temp: Path | None, expected_size: int | None,
                 on_reader: Callable[[Digest, int], None] | None = None) -> None:
        self.digest = digest
        self.temp = temp
        self.expected_size = expected_size
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.readers = 0
        self.final: Path | None = None
        self.reserved = 0
        self.window: RelayWindow | None = None  # set when the disk is full
        self._positions: dict[object, int] = {}
        self._on_reader = on_reader
        self._changed = asyncio.Event()
        self._moved = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.source = ""  # where the bytes come from: a registry name, or "s3"

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _notify_moved(self) -> None:
        event, self._moved = self._moved, asyncio.Event()
        event.set()

    @property
    def relay_from(self) -> int | None:
        """Where the disk stopped (bytes from here on are in memory), or ``None``."""
        return self.window.start if self.window is not None else None

    def start_relay(self) -> None:
        """The disk is full: from now on bytes go to readers from memory."""
        self.window = RelayWindow(self.written, relay.RELAY_MAX_BYTES)

    def relay(self, chunk: bytes) -> None:
        """``chunk`` arrived while relaying: hand it to readers through the window."""
        assert self.window is not None
        self.window.append(chunk)
        self.advance(len(chunk))
        self.window.trim(self._positions.values(), self.written)

    async def relay_backpressure(self) -> bool:
        """Wait while the window is full and readers lag; ``False`` if nobody can read on."""
        window = self.window
        assert window is not None
        window.trim(self._positions.values(), self.written)
        while window.full and self._positions:
            await self._moved.wait()
            window.trim(self._positions.values(), self.written)
        return not (self.readers == 0 and window.dropped)

    async def unread(self) -> None:
        """Wait until no reader reads this fill."""
        while self.readers:
            await self._moved.wait()

    def _from_window(self, offset: int, count: int) -> bytes:
        data = self.window.read(offset, count) if self.window is not None else None
        if data is None:
            raise FillError(f"reader of {self.digest} fell behind the in-memory relay of a "
                            "full disk")
        return data

    def set_size(self, size: int | None) -> None:
        """The total size became known (or is unknown until the end)."""
        self.size = size
        self._notify()

    def advance(self, count: int) -> None:
        """``count`` more bytes are on disk."""
        self.written += count
        self._notify()

    def finish(self, final: Path | None) -> None:
        """The blob was verified and published at ``final`` (``None``: verified, not kept)."""
        self.final = final
        self.size = self.written
        self.done = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        """The download failed: readers must abort."""
        self.error = error
        self.done = True
        self._notify()

    async def wait_size(self) -> int:
        """Wait until the total size is known and return it.

        Raises:
            OciError: the fill failed before any byte arrived; the request can
                still answer with a proper error.
            FillError: it failed otherwise.
        """
        while True:
            self._raise_if_failed(before_headers=True)
            if self.size is not None:
                return self.size
            await self._changed.wait()

    async def wait_done(self) -> None:
        """Wait until the blob is verified and published.

        Raises:
            FillError: it failed.
        """
        while not self.done:
            await self._changed.wait()
        self._raise_if_failed(before_headers=False)

    def _open(self) -> int:
        if self.temp is None:
            return -1  # no room for even an empty temp file: every byte comes from memory
        try:
            return os.open(self.temp, os.O_RDONLY)
        except FileNotFoundError:
            # Published (renamed) between joining and opening.
            if self.final is None:
                raise FillError(f"download of {self.digest} vanished") from None
            return os.open(self.final, os.O_RDONLY)

    def _raise_if_failed(self, *, before_headers: bool) -> None:
        if self.error is None:
            return
        if before_headers and isinstance(self.error, OciError):
            raise self.error
        raise FillError(f"download of {self.digest} failed: {self.error}") from self.error

    async def read(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield bytes ``start`` to ``end`` (exclusive) as they reach the disk.

        Raises:
            FillError: the download failed; the caller must abort its response.
        """
        fd = await asyncio.to_thread(self._open)
        self.readers += 1
        token = object()
        if self._on_reader is not None:
            self._on_reader(self.digest, 1)
        metrics.FILL_READERS.inc()
        try:
            offset = start
            if start >= end:
                await self.wait_done()
            while offset < end:
                self._raise_if_failed(before_headers=False)
                self._positions[token] = offset
                self._notify_moved()
                available = min(self.written, end) - offset
                if available <= 0:
                    await self._changed.wait()
                    continue
                data = await self._chunk(fd, offset, min(available, chunk_size))
                if not data:
                    raise FillError(f"temp file of {self.digest} is shorter than announced")
                self._positions[token] = offset + len(data)  # held in ``data`` now
                self._notify_moved()
                if offset + len(data) >= end:
                    # The last bytes go out only once the blob is verified: a
                    # client must never finish cleanly on bytes that prove wrong.
                    await self.wait_done()
                offset += len(data)
                yield data
        finally:
            self.readers -= 1
            self._positions.pop(token, None)
            self._notify_moved()
            if self._on_reader is not None:
                self._on_reader(self.digest, -1)
            metrics.FILL_READERS.dec()
            if fd >= 0:
                await asyncio.to_thread(os.close, fd)

    async def _chunk(self, fd: int, offset: int, count: int) -> bytes:
        relay_from = self.relay_from
        if relay_from is not None and offset >= relay_from:
            return self._from_window(offset, count)
        if relay_from is not None:
            count = min(count, relay_from - offset)
        return await asyncio.to_thread(os.pread, fd, count, offset)


class Fetcher:
    """Owns every fill of this node: one per digest."""

    def __init__(self, store: FilesystemStore, chunk_size: int = 1 << 20,
                 space: Space | None = None) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.space: Space = space or Unbounded()
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every fill's task, joinable or not
        self._reading: Counter[Digest] = Counter()

    def current(self, digest: Digest) -> Fill | None:
        """The fill under way for ``digest``, if any."""
        return self._fills.get(digest)

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
        """Join the fill of ``digest`` or start one.

        Returns:
            The fill, and whether this call joined one already under way.
        """
        existing = self._fills.get(digest)
        if existing is not None:
            metrics.FILL_JOINS.inc()
            return existing, True
        # mkstemp is a single metadata call: cheap enough here, and readers
        # that join from now on need the file to exist.
        temp: Path | None = None
        try:
            fd, temp = self.store.new_temp()
            os.close(fd)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            # Not even an empty file fits: the fill relays from memory from byte 0.
        fill = Fill(digest, temp, expected_size, self._count_reader)
        fill.source = registry
        self._fills[digest] = fill
        fill.task = asyncio.ensure_future(self._run(fill, opener, registry))
        self._tasks.add(fill.task)
        fill.task.add_done_callback(self._tasks.discard)
        return fill, False

    async def close(self) -> None:
        """Cancel every fill (at shutdown) and wait for their cleanup."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        metrics.FILLS_IN_FLIGHT.inc()
        writer = _TempWriter(fill.temp, fill.digest)
        unkept = None
        try:
            await self._download(fill, opener, registry, writer)
            durable = await asyncio.to_thread(writer.verify_and_close, fill.size,
                                              fill.expected_size, fill.relay_from is None)
            self._release(fill)
            unkept = await self._publish(fill, durable)
            metrics.FILLS.labels("ok").inc()
            log.info("fill_done", digest=str(fill.digest), bytes=fill.written, registry=registry,
                     kept=unkept is None)
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            metrics.FILLS.labels(reason).inc()
            if isinstance(exc, DigestMismatch):
                metrics.UPSTREAM_ERRORS.labels(registry, "digest_mismatch").inc()
            log.warning("fill_failed", digest=str(fill.digest), registry=registry,
                        bytes=fill.written, error=str(exc) or type(exc).__name__)
            # Clean up before telling readers, so no one sees a half-removed fill.
            await asyncio.shield(asyncio.to_thread(writer.discard))
            fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._release(fill)
            metrics.FILLS_IN_FLIGHT.dec()
            self._forget(fill)
        if unkept is not None:
            try:
                await self._discard_after_readers(fill)
            finally:  # also at shutdown: open readers keep their bytes through their fd
                await asyncio.shield(asyncio.to_thread(writer.discard))

    def _release(self, fill: Fill) -> None:
        if fill.reserved:
            self.space.release(fill.reserved)
            fill.reserved = 0

    async def _publish(self, fill: Fill, durable: bool) -> str | None:
        """Publish a verified blob if it may be kept; else the reason it is not."""
        reason = None
        temp = fill.temp
        if fill.relay_from is not None or not durable or temp is None:
            reason = "disk_full"
        elif not self.space.fits(fill.written):
            reason = "too_large"
        elif not await self.space.admit(fill.written):
            reason = "no_room"
        if reason is None and temp is not None:
            try:
                fill.finish(await asyncio.to_thread(self.store.publish_blob, temp, fill.digest))
                return None
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                reason = "disk_full"
        reason = reason or "disk_full"  # (no temp file means a full disk)
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
                        writer: _TempWriter) -> None:
        attempts = 0
        while True:
            try:
                async with opener(fill.written) as response:
                    _check_response(response, fill)
                    if not fill.reserved and fill.size and self.space.fits(fill.size):
                        fill.reserved = fill.size
                        await self.space.reserve(fill.size)
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

    async def _copy_body(self, fill: Fill, response: BodyResponse, registry: str,
                         writer: _TempWriter) -> None:
        upstream_bytes = metrics.UPSTREAM_BYTES.labels(registry)
        while True:
            chunk = await _read_chunk(response.content, self.chunk_size)
            if not chunk:
                break
            if fill.size is not None and fill.written + len(chunk) > fill.size:
                raise UpstreamUnavailable("upstream sent more bytes than announced", status=502)
            upstream_bytes.inc(len(chunk))
            await self._store_chunk(fill, writer, chunk)
        if fill.size is not None and fill.written < fill.size:
            raise aiohttp.ClientPayloadError(f"body ended at {fill.written} of {fill.size} bytes")

    async def _store_chunk(self, fill: Fill, writer: _TempWriter, chunk: bytes) -> None:
        if fill.relay_from is None:
            try:
                await asyncio.to_thread(writer.write, chunk)
                fill.advance(len(chunk))
                return
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                if await self._room_after_full(fill, writer, chunk):
                    return
        await asyncio.to_thread(writer.hash_only, chunk)
        fill.relay(chunk)
        if not await fill.relay_backpressure():
            raise UpstreamUnavailable("no reader is left for a blob the full disk cannot hold",
                                      status=503)

    async def _room_after_full(self, fill: Fill, writer: _TempWriter, chunk: bytes) -> bool:
        """ENOSPC: evict and retry the write once; else switch the fill to a relay."""
        remaining = (fill.size - fill.written) if fill.size else len(chunk)
        freed = await self.space.make_room(max(remaining, len(chunk)))
        if freed > 0:
            try:
                await asyncio.to_thread(writer.write, chunk)
            except OSError as exc:
                if exc.errno not in _FULL:
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


def _check_response(response: BodyResponse, fill: Fill) -> None:
    """Accept a 200 for a fresh start, or a 206 that resumes exactly where we stopped."""
    if response.status == 404:
        raise BlobUnknown(f"blob {fill.digest} is unknown upstream")
    if fill.written == 0 and response.status == 200:
        length = response.content_length
        if fill.expected_size is not None and length is not None and length != fill.expected_size:
            raise UpstreamUnavailable(f"upstream announced {length} bytes for a blob of "
                                      f"{fill.expected_size}", status=502)
        fill.set_size(length if length is not None else fill.expected_size)
        return
    if fill.written > 0 and response.status == 206:
        expected = f"bytes {fill.written}-"
        if not response.headers.get("Content-Range", "").startswith(expected):
            raise UpstreamUnavailable("upstream resumed at the wrong offset", status=502)
        return
    if response.status == 200 and fill.written > 0:
        raise UpstreamUnavailable("upstream cannot resume a dropped download", status=502)
    raise UpstreamUnavailable(f"upstream answered {response.status} for blob {fill.digest}",
                              status=502)


async def _read_chunk(content: BodyReader, size: int) -> bytes:
    """Up to ``size`` bytes: waits for some, then takes whatever is buffered."""
    chunk = await content.read(size)
    if not chunk:
        return chunk
    parts = [chunk]
    total = len(chunk)
    while total < size:
        more = content.read_nowait(size - total)
        if not more:
            break
        parts.append(more)
        total += len(more)
    return chunk if len(parts) == 1 else b"".join(parts)


class _TempWriter:
    """Appends to a fill's temp file and hashes what it writes (runs in a thread)."""

    def __init__(self, path: Path | None, digest: Digest) -> None:
        self.path = path
        self.digest = digest
        self._hasher: Any = digest.hasher()
        self._fd: int | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        """Write ``data`` at the end of what was written before (a failed write is retried
        at the same offset: bytes a partial write left behind are overwritten)."""
        if self.path is None:
            raise OSError(errno.ENOSPC, "no temp file: the disk is full")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        view = memoryview(data)
        offset = self.size
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        self.hash_only(data)

    def hash_only(self, data: bytes) -> None:
        """Account for bytes that were not written (relayed from memory)."""
        self._hasher.update(data)
        self.size += len(data)

    def verify_and_close(self, size: int | None, expected_size: int | None,
                         sync: bool = True) -> bool:
        """Check size and digest, fsync, close.

        Returns:
            Whether the bytes are durable on disk (``False``: fsync found the disk full).

        Raises:
            UpstreamUnavailable: the bytes are not the blob that was asked for.
        """
        durable = sync and self.path is not None
        if self._fd is None and self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY)
        try:
            if durable and self._fd is not None:
                os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            durable = False
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
        if expected_size is not None and self.size != expected_size:
            raise UpstreamUnavailable(f"upstream sent {self.size} bytes for a blob of "
                                      f"{expected_size}", status=502)
        if size is not None and self.size != size:
            raise UpstreamUnavailable(f"upstream sent {self.size} bytes, announced {size}",
                                      status=502)
        if self._hasher.hexdigest() != self.digest.hex:
            raise DigestMismatch(f"upstream sent bytes that do not match {self.digest}")
        return durable

    def discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
