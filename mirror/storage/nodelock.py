"""A lock held by one process of the node at a time: ``flock`` on a file in the storage folder.

Worker processes (``server.workers``) and ``mirror`` commands share one storage folder;
decisions that read the node's totals and then act on them (eviction, reservations)
must not interleave across processes. ``flock`` is released by the kernel when its
holder dies, so a ``kill -9`` never leaves the node locked.

Within one process the same open file is shared, so callers also hold an
:class:`asyncio.Lock` (``flock`` does not exclude two holders of one descriptor).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from types import TracebackType


class NodeLock:
    """An exclusive lock across the node's processes (and this process's tasks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._local = asyncio.Lock()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                               | os.O_NOFOLLOW, 0o600)
        return self._fd

    async def __aenter__(self) -> NodeLock:
        await self._local.acquire()
        try:
            fd = self._open()
            taking = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
            try:
                await asyncio.shield(taking)
            except asyncio.CancelledError:
                # The thread cannot be stopped: let go of the lock once it has it.
                taking.add_done_callback(lambda done: _unlock_if_taken(done, fd))
                raise
        except BaseException:
            self._local.release()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # never blocks
        finally:
            self._local.release()

    def close(self) -> None:
        """Close the lock file (the lock must not be held)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _unlock_if_taken(taking: asyncio.Future[None], fd: int) -> None:
    if not taking.cancelled() and taking.exception() is None:
        fcntl.flock(fd, fcntl.LOCK_UN)
