"""What every storage backend offers: the protocol the conformance suite tests.

Two backends implement :class:`ContentStore`: the local folder
(:class:`mirror.storage.local.LocalContentStore`, over
:class:`~mirror.storage.filesystem.FilesystemStore`) and the shared S3 tier
(:class:`mirror.storage.s3.S3Store`). ``tests/unit/test_storage_conformance.py``
runs the same tests against both.

The rules they share:

- Content is addressed by digest. A write goes through a :class:`BlobWriter`
  that hashes what it is given; only :meth:`BlobWriter.commit` of bytes whose
  size and digest match makes the blob visible, and it becomes visible whole
  (atomic rename, or a completed multipart upload). :meth:`BlobWriter.abort`
  leaves nothing behind.
- Reads are ranged and come in bounded chunks: no blob is ever held whole in
  memory. :meth:`ContentStore.open_blob` gives the small response-like object
  a :class:`~mirror.fetch.Fill` reads from, so a blob from any backend can
  feed the single-flight machinery exactly like an upstream download.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from mirror.errors import DigestMismatch
from mirror.oci import Digest


class BodyReader(Protocol):
    """The part of :class:`aiohttp.StreamReader` a fill reads a body with."""

    async def read(self, n: int = -1) -> bytes:
        """Wait for some bytes, at most ``n``; ``b""`` at the end."""
        ...

    def read_nowait(self, n: int = -1) -> bytes:
        """Bytes already buffered, at most ``n``, without waiting (may be ``b""``)."""
        ...


class BodyResponse(Protocol):
    """The part of :class:`aiohttp.ClientResponse` a fill needs.

    ``status`` is 200 for a body from offset 0, 206 (with ``Content-Range``)
    for a resumed one, 404 when the blob is not there.
    """

    @property
    def status(self) -> int: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> BodyReader: ...


@dataclass
class Body:
    """A plain response-like body (see :class:`BodyResponse`)."""

    status: int
    content_length: int | None
    headers: Mapping[str, str]
    content: BodyReader


class EmptyReader:
    """The reader of a body with no bytes."""

    async def read(self, n: int = -1) -> bytes:
        return b""

    def read_nowait(self, n: int = -1) -> bytes:
        return b""


def absent() -> Body:
    """The answer of a source that does not have the blob (404, no body)."""
    return Body(404, None, {}, EmptyReader())


class BlobWriter(Protocol):
    """One write of one blob: invisible until committed, verified on commit."""

    async def write(self, data: bytes) -> None:
        """Append ``data`` (hashed as it goes)."""
        ...

    async def commit(self) -> None:
        """Verify size and digest, then publish the blob whole.

        Raises:
            DigestMismatch: the bytes are not the blob; nothing was published
                and the write is aborted.
        """
        ...

    async def abort(self) -> None:
        """Drop everything written; safe to call more than once."""
        ...


class ContentStore(Protocol):
    """Blobs and manifests by digest."""

    async def blob_size(self, digest: Digest) -> int | None:
        """The size of a stored blob, or ``None`` when it is not stored."""
        ...

    async def begin_blob(self, digest: Digest, expected_size: int | None = None) -> BlobWriter:
        """Start writing a blob; ``expected_size`` is checked on commit when given."""
        ...

    def read_blob(self, digest: Digest, start: int = 0, end: int | None = None,
                  chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive, default: the end) in chunks.

        Raises:
            BlobUnknown: the blob is not stored.
        """
        ...

    def open_blob(self, digest: Digest,
                  offset: int = 0) -> AbstractAsyncContextManager[BodyResponse]:
        """The blob's body from ``offset`` as a response a fill can read (404 if absent)."""
        ...

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """Verified manifest bytes and media type, or ``None``."""
        ...

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store manifest bytes (already verified by the caller) and their media type."""
        ...

    def list_blobs(self) -> AsyncIterator[Digest]:
        """Every stored blob's digest, in no particular order."""
        ...

    def list_manifests(self) -> AsyncIterator[Digest]:
        """Every stored manifest's digest, in no particular order."""
        ...

    async def delete_blob(self, digest: Digest) -> None:
        """Remove a blob; no error when it is absent."""
        ...

    async def delete_manifest(self, digest: Digest) -> None:
        """Remove a manifest; no error when it is absent."""
        ...


def check_content(digest: Digest, actual_hex: str, size: int, expected_size: int | None) -> None:
    """Raise unless what was written is the blob.

    Raises:
        DigestMismatch: wrong size or wrong hash.
    """
    if expected_size is not None and size != expected_size:
        raise DigestMismatch(f"{size} bytes written for {digest}, expected {expected_size}")
    if actual_hex != digest.hex:
        raise DigestMismatch(f"bytes written do not hash to {digest}")
