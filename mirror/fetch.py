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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiohttp
import structlog

from mirror import metrics
from mirror.errors import BlobUnknown, FillError, OciError, UpstreamUnavailable
from mirror.oci import Digest
from mirror.storage.base import BodyReader, BodyResponse
from mirror.storage.filesystem import FilesystemStore

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Opens the body of a blob from a byte offset (0, or a resume point): an upstream
#: ``aiohttp.ClientResponse``, or any source with the same small interface (S3).
UpstreamOpener = Callable[[int], AbstractAsyncContextManager[BodyResponse]]

RESUME_ATTEMPTS = 3


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

    def __init__(self, digest: Digest, temp: Path, expected_size: int | None) -> None:
        self.digest = digest
        self.temp = temp
        self.expected_size = expected_size
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.readers = 0
        self.final: Path | None = None
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.source = ""  # where the bytes come from: a registry name, or "s3"

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def set_size(self, size: int | None) -> None:
        """The total size became known (or is unknown until the end)."""
        self.size = size
        self._notify()

    def advance(self, count: int) -> None:
        """``count`` more bytes are on disk."""
        self.written += count
        self._notify()

    def finish(self, final: Path) -> None:
        """The blob was verified and published at ``final``."""
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
        metrics.FILL_READERS.inc()
        try:
            offset = start
            if start >= end:
                await self.wait_done()
            while offset < end:
                self._raise_if_failed(before_headers=False)
                available = min(self.written, end) - offset
                if available <= 0:
                    await self._changed.wait()
                    continue
                data = await asyncio.to_thread(os.pread, fd, min(available, chunk_size), offset)
                if not data:
                    raise FillError(f"temp file of {self.digest} is shorter than announced")
                if offset + len(data) >= end:
                    # The last bytes go out only once the blob is verified: a
                    # client must never finish cleanly on bytes that prove wrong.
                    await self.wait_done()
                offset += len(data)
                yield data
        finally:
            self.readers -= 1
            metrics.FILL_READERS.dec()
            await asyncio.to_thread(os.close, fd)


class Fetcher:
    """Owns every fill of this node: one per digest."""

    def __init__(self, store: FilesystemStore, chunk_size: int = 1 << 20) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self._fills: dict[Digest, Fill] = {}

    def current(self, digest: Digest) -> Fill | None:
        """The fill under way for ``digest``, if any."""
        return self._fills.get(digest)

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
        fd, temp = self.store.new_temp()
        os.close(fd)
        fill = Fill(digest, temp, expected_size)
        fill.source = registry
        self._fills[digest] = fill
        fill.task = asyncio.ensure_future(self._run(fill, opener, registry))
        return fill, False

    async def close(self) -> None:
        """Cancel every fill (at shutdown) and wait for their cleanup."""
        tasks = [f.task for f in self._fills.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, fill: Fill, opener: UpstreamOpener, registry: str) -> None:
        metrics.FILLS_IN_FLIGHT.inc()
        writer = _TempWriter(fill.temp, fill.digest)
        try:
            await self._download(fill, opener, registry, writer)
            await asyncio.to_thread(writer.verify_and_close, fill.size, fill.expected_size)
            final = await asyncio.to_thread(self.store.publish_blob, fill.temp, fill.digest)
            fill.finish(final)
            metrics.FILLS.labels("ok").inc()
            log.info("fill_done", digest=str(fill.digest), bytes=fill.written, registry=registry)
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
            metrics.FILLS_IN_FLIGHT.dec()
            self._fills.pop(fill.digest, None)

    async def _download(self, fill: Fill, opener: UpstreamOpener, registry: str,
                        writer: _TempWriter) -> None:
        attempts = 0
        while True:
            try:
                async with opener(fill.written) as response:
                    _check_response(response, fill)
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
            await asyncio.to_thread(writer.write, chunk)
            upstream_bytes.inc(len(chunk))
            fill.advance(len(chunk))
        if fill.size is not None and fill.written < fill.size:
            raise aiohttp.ClientPayloadError(f"body ended at {fill.written} of {fill.size} bytes")


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

    def __init__(self, path: Path, digest: Digest) -> None:
        self.path = path
        self.digest = digest
        self._hasher: Any = digest.hasher()
        self._fd: int | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hasher.update(data)
        self.size += len(data)

    def verify_and_close(self, size: int | None, expected_size: int | None) -> None:
        """Check size and digest, fsync, close.

        Raises:
            UpstreamUnavailable: the bytes are not the blob that was asked for.
        """
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.fsync(self._fd)
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

    def discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
