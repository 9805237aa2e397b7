"""The body a fill copies: how it is opened, which answers are accepted, chunked reads."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from mirror.errors import BlobUnknown, UpstreamUnavailable
from mirror.fetch.fill import Fill
from mirror.storage.base import BodyReader, BodyResponse

#: Opens the body of a blob from a byte offset (0, or a resume point): an upstream
#: ``aiohttp.ClientResponse``, or any source with the same small interface (S3).
UpstreamOpener = Callable[[int], AbstractAsyncContextManager[BodyResponse]]


def check_response(response: BodyResponse, fill: Fill) -> None:
    """Accept a 200 for a fresh start, or a 206 that resumes exactly where we stopped."""
    if response.status == 404:
        raise BlobUnknown(f"blob {fill.digest} is unknown upstream")
    if fill.written == 0 and response.status == 200:
        length = response.content_length
        if length is None:
            fill.set_size(fill.expected_size)  # a hint from a manifest, or unknown till the end
            return
        # Upstream's own length wins over a manifest's hint; the digest decides in the end.
        fill.hint_wrong = fill.expected_size is not None and length != fill.expected_size
        fill.expected_size = None
        fill.set_size(length)
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


async def read_chunk(content: BodyReader, size: int) -> bytes:
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
