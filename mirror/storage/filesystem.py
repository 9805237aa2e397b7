"""Content-addressed storage on the local file system.

::

    <root>/
      blobs/<algorithm>/<hex[:2]>/<hex>            blob bytes, verified
      manifests/<algorithm>/<hex[:2]>/<hex>        manifest bytes exactly as received
      manifests/<algorithm>/<hex[:2]>/<hex>.type   the manifest's media type
      tags/                                        tag records (see mirror.cache.tags)
      tmp/                                         writes in progress; emptied at start

Nothing appears under ``blobs/`` or ``manifests/`` except by :func:`os.replace`
of a temp file whose digest and size were checked, so a reader never sees a
partial or wrong file. ``tmp/`` is on the same file system, so the rename is
atomic. All methods here block: callers on the event loop run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from mirror.oci import Digest


class FilesystemStore:
    """Blobs and manifests by digest under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tags = root / "tags"

    def prepare(self) -> int:
        """Create the layout and remove temp files left by a crash.

        Returns:
            How many stale temp files were removed.
        """
        for sub in ("blobs", "manifests", "tags"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        removed = 0
        if self.tmp.exists():
            removed = sum(1 for _ in self.tmp.iterdir())
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return removed

    def blob_path(self, digest: Digest) -> Path:
        """Where a verified blob lives."""
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        """Where a verified manifest lives."""
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        """The size of a stored blob, or ``None`` when it is not stored."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def new_temp(self) -> tuple[int, Path]:
        """A new temp file for a write in progress: ``(fd, path)``."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="fill-")
        return fd, Path(name)

    def publish_blob(self, temp: Path, digest: Digest) -> Path:
        """Move a verified temp file into place (atomic rename)."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return target

    def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """The stored bytes and media type of a manifest, or ``None``."""
        path = self.manifest_path(digest)
        try:
            data = path.read_bytes()
            media_type = path.with_name(path.name + ".type").read_text().strip()
        except FileNotFoundError:
            return None
        if not digest.matches(data):
            # Bit rot or tampering: never serve it, let the caller fetch again.
            self.remove_manifest(digest)
            return None
        return data, media_type

    def write_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store verified manifest bytes and their media type.

        The type file is published first: a manifest file never exists
        without its type.
        """
        target = self.manifest_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(target.with_name(target.name + ".type"), media_type.encode())
        self._write_atomic(target, data)

    def remove_manifest(self, digest: Digest) -> None:
        """Delete a stored manifest, if present."""
        path = self.manifest_path(digest)
        for victim in (path, path.with_name(path.name + ".type")):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()

    def remove_blob(self, digest: Digest) -> None:
        """Delete a stored blob, if present."""
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(digest).unlink()

    def _write_atomic(self, target: Path, data: bytes) -> None:
        fd, temp = self.new_temp()
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
