"""Content-addressed storage on the local file system.

::

    <root>/
      blobs/<algorithm>/<hex[:2]>/<hex>            blob bytes, verified
      manifests/<algorithm>/<hex[:2]>/<hex>        manifest bytes exactly as received
      manifests/<algorithm>/<hex[:2]>/<hex>.type   the manifest's media type
      tags/                                        tag records (see mirror.cache.tags)
      tmp/                                         writes in progress; emptied at start
      index.db                                     sizes, last use, pins, reservations
                                                   (mirror.storage.index)
      budget.lock                                  held while a process decides on the
                                                   node's bytes (mirror.cache.eviction)

Nothing appears under ``blobs/`` or ``manifests/`` except by :func:`os.replace`
of a temp file whose digest and size were checked, so a reader never sees a
partial or wrong file. ``tmp/`` is on the same file system, so the rename is
atomic. Every publish and removal is recorded in the index after the file
operation, so a crash between the two leaves a file without an entry, which
:meth:`FilesystemStore.startup` adopts. All methods here block: callers on
the event loop run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mirror import metrics
from mirror.oci import HASH_HEX_LENGTH, Digest
from mirror.storage.index import INDEX_NAME, Entry, Index, Key

log = structlog.get_logger(__name__)

#: Index kinds and the folder each lives in.
KINDS = {"blob": "blobs", "manifest": "manifests"}
HASH_BLOCK = 1 << 20
SCAN_THREADS = 8


@dataclass(frozen=True, slots=True)
class Startup:
    """What start-up found and repaired."""

    temp_removed: int
    adopted: int
    dropped: int
    size_mismatch: int
    entries: int
    bytes: int
    seconds: float


class FilesystemStore:
    """Blobs and manifests by digest under one root folder."""

    def __init__(self, root: Path, index: Index | None = None,
                 temp_folder: str | None = None) -> None:
        """Args:
            temp_folder: a worker process's own folder under ``tmp/``: only it is emptied
                at start (the other workers' writes in progress stay).
        """
        self.root = root
        self.tmp = root / "tmp" / temp_folder if temp_folder else root / "tmp"
        self.tags = root / "tags"
        self.index = index if index is not None else Index(root / INDEX_NAME)

    def startup(self) -> Startup:
        """:meth:`open`, then :meth:`reconcile`: the whole start-up in one call."""
        began = time.monotonic()
        removed = self.open()
        result = self.reconcile()
        return Startup(removed, result.adopted, result.dropped, result.size_mismatch,
                       result.entries, result.bytes, time.monotonic() - began)

    def open(self) -> int:
        """Prepare the layout (removing partial temp files) and open the index.

        Enough to serve correctly: content the index does not vouch for is
        hashed before it is served, and a missing file is fetched again.

        Returns:
            How many stale temp files were removed.
        """
        removed = self.prepare()
        self.index.open()
        return removed

    def open_shared(self) -> int:
        """Open the index and the layout beside a server that may be using them.

        Unlike :meth:`open`, ``tmp/`` is left alone: its files may be a running
        server's downloads. For the CLI (``mirror export``, ``mirror import``).
        """
        for sub in ("blobs", "manifests", "tags", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.index.open()
        return 0

    def reconcile(self) -> Startup:
        """Make the index agree with the disk (safe while serving).

        Drops entries whose file is gone and adopts files that have no entry
        (marked unverified: hashed before they are served).
        """
        began = time.monotonic()
        known = self.index.sizes()
        present, unknown = self.scan(known)
        result = self.index.reconcile(known, present, unknown)
        for kind, digest in result.mismatched:
            self._unlink(kind, Digest.parse(digest))
        total, entries = self.index.refresh_totals()  # includes what was stored meanwhile
        return Startup(0, result.adopted, result.dropped, len(result.mismatched),
                       entries, total, time.monotonic() - began)

    def scan(self, known: Mapping[Key, int] | None = None
             ) -> tuple[set[Key], dict[Key, tuple[int, float]]]:
        """Every stored file, by ``os.scandir`` (no hashing).

        Args:
            known: the index's entries; their files are not stat-ed (a published
                file never changes; fsck re-hashes them).

        Returns:
            The keys of every stored file, and ``(size, mtime)`` of the files
            that are not in ``known``. A manifest without its ``.type`` file
            cannot be served and is removed.
        """
        known = known or {}
        folders = [(kind, algorithm, hex_dir) for kind, folder in KINDS.items()
                   for algorithm, hex_dir in _subdirs(self.root / folder)]
        present: set[Key] = set()
        found: dict[Key, tuple[int, float]] = {}
        # Directory reads and stats release the GIL: on a cold page cache, several at
        # once keep the disk busy (measured 2-3x faster than one after another).
        with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
            for keys, stats in pool.map(lambda f: _scan_dir(f[0], f[1], f[2], known), folders):
                present.update(keys)
                found.update(stats)
        return present, found

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

    def path(self, kind: str, digest: Digest) -> Path:
        """Where verified content of ``kind`` (``blob`` or ``manifest``) lives."""
        return self.root / KINDS[kind] / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        """The size of a stored blob, or ``None`` when it is not stored."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def blob_info(self, digest: Digest) -> tuple[int, bool] | None:
        """``(size, verified)`` of a stored blob, or ``None`` when it is not stored."""
        size = self.blob_size(digest)
        if size is None:
            return None
        try:
            entry = self.index.get("blob", str(digest))
        except (sqlite3.Error, RuntimeError):
            entry = None
        return size, entry is not None and entry.verified and entry.size == size

    def verify(self, kind: str, digest: Digest) -> bool | None:
        """Hash stored content: ``True`` if it matches, ``None`` if it is not stored.

        Content that does not match is removed (file and entry) and counted.
        """
        hasher = digest.hasher()
        try:
            with self.path(kind, digest).open("rb") as handle:
                while block := handle.read(HASH_BLOCK):
                    hasher.update(block)
        except FileNotFoundError:
            return None
        if hasher.hexdigest() == digest.hex:
            self._record(lambda: self.index.set_verified(kind, str(digest)))
            return True
        log.warning("corrupt_content_removed", kind=kind, digest=str(digest))
        metrics.CORRUPT.inc()
        self.remove(kind, digest)
        return False

    def remove(self, kind: str, digest: Digest) -> None:
        """Delete stored content (file and entry), if present."""
        self._unlink(kind, digest)
        self._record(lambda: self.index.remove([(kind, str(digest))]))

    def evict(self, entries: list[Entry]) -> int:
        """Delete stored content by entry; returns the bytes freed."""
        for entry in entries:
            self._unlink(entry.kind, Digest.parse(entry.digest))
        return self.index.remove(e.key for e in entries)

    def _unlink(self, kind: str, digest: Digest) -> None:
        path = self.path(kind, digest)
        victims = [path] + ([path.with_name(path.name + ".type")] if kind == "manifest" else [])
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()

    def _record(self, change: Callable[[], object]) -> None:
        """Apply an index change; a failure (disk full) is logged, start-up repairs it."""
        try:
            change()
        except (sqlite3.Error, RuntimeError) as exc:
            metrics.DISK_FULL.labels("index").inc()
            log.warning("index_write_failed", error=str(exc))

    def new_temp(self) -> tuple[int, Path]:
        """A new temp file for a write in progress: ``(fd, path)``."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="fill-")
        return fd, Path(name)

    def publish_blob(self, temp: Path, digest: Digest) -> Path:
        """Move a verified temp file into place (atomic rename)."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        size = target.stat().st_size
        self._record(lambda: self.index.add("blob", str(digest), size))
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
            log.warning("corrupt_content_removed", kind="manifest", digest=str(digest))
            metrics.CORRUPT.inc()
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
        self._record(lambda: self.index.add("manifest", str(digest), len(data)))

    def write_blob(self, digest: Digest, data: bytes) -> None:
        """Store verified blob bytes held in memory (temp file, fsync, rename)."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(target, data)
        self._record(lambda: self.index.add("blob", str(digest), len(data)))

    def remove_manifest(self, digest: Digest) -> None:
        """Delete a stored manifest, if present."""
        self.remove("manifest", digest)

    def remove_blob(self, digest: Digest) -> None:
        """Delete a stored blob, if present."""
        self.remove("blob", digest)

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


def _scan_dir(kind: str, algorithm: str, hex_dir: str, known: Mapping[Key, int]
              ) -> tuple[list[Key], dict[Key, tuple[int, float]]]:
    """One ``<kind>/<algorithm>/<xx>/`` folder of :meth:`FilesystemStore.scan`."""
    length = HASH_HEX_LENGTH.get(algorithm)
    types: set[str] = set()
    files: list[os.DirEntry[str]] = []
    with os.scandir(hex_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".type"):
                types.add(entry.name[:-5])
            elif len(entry.name) == length and entry.is_file(follow_symlinks=False):
                files.append(entry)
    present: list[Key] = []
    found: dict[Key, tuple[int, float]] = {}
    for entry in files:
        if kind == "manifest" and entry.name not in types:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            continue
        key = (kind, f"{algorithm}:{entry.name}")
        present.append(key)
        if key not in known:
            stat = entry.stat(follow_symlinks=False)
            found[key] = (stat.st_size, stat.st_mtime)
    return present, found


def _subdirs(folder: Path) -> list[tuple[str, str]]:
    """``(algorithm, path)`` of every ``<folder>/<algorithm>/<xx>/`` directory."""
    found: list[tuple[str, str]] = []
    if not folder.is_dir():
        return found
    with os.scandir(folder) as algorithms:
        for algorithm in algorithms:
            if not algorithm.is_dir(follow_symlinks=False):
                continue
            with os.scandir(algorithm.path) as prefixes:
                found += [(algorithm.name, p.path) for p in prefixes
                          if p.is_dir(follow_symlinks=False)]
    return found
