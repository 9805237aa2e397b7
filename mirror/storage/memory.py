"""An in-memory :class:`~mirror.storage.base.ContentStore`: the twin of the filesystem and
S3 backends for unit tests (it passes the same conformance suite), and a source a test
can fill with whatever bytes it likes.

Blobs are whole ``bytes`` here: meant for tests and small content, never for the cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from mirror.errors import BlobUnknown
from mirror.oci import Digest
from mirror.storage.base import Body, BodyResponse, absent, check_content


class MemoryStore:
    """Blobs and manifests in dictionaries."""

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.manifests: dict[Digest, tuple[bytes, str]] = {}

    async def blob_size(self, digest: Digest) -> int | None:
        data = self.blobs.get(digest)
        return None if data is None else len(data)

    async def begin_blob(self, digest: Digest,
                         expected_size: int | None = None) -> MemoryBlobWriter:
        return MemoryBlobWriter(self, digest, expected_size)

    async def read_blob(self, digest: Digest, start: int = 0, end: int | None = None,
                        chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        data = self.blobs.get(digest)
        if data is None:
            raise BlobUnknown(f"blob {digest} is not stored")
        stop = len(data) if end is None else min(end, len(data))
        for offset in range(start, stop, chunk_size):
            yield data[offset:min(offset + chunk_size, stop)]

    @asynccontextmanager
    async def open_blob(self, digest: Digest, offset: int = 0) -> AsyncIterator[BodyResponse]:
        data = self.blobs.get(digest)
        if data is None:
            yield absent()
            return
        size = len(data)
        headers = {"Content-Range": f"bytes {offset}-{size - 1}/{size}"} if offset else {}
        yield Body(206 if offset else 200, size - offset, headers, _Reader(data[offset:]))

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        return self.manifests.get(digest)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        self.manifests[digest] = (data, media_type)

    async def list_blobs(self) -> AsyncIterator[Digest]:
        for digest in list(self.blobs):
            yield digest

    async def list_manifests(self) -> AsyncIterator[Digest]:
        for digest in list(self.manifests):
            yield digest

    async def delete_blob(self, digest: Digest) -> None:
        self.blobs.pop(digest, None)

    async def delete_manifest(self, digest: Digest) -> None:
        self.manifests.pop(digest, None)


class MemoryBlobWriter:
    """Collects a blob's bytes; visible in the store only once they verify."""

    def __init__(self, store: MemoryStore, digest: Digest, expected_size: int | None) -> None:
        self._store = store
        self._digest = digest
        self._expected = expected_size
        self._parts: list[bytes] | None = []
        self._hasher: Any = digest.hasher()

    async def write(self, data: bytes) -> None:
        if self._parts is None:
            raise ValueError("write after commit or abort")
        self._parts.append(data)
        self._hasher.update(data)

    async def commit(self) -> None:
        if self._parts is None:
            raise ValueError("commit after commit or abort")
        data = b"".join(self._parts)
        self._parts = None
        check_content(self._digest, self._hasher.hexdigest(), len(data), self._expected)
        self._store.blobs[self._digest] = data

    async def abort(self) -> None:
        self._parts = None


@dataclass
class _Reader:
    data: bytes
    offset: int = field(default=0)

    async def read(self, n: int = -1) -> bytes:
        return self.read_nowait(n)

    def read_nowait(self, n: int = -1) -> bytes:
        size = len(self.data) - self.offset if n < 0 else n
        chunk = self.data[self.offset:self.offset + size]
        self.offset += len(chunk)
        return chunk
