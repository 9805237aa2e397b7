"""The in-memory window of a fill that the full disk could not hold.

When a write fails with ENOSPC and eviction cannot make room, a fill keeps
downloading and hands the rest of the blob to its readers from memory. The
window holds the bytes from where the disk stopped; it is bounded: once it is
full, bytes every reader has passed are dropped, and the download waits for
the slowest reader (see :meth:`mirror.fetch.Fill.relay_backpressure`). Pure
data, no I/O; the fill owns the readers' positions and the waiting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

#: Bytes a relay keeps in memory for readers of a blob the full disk cannot hold.
RELAY_MAX_BYTES = 64 << 20


class RelayWindow:
    """Bytes ``start`` onwards of a blob, in memory, of which a bounded tail is kept."""

    def __init__(self, start: int, max_bytes: int = RELAY_MAX_BYTES) -> None:
        self.start = start  # where the disk stopped: bytes before it are in the temp file
        self.max_bytes = max_bytes
        self._chunks: deque[bytes] = deque()
        self._first = start  # offset of the first byte still held
        self.bytes = 0

    @property
    def full(self) -> bool:
        """Whether the window holds more than its bound."""
        return self.bytes > self.max_bytes

    @property
    def dropped(self) -> bool:
        """Whether bytes were dropped (a reader that has not started can no longer join)."""
        return self._first > self.start

    def holds(self, offset: int) -> bool:
        """Whether the byte at ``offset`` is still held, or is yet to come (not dropped)."""
        return offset >= self._first

    def append(self, chunk: bytes) -> None:
        """The next bytes of the blob."""
        self._chunks.append(chunk)
        self.bytes += len(chunk)

    def trim(self, positions: Iterable[int], written: int) -> None:
        """Drop what every reader has passed, once the window is full.

        Args:
            positions: the next offset each reader needs.
            written: bytes received in all (what to keep when nobody reads).
        """
        if not self.full:
            return
        low = min(positions, default=written)
        while self._chunks and self._first + len(self._chunks[0]) <= low:
            dropped = self._chunks.popleft()
            self._first += len(dropped)
            self.bytes -= len(dropped)

    def read(self, offset: int, count: int) -> bytes | None:
        """Up to ``count`` bytes at ``offset``, or ``None`` when they were dropped."""
        if offset < self._first:
            return None
        position = self._first
        for chunk in self._chunks:
            if offset < position + len(chunk):
                return chunk[offset - position:offset - position + count]
            position += len(chunk)
        return None
