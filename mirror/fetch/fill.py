"""One fill: a blob's temp file, readable by every request while it grows.

Readers follow the bytes on disk; when the disk is full (see
:meth:`Fill.start_relay`) they read the rest from a bounded window in memory
(:class:`mirror.fetch.relay.RelayWindow`) that the download waits on.

A reader that wants bytes far beyond what the download has reached (a lazy
client's footer, table of contents, chunks), or bytes a relay's window has
already dropped (a late reader of a blob that is not kept), reads them from a
ranged request to the sources instead (a :data:`RangeOpener`), relayed as they
arrive and checked against the blob's size, while the one download goes on
for everyone. Those bytes are never written into the fill: only the verified
download is ever kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

from mirror import metrics
from mirror.errors import FillError, OciError
from mirror.fetch.relay import RELAY_MAX_BYTES, RelayWindow
from mirror.oci import Digest
from mirror.storage.base import BodyResponse

log = structlog.get_logger(__name__)

#: The most bytes one :class:`FileSpan` covers (a reader far behind catches up in steps).
SPAN_MAX = 16 * 2**20
#: How long a relay holds its bytes for the request that started it to begin reading.
FIRST_READER_WAIT = 10.0
#: A reader this many bytes (or more) ahead of the download reads from a ranged request.
RANGE_AHEAD = 8 * 2**20

#: Opens bytes ``start`` to ``end`` (exclusive) of a blob at its sources, for one reader:
#: a ``206`` body (see :meth:`mirror.sources.SourceChain.open_range`).
RangeOpener = Callable[[int, int], AbstractAsyncContextManager[BodyResponse]]
#: What a ranged request may fail with before its first byte (the reader then waits for
#: the download instead).
_RANGE_FAILURES = (OciError, aiohttp.ClientError, TimeoutError, OSError)


class _RangeRefused(Exception):
    """A ranged request gave no usable answer before its first byte."""


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Bytes of a fill that are on disk: ``count`` bytes of ``fd`` from ``offset``."""

    fd: int
    offset: int
    count: int


class Fill:
    """One download of one blob into a temp file, readable while it grows."""

    def __init__(self, digest: Digest, temp: Path | None, expected_size: int | None,
                 on_reader: Callable[[Digest, int], None] | None = None,
                 relay_max_bytes: int = RELAY_MAX_BYTES) -> None:
        self.digest = digest
        self.temp = temp
        self.expected_size = expected_size  # a size hint; None once upstream says a length
        self.hint = expected_size  # the hint this fill started with
        self.hint_wrong = False  # upstream's Content-Length contradicted the hint
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.readers = 0
        self.final: Path | None = None
        # Where a verified blob is renamed to; known before ``finish`` says so, for a
        # reader that opens in the moment between the rename and ``finish``.
        self.destination: Path | None = None
        self.reserved = 0
        self.window: RelayWindow | None = None  # set when the bytes are not written
        self.relay_reason: str | None = None  # disk_full | too_large
        self._first_reader = asyncio.Event()
        self._relay_max_bytes = relay_max_bytes
        self._positions: dict[object, int] = {}
        self._on_reader = on_reader
        self._changed = asyncio.Event()
        self._moved = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # Bumped when the temp file at ``temp`` is replaced (another worker took a fill
        # over with a new file) or started over: readers then open it again.
        self.generation = 0
        self.file_id: int | None = None  # the inode of the temp file bytes are counted in
        # A descriptor of the verified file of a fill that is not kept, held while the fill
        # is referenced: its readers read it even after its name is removed or reused.
        self._kept_fd: int | None = None
        self.started_at = time.time()  # wall clock: compared with files' mtimes
        self.registry = ""  # the registry it was asked of (a configured name)
        self.source = ""  # the kind of source the bytes come from: upstream, s3, ...
        self.ever_read = False  # a reader has taken bytes (the fill can no longer start over)
        # Paces the download while no client reads it (warming's bandwidth cap): awaited
        # with each chunk's size; a client that joins lifts it at once.
        self.pace: Callable[[int], Awaitable[None]] | None = None

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

    def start_relay(self, reason: str = "disk_full") -> None:
        """From now on bytes go to readers from memory: the disk is full, or the blob
        is too large to keep."""
        self.window = RelayWindow(self.written, self._relay_max_bytes)
        self.relay_reason = reason

    @property
    def joinable(self) -> bool:
        """Whether a new reader can still read this fill from its first byte."""
        return self.window is None or not self.window.dropped

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
        if window.full and not self._first_reader.is_set():
            # The request that started the fill has not begun reading yet: hold the bytes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_reader.wait(), FIRST_READER_WAIT)
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

    def replaced(self, written: int, file_id: int | None = None) -> None:
        """The temp file was replaced (or started over) and holds ``written`` bytes:
        readers open it again, and wait for bytes they had passed until they are back."""
        self.generation += 1
        self.file_id = file_id
        self.written = written
        log.info("fill_file_replaced", digest=str(self.digest), bytes=written,
                 generation=self.generation)
        self._notify()

    def restart(self) -> None:
        """Start over from byte 0 (wrong bytes from a source, before any reader took some)."""
        assert not self.ever_read
        self.written = 0
        self.size = None
        self._notify()

    def finish(self, final: Path | None) -> None:
        """The blob was verified and published at ``final`` (``None``: verified, not kept)."""
        self.final = final
        self.size = self.written
        self.done = True
        self._notify()

    def hold(self, fd: int) -> None:
        """Keep ``fd``, an open descriptor of the fill's verified file that is not kept,
        for readers that open it late (after its name was removed, or reused by the next
        fill of the digest); closed when the fill is gone."""
        self._kept_fd = fd
        weakref.finalize(self, _close_quietly, fd)

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

    def _open(self) -> tuple[int, int | None]:
        """A descriptor of the temp file (or of the published blob) and its inode, or
        ``-1`` when there is no file yet: another worker's claim is taken but its file
        not yet created, or it is being replaced (the reader opens it once bytes are
        there)."""
        if self._kept_fd is not None:
            fd = os.dup(self._kept_fd)
            return fd, os.fstat(fd).st_ino
        if self.temp is None:
            return -1, None  # no room for even an empty temp file: all bytes from memory
        # Once published, the blob only: the temp file's name (a claim's .part name) may
        # already be another fill's. Before, the temp file may have been published
        # (renamed) between joining and opening, maybe before ``finish`` ran on the loop.
        paths = (self.final,) if self.final is not None else (self.temp, self.destination)
        for path in paths:
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            return fd, os.fstat(fd).st_ino
        return -1, None

    async def _reopen(self, fd: int) -> tuple[int, int | None]:
        """Open the fill's current file for a reader whose ``fd`` is stale or missing.

        Raises:
            FillError: the fill is over and its file is gone.
        """
        if fd >= 0:
            await asyncio.to_thread(os.close, fd)
        while True:
            fd, file_id = await asyncio.to_thread(self._open)
            if fd >= 0 and not self._other_file(file_id):
                return fd, file_id
            if fd >= 0:
                await asyncio.to_thread(os.close, fd)
            self._raise_if_failed(before_headers=False)
            if self.done and fd < 0:
                raise FillError(f"download of {self.digest} vanished")
            await self._changed.wait()  # created, replaced or published any moment now

    def _other_file(self, file_id: int | None) -> bool:
        """Whether ``file_id`` is not the file the fill counts its bytes in (the fill
        has not seen the new one yet)."""
        return not self.done and self.file_id is not None and file_id != self.file_id

    def _stale(self, fd: int, generation: int, file_id: int | None) -> bool:
        """Whether a reader's descriptor is not of the fill's current file."""
        return fd < 0 or generation != self.generation or self._other_file(file_id)

    def _raise_if_failed(self, *, before_headers: bool) -> None:
        if self.error is None:
            return
        if before_headers and isinstance(self.error, OciError):
            raise self.error
        raise FillError(f"download of {self.digest} failed: {self.error}") from self.error

    async def read(self, start: int, end: int, chunk_size: int,
                   ranges: RangeOpener | None = None) -> AsyncIterator[bytes]:
        """Yield bytes ``start`` to ``end`` (exclusive) as they reach the disk.

        Raises:
            FillError: the download failed; the caller must abort its response.
        """
        async for piece in self.pieces(start, end, chunk_size, spans=False, ranges=ranges):
            assert isinstance(piece, bytes)
            yield piece

    async def pieces(self, start: int, end: int, chunk_size: int, *, spans: bool,
                     ranges: RangeOpener | None = None) -> AsyncIterator[bytes | FileSpan]:
        """Like :meth:`read`; with ``spans``, what is on disk comes as :class:`FileSpan`
        (up to ``SPAN_MAX`` bytes each) for the caller to sendfile, and only bytes
        relayed from memory after a full disk come as bytes.

        The piece that reaches the blob's end is yielded only once the blob is
        verified: a client must never finish cleanly on bytes that prove wrong. A
        range that ends before the blob does (a lazy client's chunk) cannot be
        verified by anyone but its client, and is not held back for the whole
        download (as a ranged answer from the sources is not).

        Args:
            ranges: how this reader may ask the sources for a range itself: used when
                ``start`` is far beyond the download (or dropped from a relay's window);
                without it, the reader waits for the download.
        """
        self.ever_read = True
        token = object()
        fd, file_id = await self._join(token, start)
        self.readers += 1
        if self._on_reader is not None:
            self._on_reader(self.digest, 1)
        metrics.FILL_READERS.inc()
        generation = self.generation
        try:
            offset = start
            if start >= end:
                await self.wait_done()
            while offset < end:
                self._raise_if_failed(before_headers=False)
                if ranges is not None and self._out_of_reach(offset, end):
                    async for data in self._instead(token, ranges, offset, end, chunk_size):
                        offset += len(data)
                        yield data
                    ranges = None  # all read, or refused: follow the download from here
                    continue
                self._positions[token] = offset
                self._notify_moved()
                available = min(self.written, end) - offset
                if available <= 0:
                    await self._changed.wait()
                    continue
                if self._from_disk(offset) and self._stale(fd, generation, file_id):
                    generation = self.generation
                    fd, file_id = await self._reopen(fd)
                    continue  # the file may have changed meanwhile: look again
                piece: bytes | FileSpan | None = None
                if spans:
                    piece = self._span(fd, offset, available)
                if piece is None:
                    data = await self._chunk(fd, offset, min(available, chunk_size))
                    if not data:
                        raise FillError(f"temp file of {self.digest} is shorter than announced")
                    piece = data
                count = piece.count if isinstance(piece, FileSpan) else len(piece)
                self._positions[token] = offset + count  # in the caller's hands now
                self._notify_moved()
                if offset + count >= end and (self.size is None or end >= self.size):
                    await self.wait_done()
                    self._raise_if_failed(before_headers=False)
                offset += count
                yield piece
        finally:
            await self._leave(token, fd)

    async def _leave(self, token: object, fd: int) -> None:
        """A reader is done (or gone): forget its place and close its file."""
        self.readers -= 1
        self._positions.pop(token, None)
        self._notify_moved()
        if self._on_reader is not None:
            self._on_reader(self.digest, -1)
        metrics.FILL_READERS.dec()
        if fd >= 0:
            await asyncio.to_thread(os.close, fd)

    async def _join(self, token: object, start: int) -> tuple[int, int | None]:
        """Take a reader's place at ``start`` (a relay keeps the bytes from there) and open
        the temp file for it."""
        self._positions[token] = start
        self._first_reader.set()
        try:
            return await asyncio.to_thread(self._open)
        except BaseException:
            self._positions.pop(token, None)
            self._notify_moved()
            raise

    def _from_disk(self, offset: int) -> bool:
        """Whether the byte at ``offset`` is read from the temp file (not from memory)."""
        relay_from = self.relay_from
        return self.temp is not None and (relay_from is None or offset < relay_from)

    def _span(self, fd: int, offset: int, available: int) -> FileSpan | None:
        """The bytes from ``offset`` that are on disk, or ``None`` (relayed from memory)."""
        if fd < 0:
            return None
        relay_from = self.relay_from
        if relay_from is not None:
            if offset >= relay_from:
                return None
            available = min(available, relay_from - offset)
        return FileSpan(fd, offset, min(available, SPAN_MAX))

    async def _chunk(self, fd: int, offset: int, count: int) -> bytes:
        relay_from = self.relay_from
        if relay_from is not None and offset >= relay_from:
            return self._from_window(offset, count)
        if relay_from is not None:
            count = min(count, relay_from - offset)
        return await asyncio.to_thread(os.pread, fd, count, offset)

    def _out_of_reach(self, offset: int, end: int) -> bool:
        """Whether a reader of ``offset`` to ``end`` is better served by a ranged request:
        a relay's window has already dropped ``offset``, or the download is at least
        ``RANGE_AHEAD`` bytes from it and the range is no longer than that distance
        (asking for it then costs upstream fewer bytes than the download still has to
        go: a footer, a TOC, a chunk, never most of a blob twice)."""
        if self.size is None:
            return False  # a range is checked against the size: it must be known
        window = self.window
        if window is not None and offset >= window.start and not window.holds(offset):
            return True
        ahead = offset - self.written
        return not self.done and ahead >= max(RANGE_AHEAD, end - offset)

    async def _instead(self, token: object, ranges: RangeOpener, start: int, end: int,
                       chunk_size: int) -> AsyncIterator[bytes]:
        """The reader ``token``'s bytes from a ranged request rather than the download
        (nothing when no source answers the range: the reader follows the download)."""
        self._positions.pop(token, None)  # a relay need not keep bytes for this reader
        self._notify_moved()
        with contextlib.suppress(_RangeRefused):
            async for data in self._ranged(ranges, start, end, chunk_size):
                yield data

    async def _ranged(self, ranges: RangeOpener, start: int, end: int,
                      chunk_size: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` from a ranged request to the sources, as they arrive.

        A whole blob read this way is hashed, and its last chunk held until the
        digest matches, like a fill's.

        Raises:
            _RangeRefused: no usable answer before the first byte (wait for the fill).
            FillError: the answer broke off or proved wrong after bytes went out.
        """
        assert self.size is not None
        hasher = self.digest.hasher() if (start, end) == (0, self.size) else None
        got = start
        try:
            async with ranges(start, end) as response:
                _check_range(response, start, end, self.size)
                metrics.child(metrics.RANGED_READS, "ok").inc()
                held = b""
                while got < end:
                    data = await response.content.read(min(chunk_size, end - got))
                    if not data:
                        raise FillError(f"ranged answer for {self.digest} ended at {got} of "
                                        f"{end} bytes")
                    got += len(data)
                    if hasher is not None:
                        await asyncio.to_thread(hasher.update, data)
                        data, held = held, data
                        if not data:
                            continue
                    yield data
                if hasher is not None:
                    if hasher.hexdigest() != self.digest.hex:
                        raise FillError(f"ranged answer for {self.digest} has other bytes")
                    yield held
        except _RANGE_FAILURES as exc:
            if got > start:
                raise FillError(f"ranged answer for {self.digest} broke off: "
                                f"{type(exc).__name__}") from exc
            metrics.child(metrics.RANGED_READS, "refused").inc()
            log.warning("range_refused", digest=str(self.digest), start=start, end=end,
                        error=f"{type(exc).__name__}: {exc}"[:200], next="the download")
            raise _RangeRefused() from exc


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _check_range(response: BodyResponse, start: int, end: int, size: int) -> None:
    """A ranged answer must be exactly the bytes asked, of a blob of ``size`` bytes.

    Raises:
        OciError: it is not.
    """
    if response.status == 200 and start == 0 and response.content_length in (size, None):
        return  # the whole blob from its start: the bytes asked are its first ones
    if response.status != 206:
        raise OciError(f"a source answered {response.status} to a range request")
    wanted = f"bytes {start}-"
    content_range = response.headers.get("Content-Range", "")
    first, _, total = content_range.partition("/")
    if not first.startswith(wanted) or total != str(size):
        raise OciError(f"a source answered range {content_range!r} to bytes {start}-{end - 1} "
                       f"of {size}")
    last = first[len(wanted):]
    if not last.isdigit() or int(last) < end - 1:
        raise OciError(f"a source answered range {content_range!r} to bytes {start}-{end - 1}")
