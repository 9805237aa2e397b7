"""Where a bundle's bytes go and come from: one file, or parts of a fixed maximum size.

::

    FILE.tar.zst                 one file (``--max-part-size`` not given)
    FILE.tar.zst.001, .002 ...   parts of at most N bytes each, cut anywhere in the stream
    FILE.tar.zst.sha256          ``<sha256>  FILE.tar.zst.001`` per part (``sha256sum -c``)

Nothing is written in place: every file is a temp file beside its target until the whole
bundle is written, then renamed (an interrupted export leaves no bundle, never a short
one). Import reads the parts in order as one stream and checks each part's sha256 when it
ends, before anything from the bundle is applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mirror.errors import BundleError

PART_SUFFIX = re.compile(r"\.(\d{3,})$")
#: Written bytes after which the kernel is asked to start writing them back (so the final
#: fsync does not wait for the whole file, and the bundle does not crowd the page cache).
WRITEBACK_EVERY = 64 << 20


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back a range of a file now, without waiting (Linux: FADV_DONTNEED
    starts the writeback of dirty pages, then drops the clean ones)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Output:
    """A write-only stream into one file or into parts; :meth:`commit` makes them appear."""

    def __init__(self, path: Path, max_part_size: int | None = None) -> None:
        if max_part_size is not None and max_part_size <= 0:
            raise BundleError("--max-part-size must be more than 0 bytes")
        self.path = path
        self._max = max_part_size
        self._parts: list[tuple[Path, Path, Any]] = []  # (temp, final, sha256 or None)
        self._file: Any = None
        self._room = 0
        self._flushed = 0  # bytes of the current file whose writeback was started
        self._written = 0  # bytes of the current file
        self.size = 0

    def _next_part(self) -> None:
        if self._file is not None:
            self._file.close()
        number = len(self._parts) + 1
        final = self.path if self._max is None else \
            self.path.with_name(f"{self.path.name}.{number:03d}")
        fd, temp = tempfile.mkstemp(dir=self.path.parent or Path("."),
                                    prefix=f".{final.name}.", suffix=".partial")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # a bundle is a file to hand over, not a secret
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._parts.append((Path(temp), final,
                            hashlib.sha256() if self._max is not None else None))
        self._room = self._max if self._max is not None else -1
        self._flushed = self._written = 0

    def write(self, data: bytes | memoryview) -> int:
        """Append ``data`` (a new part starts when the current one is full)."""
        view = memoryview(data)
        written = len(view)
        if self._file is None:
            self._next_part()
        while view:
            if self._room == 0:
                self._next_part()
            chunk = view if self._room < 0 else view[:self._room]
            done = 0
            while done < len(chunk):
                done += self._file.write(chunk[done:])
            if self._parts[-1][2] is not None:
                self._parts[-1][2].update(chunk)
            if self._room > 0:
                self._room -= len(chunk)
            view = view[len(chunk):]
            self._advance(len(chunk))
        self.size += written
        return written

    def _advance(self, count: int) -> None:
        self._written += count
        if self._written - self._flushed >= WRITEBACK_EVERY:
            start_writeback(self._file.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def copy_from(self, source: Any, size: int) -> bool:
        """Copy ``size`` bytes from an open file in the kernel (one output file only).

        Returns:
            ``False`` when this output cannot (parts are hashed here): write() instead.
        """
        if self._max is not None or not hasattr(os, "copy_file_range"):
            return False
        if self._file is None:
            self._next_part()
        left = size
        while left:
            try:
                copied = os.copy_file_range(source.fileno(), self._file.fileno(), left)
            except OSError:
                if left != size:
                    raise
                return False  # another file system, or no support: the caller writes
            if copied == 0:
                raise BundleError(f"a cached file ended {left} bytes early")
            left -= copied
            self._advance(copied)
        self.size += size
        return True

    def flush(self) -> None:
        """Flush the current file (tarfile and zstandard call it)."""
        if self._file is not None:
            self._file.flush()

    def commit(self) -> list[Path]:
        """Sync and rename every part into place; write the checksum list of parts.

        Returns:
            The files written, in order (the checksum list last, for parts).
        """
        if self._file is None:
            self._next_part()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        done = []
        for temp, final, _ in self._parts:
            os.replace(temp, final)
            done.append(final)
        if self._max is not None:
            listing = self.path.with_name(self.path.name + ".sha256")
            text = "".join(f"{h.hexdigest()}  {final.name}\n" for _, final, h in self._parts
                           if h is not None)
            listing.write_text(text)
            done.append(listing)
        return done

    def abort(self) -> None:
        """Remove every temp file (the export failed)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        for temp, _, _ in self._parts:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def expand(paths: list[Path]) -> list[list[Path]]:
    """Group command-line files into bundles: ``FILE.001`` alone brings its siblings.

    Raises:
        BundleError: a file does not exist.
    """
    bundles: list[list[Path]] = []
    for path in paths:
        if not path.is_file():
            raise BundleError(f"{path}: no such file")
        match = PART_SUFFIX.search(path.name)
        if match is None:
            bundles.append([path])
        elif not any(path in group for group in bundles):
            bundles.append(_parts_from(path, match))
    return bundles


def _parts_from(first: Path, match: re.Match[str]) -> list[Path]:
    """``first`` and the parts numbered after it that exist."""
    width, number = len(match.group(1)), int(match.group(1))
    group: list[Path] = []
    while True:
        part = first.with_name(f"{_base(first).name}.{number:0{width}d}")
        if not part.is_file():
            return group
        group.append(part)
        number += 1


def _base(path: Path) -> Path:
    return path.with_name(PART_SUFFIX.sub("", path.name))


class Input:
    """The bytes of one bundle (a file, or its parts in order) as one read-only stream.

    Each part's sha256 is checked against ``BASE.sha256`` when its last byte is read.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.total = sum(f.stat().st_size for f in files)
        self.read_bytes = 0
        self._expected: dict[str, str] = {}
        if len(files) > 1 or PART_SUFFIX.search(files[0].name):
            self._expected = _listing(files[0])
        self._index = -1
        self._file: Any = None
        self._hash: Any = None
        self._open_next()

    def _open_next(self) -> bool:
        if self._file is not None:
            self._file.close()
            self._check_part()
        self._index += 1
        if self._index >= len(self.files):
            self._file = None
            return False
        self._file = self.files[self._index].open("rb")
        self._hash = hashlib.sha256() if self._expected else None
        return True

    def _check_part(self) -> None:
        if self._hash is None:
            return
        name = self.files[self._index].name
        expected = self._expected.get(name)
        if expected is None:
            raise BundleError(f"{name}: not listed in {_base(self.files[0]).name}.sha256")
        if self._hash.hexdigest() != expected:
            raise BundleError(f"{name}: its sha256 is not the one in "
                              f"{_base(self.files[0]).name}.sha256 (a damaged or wrong part)")

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, crossing into the next part when one ends."""
        while self._file is not None:
            data: bytes = self._file.read(size if size >= 0 else 1 << 20)
            if data:
                if self._hash is not None:
                    self._hash.update(data)
                self.read_bytes += len(data)
                return data
            if not self._open_next():
                break
        return b""

    def close(self) -> None:
        """Close the current part."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _listing(first: Path) -> dict[str, str]:
    listing = _base(first).with_name(_base(first).name + ".sha256")
    try:
        lines = listing.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        raise BundleError(f"{listing}: missing or unreadable; a bundle in parts needs the "
                          "list of its parts' checksums") from None
    found = {}
    for line in lines:
        digest, _, name = line.strip().partition("  ")
        if re.fullmatch(r"[0-9a-f]{64}", digest) and name:
            found[name.lstrip("*")] = digest
    return found
