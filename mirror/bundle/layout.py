"""The OCI image layout as a tar stream: written in order, read in order, checked entry by entry.

Writing builds each entry's header with :class:`tarfile.TarInfo` (PAX format) and copies
the bytes after it in the kernel (``copy_file_range``) or in bounded chunks; zstd level 3
on one thread when the file name ends in ``.zst`` (layers are compressed already: more
threads or levels bought no speed and doubled the memory, measured). Reading goes through
:mod:`tarfile` over a forward-only stream (``r:`` with seeks that only skip ahead: its
``r|`` mode costs three extra copies of every byte), so neither side seeks back, holds a
blob in memory or needs the archive on a seekable disk. Everything here blocks: callers
on an event loop run it in a thread.

Entries are refused before any byte of them is used when their name is absolute or has
``..``, when they are links or devices, or when a name comes twice (see :func:`entries`).
"""

from __future__ import annotations

import gzip
import lzma
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any, Protocol

import zstandard

from mirror.bundle import safejson
from mirror.errors import BundleError

OCI_LAYOUT = "oci-layout"
INDEX = "index.json"
BUNDLE = "bundle.json"
SIGNATURE = "bundle.json.sig"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
#: containerd, nerdctl and BuildKit name images in a layout with this annotation.
CONTAINERD_NAME = "io.containerd.image.name"
CHUNK = 1 << 20
#: The largest small file read into memory (oci-layout, index.json, bundle.json, signature).
#: bundle.json takes about 100 bytes a blob: 4 MiB is some 40,000 blobs.
SMALL_MAX = {OCI_LAYOUT: 4096, INDEX: 4 << 20, BUNDLE: 4 << 20, SIGNATURE: 64 << 10}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOB_NAME = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)")
_ZEROS = bytes(tarfile.BLOCKSIZE * 2)
#: The largest zstd window decoded (zstd -19 uses 8 MiB; the decoder keeps one window).
ZSTD_WINDOW_MAX = 16 << 20
#: zstd blocks fed to the decoder at once: each decodes to 128 KiB at most.
_BLOCKS_PER_FEED = 8


class Sink(Protocol):
    """Where the bytes go (:class:`mirror.bundle.parts.Output`)."""

    def write(self, data: bytes | memoryview) -> int: ...

    def flush(self) -> None: ...

    def copy_from(self, source: Any, size: int) -> bool: ...


class LayoutWriter:
    """Writes a tar of an OCI layout, entry by entry, into ``sink``."""

    def __init__(self, sink: Sink, compress: bool, level: int = 3) -> None:
        self._sink = sink
        self._zstd: Any = None
        if compress:
            self._zstd = zstandard.ZstdCompressor(level=level).stream_writer(
                sink, closefd=False, write_return_read=True)  # type: ignore[arg-type]
        self._out: Any = self._zstd if self._zstd is not None else sink
        self.written = 0  # uncompressed bytes of the tar so far

    def _header(self, name: str, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self.written += len(data)

    def _pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self._write(bytes(tarfile.BLOCKSIZE - rest))

    def add_bytes(self, name: str, data: bytes) -> None:
        """One small file (oci-layout, index.json, bundle.json, a manifest)."""
        self._header(name, len(data))
        self._write(data)
        self._pad(len(data))

    def add_file(self, name: str, file: IO[bytes], size: int) -> None:
        """One blob, copied from an open file in bounded chunks.

        Raises:
            BundleError: the file ended before ``size`` bytes (it changed under us).
        """
        self._header(name, size)
        if self._zstd is None and self._sink.copy_from(file, size):
            self.written += size
            self._pad(size)
            return
        left = size
        while left:
            data = file.read(min(CHUNK, left))
            if not data:
                raise BundleError(f"{name}: the cached file ended after {size - left} of "
                                  f"{size} bytes")
            self._write(data)
            left -= len(data)
        self._pad(size)

    def close(self) -> None:
        """The end-of-archive blocks, and the end of the zstd frame."""
        self._write(_ZEROS)
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
        self._sink.flush()


class _Peek:
    """A readable stream whose first bytes were looked at."""

    def __init__(self, raw: Any, head: bytes) -> None:
        self._raw = raw
        self._head = head

    def read(self, size: int = -1) -> bytes:
        if self._head:
            head, self._head = (self._head, b"") if size < 0 or size >= len(self._head) else \
                (self._head[:size], self._head[size:])
            return head
        data: bytes = self._raw.read(size)
        return data


class _Blocks:
    """Where the blocks of a zstd stream end, read from their headers without decoding.

    A zstd block decodes to at most 128 KiB whatever its size in the stream (an RLE block
    of 4 bytes gives 128 KiB of one byte), so feeding the decoder whole blocks a few at a
    time bounds what one call returns. Skippable frames are passed over; :attr:`between`
    says whether the bytes so far end at a frame boundary (else the stream was cut short).
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._want = 4  # bytes of the current header still to collect, or of a body to skip
        self._head = bytearray()
        self._last = False
        self._checksum = 0

    @property
    def between(self) -> bool:
        """At a frame boundary: nothing half read."""
        return self._state == "magic" and not self._head

    def take(self, data: memoryview, blocks: int) -> int:
        """How many bytes of ``data`` to feed so that at most ``blocks`` blocks end in them.

        Raises:
            BundleError: not a zstd frame, or a reserved block type.
        """
        used = 0
        while used < len(data) and blocks > 0:
            if self._state in ("body", "skip", "checksum"):
                step = min(self._want, len(data) - used)
                used += step
                self._want -= step
                if self._want == 0:
                    blocks -= self._state == "body"
                    self._body_done()
                continue
            step = min(self._want - len(self._head), len(data) - used)
            self._head += data[used:used + step]
            used += step
            if len(self._head) == self._want:
                self._header_done(bytes(self._head))
        return used

    def _body_done(self) -> None:
        if self._state == "body" and not self._last:
            self._expect("block", 3)
        elif self._state == "body" and self._checksum:
            self._state, self._want = "checksum", self._checksum
        else:
            self._expect("magic", 4)

    def _expect(self, state: str, size: int) -> None:
        self._state, self._want = state, size
        self._head.clear()

    def _header_done(self, head: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(head, "little")
            if head == ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._expect("skip-size", 4)
            else:
                raise BundleError("the bundle's zstd stream is corrupt (no frame magic "
                                  "where a frame should start)")
        elif self._state == "skip-size":
            self._state, self._want = "skip", int.from_bytes(head, "little")
            self._head.clear()
            if self._want == 0:
                self._expect("magic", 4)
        elif self._state == "descriptor":
            self._descriptor(head[0])
        elif self._state == "frame-header":
            self._expect("block", 3)
        else:
            self._block(int.from_bytes(head, "little"))

    def _descriptor(self, byte: int) -> None:
        single = bool(byte & 0x20)
        content_size = (0, 2, 4, 8)[byte >> 6] or (1 if single else 0)
        rest = (0 if single else 1) + (0, 1, 2, 4)[byte & 3] + content_size
        self._checksum = 4 if byte & 0x04 else 0
        self._expect("frame-header", rest) if rest else self._expect("block", 3)

    def _block(self, header: int) -> None:
        self._last = bool(header & 1)
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise BundleError("the bundle's zstd stream is corrupt (reserved block type)")
        self._state, self._want = "body", 1 if kind == 1 else size
        self._head.clear()
        if self._want == 0:
            self._body_done()


class _Unzstd:
    """zstd decompression in bounded steps that can tell a stream cut short from one that
    ended.

    ``decompressobj().decompress`` returns everything its input decodes to in one piece:
    8 KB of crafted input can be 256 MiB out. Its input is therefore cut at block
    boundaries (:class:`_Blocks`), :data:`_BLOCKS_PER_FEED` blocks at a time, so one feed
    gives at most 1 MiB and memory stays flat whatever the compression ratio.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_MAX)
        self._obj = self._decompressor.decompressobj()
        self._blocks = _Blocks()
        self._input = memoryview(b"")
        self._buffer = memoryview(b"")
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._ended:
            if not self._input:
                self._input = memoryview(self._raw.read(CHUNK))
                if not self._input:
                    self._ended = True
                    if not self._blocks.between:
                        raise BundleError("the bundle is truncated (its zstd stream stops "
                                          "mid-frame)")
                    break
            used = self._blocks.take(self._input, _BLOCKS_PER_FEED)
            piece, self._input = self._input[:used], self._input[used:]
            self._buffer = memoryview(self._feed(piece))
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = self._buffer, memoryview(b"")
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return bytes(out)

    def _feed(self, data: memoryview) -> bytes:
        out = []
        try:
            while data:
                out.append(self._obj.decompress(data))
                data = memoryview(self._obj.unused_data) if self._obj.eof else memoryview(b"")
                if data or self._obj.eof:  # concatenated frames (pzstd, zstd -T)
                    self._obj = self._decompressor.decompressobj()
        except zstandard.ZstdError as exc:
            hint = f" (this mirror reads zstd windows up to {ZSTD_WINDOW_MAX >> 20} MiB: " \
                "not --long or --ultra)" if "memory" in str(exc) else ""
            raise BundleError(f"the bundle's zstd stream is corrupt: {exc}{hint}") from None
        return b"".join(out)


class _Forward:
    """A stream that can only go forward: what :mod:`tarfile` needs to read in order.

    tarfile's ``r|`` mode copies every byte three times through its own buffer; its
    ``r:`` mode reads a member's bytes straight from here, and its seeks are all forward
    (skipping bytes is reading them), so the archive still never needs to be seekable.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes, fewer only at the end (tarfile takes a short read for one)."""
        data: bytes = self._raw.read(size)
        if 0 < len(data) < size:
            pieces = [data]
            got = len(data)
            while got < size and (more := self._raw.read(size - got)):
                pieces.append(more)
                got += len(more)
            data = b"".join(pieces)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.position + offset
        if whence not in (0, 1) or target < self.position:
            raise OSError("a bundle is read in order: no seeking back")
        while self.position < target:
            if not self.read(min(CHUNK, target - self.position)):
                break
        return self.position


def open_stream(raw: Any) -> tuple[tarfile.TarFile, Any]:
    """A tar reader over ``raw`` (plain, zstd, gzip or xz) that reads in order; and the
    stream to drain after it.

    Raises:
        BundleError: not a tar archive.
    """
    head = raw.read(6)
    peeked: Any = _Peek(raw, head)
    source: Any = peeked
    if head.startswith(ZSTD_MAGIC):
        source = _Unzstd(peeked)
    elif head.startswith(b"\x1f\x8b"):
        source = gzip.GzipFile(fileobj=peeked, mode="rb")
    elif head.startswith(b"\xfd7zXZ"):
        source = lzma.LZMAFile(peeked)  # noqa: SIM115 (read to its end by drain())
    stream: Any = _Forward(source)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115 (closed by the caller)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
        raise BundleError(f"not a tar archive (plain, .zst, .gz or .xz): {exc}") from None
    return tar, stream


def drain(stream: Any) -> None:
    """Read the rest of the stream after the tar's end (part checksums, zstd frame end).

    Raises:
        BundleError: the compressed stream is cut short or corrupt.
    """
    try:
        while stream.read(CHUNK):
            pass
    except (EOFError, OSError, lzma.LZMAError) as exc:
        raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None


def entries(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """Every regular file of the archive with its normalised name; directories are skipped.

    Raises:
        BundleError: an absolute name, ``..``, a link, a device, or a name seen before;
            a truncated or corrupt archive.
    """
    seen: set[str] = set()
    try:
        for member in tar:
            name = safe_name(member.name)
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                raise BundleError(f"entry {member.name!r} is a link (refused: a bundle "
                                  "holds regular files only)")
            if not member.isreg():
                raise BundleError(f"entry {member.name!r} is not a regular file")
            if name in seen:
                raise BundleError(f"entry {name!r} comes twice in the archive")
            seen.add(name)
            tar.members.clear()  # type: ignore[attr-defined]  # else it keeps every header read
            yield name, member
    except (tarfile.TarError, EOFError, lzma.LZMAError, OSError) as exc:
        raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None


def safe_name(name: str) -> str:
    """``./blobs/sha256/x`` -> ``blobs/sha256/x``; refuses absolute names and ``..``.

    Raises:
        BundleError: the name could write outside the layout.
    """
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\x00" in name:
        raise BundleError(f"entry {name[:200]!r} has an absolute path (refused)")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"entry {name[:200]!r} has '..' in its path (refused)")
    return "/".join(parts)


def read_small(tar: tarfile.TarFile, name: str, member: tarfile.TarInfo) -> bytes:
    """The bytes of a small file of the layout, refused when its size is absurd.

    Raises:
        BundleError: bigger than :data:`SMALL_MAX` allows, or truncated.
    """
    limit = SMALL_MAX[name]
    if member.size > limit:
        raise BundleError(f"{name} is {member.size} bytes (at most {limit} accepted)")
    handle = tar.extractfile(member)
    assert handle is not None
    try:
        data = handle.read()
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None
    if len(data) != member.size:
        raise BundleError(f"the bundle is truncated ({name} is short)")
    return data


def check_layout(data: bytes | None) -> None:
    """Check the ``oci-layout`` file.

    Raises:
        BundleError: missing, or a layout version this mirror does not read.
    """
    if data is None:
        raise BundleError("no oci-layout file: not an OCI image layout")
    try:
        version = safejson.loads(data, OCI_LAYOUT).get("imageLayoutVersion")
    except (BundleError, AttributeError):
        version = None
    if version != "1.0.0":
        raise BundleError(f"oci-layout says imageLayoutVersion {version!r}; this mirror reads "
                          "1.0.0")


def parse_index(data: bytes | None) -> list[dict[str, Any]]:
    """The descriptors of ``index.json``.

    Raises:
        BundleError: missing or not an image index.
    """
    if data is None:
        raise BundleError("no index.json: not an OCI image layout")
    document = safejson.loads(data, INDEX)
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(manifests, list) or not all(
            isinstance(m, dict) and isinstance(m.get("digest"), str) for m in manifests):
        raise BundleError("index.json is not an image index")
    return manifests


def blob_name(digest: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256/<hex>``."""
    algorithm, _, hex_ = digest.partition(":")
    return f"blobs/{algorithm}/{hex_}"
