"""The one blob writer: a temp file in the store's own folder, written in order, hashed
as written, verified at the end; the store publishes it by rename only after that.

Used by fills (:mod:`mirror.fetch`) and by the local store's
:class:`~mirror.storage.local.LocalBlobWriter` (imports, tier-to-tier copies). A write
that fails with ENOSPC or EDQUOT (:data:`DISK_FULL_ERRNOS`) is the
fetcher's to handle: it makes room and retries, or relays from memory and only
hashes what it could not write (:meth:`TempWriter.hash_only`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

from mirror.errors import DigestMismatch
from mirror.oci import Digest

#: The errors of a write that found the disk (or the quota) full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class TempWriter:
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
            self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
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
            DigestMismatch: the bytes are not the blob that was asked for.
        """
        durable = sync and self.path is not None
        if self._fd is None and self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            if durable and self._fd is not None:
                os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            durable = False
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
        if expected_size is not None and self.size != expected_size:
            raise DigestMismatch(f"{self.size} bytes arrived for a blob of {expected_size}")
        if size is not None and self.size != size:
            raise DigestMismatch(f"{self.size} bytes arrived, {size} were announced")
        if self._hasher.hexdigest() != self.digest.hex:
            raise DigestMismatch(f"the bytes that arrived do not hash to {self.digest}")
        return durable

    def restart(self) -> None:
        """Forget everything written: the next write starts the file again at byte 0."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            os.truncate(self.path, 0)
        self._hasher = self.digest.hasher()
        self.size = 0

    def discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
