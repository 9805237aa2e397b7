"""eStargz images made by the real converter, and the reads a lazy puller makes of them.

``ctr-remote`` (Debian's ``stargz-snapshotter`` package, which ships the converter but
not the snapshotter daemon) pulls an image into a private containerd, converts its
layers to eStargz (``images convert --estargz --oci``) and pushes the result. The
stargz snapshotter then starts a container by reading, for each layer:

1. the 51-byte footer at the end of the blob (``Range: bytes=-51``): a gzip member
   whose extra field holds ``%016x`` (the table of contents' offset) and ``STARGZ``;
2. the table of contents: a gzip member from that offset to the footer, holding a
   tar with one file, ``stargz.index.json``;
3. the chunks it needs, several ranges per request (``Range: bytes=a-b,c-d``).

:func:`lazy_reads` computes those ranges from a layer's bytes; a test replays them
through the mirror and checks every byte against the upstream.

zstd:chunked (``convert --zstdchunked``, what containers/image pulls partially) ends
instead with a skippable zstd frame that gives the offset of its TOC, a zstd frame;
the chunks are then read the same way.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

FOOTER_SIZE = 51
#: The skippable frame that ends a zstd:chunked layer (its 8-byte header included).
ZSTD_FOOTER_SIZE = 48
TOC_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


def convert(socket: Path, registry_host: str, source: str, target: str,
            *, timeout: float = 300, fmt: str = "--estargz") -> None:
    """Pull ``registry_host/source``, convert it to eStargz (``fmt="--zstdchunked"``:
    zstd:chunked), push ``registry_host/target``.

    Raises:
        RuntimeError: ctr-remote failed (its output is in the message).
    """
    base = ["ctr-remote", "--address", str(socket), "--namespace", "estargz"]
    src, dst = f"{registry_host}/{source}", f"{registry_host}/{target}"
    closed = "http://127.0.0.1:1"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HTTP_PROXY": closed,
           "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost"}
    for args in (["images", "pull", "--plain-http", src],
                 ["images", "convert", fmt, "--oci", src, dst],
                 ["images", "push", "--plain-http", dst]):
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ctr-remote {' '.join(args)} failed:\n{proc.stdout}\n"
                               f"{proc.stderr}")


def toc_offset(footer: bytes) -> int:
    """The table of contents' offset from an eStargz footer.

    Raises:
        ValueError: not an eStargz footer.
    """
    if len(footer) != FOOTER_SIZE or footer[:2] != b"\x1f\x8b" or footer[32:38] != b"STARGZ":
        raise ValueError(f"not an eStargz footer: {footer[:40]!r}")
    return int(footer[16:32], 16)


def zstd_manifest_position(footer: bytes) -> tuple[int, int]:
    """Offset and length of a zstd:chunked layer's manifest (its TOC), from the last
    :data:`ZSTD_FOOTER_SIZE` bytes: a skippable frame holding offset, compressed and
    uncompressed length, type (little-endian 64-bit each) and ``GnUlInUx``.

    Raises:
        ValueError: not a zstd:chunked footer.
    """
    if len(footer) != ZSTD_FOOTER_SIZE or footer[-8:] != b"GnUlInUx" \
            or footer[:4] != b"\x50\x2a\x4d\x18":
        raise ValueError(f"not a zstd:chunked footer: {footer!r}")
    offset, length = struct.unpack_from("<QQ", footer, 8)
    return offset, length


def read_zstd_toc(manifest: bytes) -> dict[str, Any]:
    """The TOC document of a zstd:chunked layer's (zstd-compressed) manifest."""
    document: dict[str, Any] = json.loads(
        zstandard.ZstdDecompressor().decompressobj().decompress(manifest))
    return document


def read_toc(member: bytes) -> dict[str, Any]:
    """The ``stargz.index.json`` document of a gzip member that holds the TOC tar."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member))) as tar:
        entry = tar.extractfile(TOC_NAME)
        assert entry is not None, "the TOC tar has no stargz.index.json"
        document: dict[str, Any] = json.load(entry)
    return document


@dataclass(frozen=True)
class LazyReads:
    """The ranges a lazy start reads of one layer (``end`` exclusive)."""

    footer: tuple[int, int]
    toc: tuple[int, int]
    chunks: list[tuple[int, int]]


def chunk_spans(toc: dict[str, Any], toc_start: int) -> list[tuple[int, int]]:
    """Every chunk's compressed span, in layer order: from its offset to the next one's."""
    offsets = sorted({entry["offset"] for entry in toc["entries"]
                      if entry.get("type") in ("reg", "chunk") and entry.get("offset")})
    ends = [*offsets[1:], toc_start]
    return list(zip(offsets, ends, strict=True))


def lazy_reads(size: int, footer: bytes, toc_document: dict[str, Any] | None = None,
               toc_member: bytes | None = None, chunks: int = 10) -> LazyReads:
    """The footer's, the TOC's and the first ``chunks`` chunks' spans of a layer."""
    start = toc_offset(footer)
    document = toc_document if toc_document is not None else read_toc(toc_member or b"")
    return LazyReads((size - FOOTER_SIZE, size), (start, size - FOOTER_SIZE),
                     chunk_spans(document, start)[:chunks])


def range_header(spans: list[tuple[int, int]]) -> str:
    """``bytes=a-b,c-d`` for spans with exclusive ends."""
    return "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in spans)


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """``(Content-Range, bytes)`` of each part of a ``multipart/byteranges`` body, parsed
    strictly (the way Go's mime/multipart reader, which the snapshotter uses, reads it)."""
    _, _, boundary = content_type.partition("boundary=")
    assert boundary, f"no boundary in {content_type!r}"
    delimiter = b"--" + boundary.strip('"').encode()
    parts = []
    pieces = body.split(b"\r\n" + delimiter)
    first = pieces[0]
    assert first.startswith(delimiter), "the body does not start with the boundary"
    pieces[0] = first[len(delimiter):]
    assert pieces[-1] == b"--\r\n", "the closing delimiter is missing"
    for piece in pieces[:-1]:
        head, sep, data = piece.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"\r\n"), f"a part without headers: {piece[:80]!r}"
        headers = dict(line.split(": ", 1) for line in head[2:].decode().split("\r\n"))
        parts.append((headers["Content-Range"], data))
    return parts
