"""Response building: headers clients depend on, Range, sendfile, streaming.

HEAD answers carry exactly the headers of GET. Cached blobs go out with the
kernel's sendfile (:mod:`mirror.server.sendfile`; bounded chunks under TLS),
small ones from memory, in-flight ones from the growing temp file of their fill.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Callable
from typing import IO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from mirror.errors import RangeInvalid
from mirror.oci import Digest, is_number
from mirror.pull import BlobFlight
from mirror.server.sendfile import sendfile, socket_for_sendfile
from mirror.server.state import log_context

BLOB_CACHE_CONTROL = "max-age=31536000, immutable"
#: The most ranges one answer holds (after coalescing): bounded work per request.
RANGES_MAX = 64
#: Range specs one ``Range`` header may list at all (more: 416 without reading them).
RANGE_SPECS_MAX = 1000
#: Ranges closer than this are merged when a request's ranges are coalesced (about what
#: a part's own headers cost).
COALESCE_GAP = 80

#: A byte range ``(start, end)``, ``end`` exclusive.
Span = tuple[int, int]
#: Yields bytes ``start`` to ``end`` of a blob (a cached file, memory, a fill).
PartReader = Callable[[int, int], AsyncIterator[bytes]]


def parse_ranges(header: str | None, size: int) -> list[Span] | None:
    """The byte ranges a ``Range`` header asks for, in the order asked (RFC 9110).

    Each is ``(start, end)`` with ``end`` exclusive. Ranges that lie outside the
    blob are left out when others are satisfiable. Overlapping ranges, or more
    than :data:`RANGES_MAX`, are coalesced (sorted, and merged where less than
    :data:`COALESCE_GAP` bytes apart), as RFC 9110 allows: the work one request
    may ask for is bounded.

    Returns:
        The ranges, or ``None`` for the whole body: no header, or a syntax this
        server ignores (as RFC 9110 allows).

    Raises:
        RangeInvalid: no range lies inside the blob, or too many remain (416).
    """
    if not header or not header.startswith("bytes="):
        return None
    specs = header[6:].split(",")
    if len(specs) > RANGE_SPECS_MAX:
        raise RangeInvalid(f"{len(specs)} ranges in one request; at most {RANGES_MAX} are "
                           "served", size)
    spans: list[Span] = []
    refusal = ""
    for spec in specs:
        try:
            span = _parse_spec(spec.strip(), size)
        except ValueError:
            return None
        if isinstance(span, str):
            refusal = refusal or span
        else:
            spans.append(span)
    if not spans:
        raise RangeInvalid(refusal, size)
    if len(spans) > RANGES_MAX or _overlapping(spans):
        spans = coalesce(spans)
    if len(spans) > RANGES_MAX:
        raise RangeInvalid(f"{len(spans)} distinct ranges in one request; at most "
                           f"{RANGES_MAX} are served", size)
    return spans


def parse_range(header: str | None, size: int) -> Span | None:
    """The single byte range a ``Range`` header asks for (``None``: the whole body,
    several ranges included): what a ``HEAD`` answers, whose headers do not change
    with multi-range requests.

    Raises:
        RangeInvalid: the range lies outside the blob (416).
    """
    if not header or "," in header:
        return None
    spans = parse_ranges(header, size)
    return spans[0] if spans else None


def _parse_spec(spec: str, size: int) -> Span | str:
    """One ``first-last`` or ``-suffix``: the span, or why it is unsatisfiable.

    Raises:
        ValueError: not a range this server reads (the header is then ignored).
    """
    first, sep, last = spec.partition("-")
    if not sep or not (is_number(first) or (not first and is_number(last))):
        raise ValueError(spec)
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "empty suffix range"
        return max(size - suffix, 0), size
    start = int(first)
    if last and (not is_number(last) or int(last) < start):
        raise ValueError(spec)
    if start >= size:
        return f"range starts at {start}, past the end of a {size} byte blob"
    return start, min(int(last) + 1, size) if last else size


def _overlapping(spans: list[Span]) -> bool:
    ordered = sorted(spans)
    return any(b[0] < a[1] for a, b in itertools.pairwise(ordered))


def coalesce(spans: list[Span]) -> list[Span]:
    """``spans`` sorted, with those that overlap or lie less than ``COALESCE_GAP`` apart
    merged into one."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + COALESCE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def blob_headers(digest: Digest, size: int, span: Span | None) -> dict[str, str]:
    """Headers of a blob answer (200 or 206)."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": BLOB_CACHE_CONTROL,
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    return headers


def bytes_response(status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    """An answer from memory whose ``Content-Length`` is always there, 0 included
    (aiohttp leaves it out of a HEAD with an empty body: clients then wait for one)."""
    return web.Response(status=status, body=body,
                        headers={**headers, "Content-Length": str(len(body))})


def manifest_headers(digest: Digest, media_type: str, ns: str | None) -> dict[str, str]:
    """Headers of a manifest answer: the exact stored media type, no parameters."""
    headers = {
        "Content-Type": media_type,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
    }
    if ns:
        headers["OCI-Namespace"] = ns
    return headers


def etag_matches(request: web.Request, digest: Digest) -> bool:
    """Whether ``If-None-Match`` names this digest (quoted or not)."""
    values = request.headers.getall("If-None-Match", [])
    wanted = str(digest)
    return any(tag.strip().strip('"') in (wanted, "*")
               for value in values for tag in value.split(","))


class FileSliceResponse(web.StreamResponse):
    """Sends a slice of an open file with sendfile, then closes the file."""

    def __init__(self, file: IO[bytes], offset: int, count: int, *, status: int,
                 headers: dict[str, str], chunk_size: int,
                 on_close: Callable[[], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__(status=status, headers=headers)
        self._on_close = on_close
        self._on_bytes = on_bytes
        self.content_length = count
        self._file = file
        self._offset = offset
        self._count = count
        self._chunk_size = chunk_size
        self._sent = False

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._sent:
            return await super().prepare(request)
        self._sent = True
        try:
            writer = await super().prepare(request)
            if isinstance(request, web.Request):
                log_context(request)["sent_status"] = self.status  # what a cut client saw
            if request.method != "HEAD" and self._count:
                delivery = Delivery(request, self._count, self._on_bytes)
                await self._send_body(request, writer, delivery)
                await super().write_eof()
            return writer
        finally:
            self._file.close()
            if self._on_close is not None:
                self._on_close()

    async def _send_body(self, request: web.BaseRequest, writer: AbstractStreamWriter | None,
                         delivery: Delivery) -> None:
        transport = request.transport
        if transport is None or writer is None:
            raise ConnectionResetError("client went away")
        if isinstance(writer, StreamWriter):
            writer.send_headers()  # on the wire before the kernel sends the body
        sock_fd = socket_for_sendfile(transport)
        if sock_fd is None:
            # TLS, or headers still buffered: copy in bounded chunks read off the loop.
            await self._copy(writer, delivery)
            return
        await sendfile(sock_fd, self._file.fileno(), self._offset, self._count,
                       on_sent=delivery.sent)

    async def _copy(self, writer: AbstractStreamWriter, delivery: Delivery) -> None:
        fd = self._file.fileno()
        offset, end = self._offset, self._offset + self._count
        while offset < end:
            data = await asyncio.to_thread(os.pread, fd, min(self._chunk_size, end - offset),
                                           offset)
            if not data:
                raise ConnectionResetError("cached blob shrank while being sent")
            await writer.write(data)
            delivery.sent(len(data))
            offset += len(data)


async def stream_fill(request: web.Request, flight: BlobFlight, span: Span | None,
                      headers: dict[str, str], chunk_size: int, *,
                      on_bytes: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Send a blob that is still downloading (the pull service's ``flight``), byte by
    byte as it arrives.

    What is on disk goes out with the kernel's sendfile from the growing temp
    file (no copy through Python, no buffer per reader); bytes relayed from
    memory after a full disk, and everything under TLS, are written.
    ``on_bytes`` is told every body byte handed to the kernel, as it goes.

    Raises:
        FillError: the download failed after headers went out; the caller
            must make sure the connection is aborted, never finished.
    """
    fill, ranges = flight.fill, flight.ranges
    size = fill.size if fill.size is not None else 0
    start, end = span or (0, size)
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    response.content_length = end - start
    writer = await response.prepare(request)
    log_context(request)["sent_status"] = response.status  # what a cut client saw
    if request.method == "HEAD":
        return response
    if isinstance(writer, StreamWriter):
        writer.send_headers()
    transport = request.transport
    sock_fd = socket_for_sendfile(transport) if transport is not None else None
    delivery = Delivery(request, end - start, on_bytes)
    async for piece in fill.pieces(start, end, chunk_size, spans=sock_fd is not None,
                                   ranges=ranges):
        if isinstance(piece, bytes):
            await response.write(piece)
            delivery.sent(len(piece))
        elif (transport is not None and sock_fd is not None
              and socket_for_sendfile(transport) == sock_fd):
            await sendfile(sock_fd, piece.fd, piece.offset, piece.count, on_sent=delivery.sent)
        else:  # bytes still buffered in the transport: never overtake them
            await response.write(await asyncio.to_thread(os.pread, piece.fd, piece.count,
                                                         piece.offset))
            delivery.sent(piece.count)
    await response.write_eof()
    return response


async def send_parts(request: web.Request, spans: list[Span], size: int,
                     headers: dict[str, str], read: PartReader) -> web.StreamResponse:
    """A ``206 multipart/byteranges`` answer (RFC 9110): one part per span, in order,
    each read as it comes (from a file, memory or a fill); its length is known first.

    Raises:
        FillError: a fill failed after headers went out; the caller must make sure
            the connection is aborted, never finished.
    """
    boundary = secrets.token_hex(16)
    heads = [(b"\r\n" if index else b"")
             + (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n").encode()
             for index, (start, end) in enumerate(spans)]
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {key: value for key, value in headers.items() if key != "Content-Range"}
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    response = web.StreamResponse(status=206, headers=headers)
    response.content_length = (sum(map(len, heads)) + len(tail)
                               + sum(end - start for start, end in spans))
    await response.prepare(request)
    log_context(request)["sent_status"] = response.status  # what a cut client saw
    for head, (start, end) in zip(heads, spans, strict=True):
        await response.write(head)
        async for data in read(start, end):
            await response.write(data)
    await response.write(tail)
    _sent_all(request)
    await response.write_eof()
    return response


def memory_parts(data: bytes) -> PartReader:
    """Reads parts of a blob held in memory."""
    async def read(start: int, end: int) -> AsyncIterator[bytes]:
        yield data[start:end]
    return read


def file_parts(file: IO[bytes], chunk_size: int) -> PartReader:
    """Reads parts of an open cached blob in bounded chunks, off the event loop."""
    async def read(start: int, end: int) -> AsyncIterator[bytes]:
        offset = start
        while offset < end:
            data = await asyncio.to_thread(os.pread, file.fileno(),
                                           min(chunk_size, end - offset), offset)
            if not data:
                raise ConnectionResetError("cached blob shrank while being sent")
            offset += len(data)
            yield data
    return read


def _sent_all(request: web.BaseRequest) -> None:
    """The whole body is on its way: the request's log line must not call it cut."""
    if isinstance(request, web.Request):
        log_context(request)["sent_all"] = True


class Delivery:
    """The body bytes of one response as they go out; complete at its ``Content-Length``.

    A client may hang up the moment it has the last byte, before the handler
    returns: once every byte is handed to the kernel, the request's log line
    must not call it cut, and the bytes count as served whatever happens next.
    """

    def __init__(self, request: web.BaseRequest, length: int,
                 on_bytes: Callable[[int], None] | None) -> None:
        self._request = request
        self._length = length
        self._on_bytes = on_bytes
        self.done = 0

    def sent(self, count: int) -> None:
        """``count`` more body bytes were handed to the kernel."""
        if count <= 0:
            return
        self.done += count
        if self._on_bytes is not None:
            self._on_bytes(count)
        if self.done >= self._length:
            _sent_all(self._request)
