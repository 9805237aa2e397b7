"""The local folder as a :class:`~mirror.storage.base.ContentStore`.

An async face over :class:`~mirror.storage.filesystem.FilesystemStore`, whose
calls block and therefore run in a thread here. The request path uses the
``FilesystemStore`` directly (sendfile, the fills' temp files); this adapter
is what the storage conformance suite and tier-to-tier copies use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mirror.errors import BlobUnknown
from mirror.oci import Digest
from mirror.storage.base import BodyResponse
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.writer import TempWriter


class LocalContentStore:
    """Blobs and manifests in the local cache folder."""

    def __init__(self, store: FilesystemStore) -> None:
        self.store = store

    async def blob_size(self, digest: Digest) -> int | None:
        return await asyncio.to_thread(self.store.blob_size, digest)

    async def begin_blob(self, digest: Digest,
                         expected_size: int | None = None) -> LocalBlobWriter:
        fd, temp = await asyncio.to_thread(self.store.new_temp)
        os.close(fd)
        return LocalBlobWriter(self.store, digest, temp, expected_size)

    async def read_blob(self, digest: Digest, start: int = 0, end: int | None = None,
                        chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        file = await self._open(digest)
        try:
            size = os.fstat(file.fileno()).st_size
            offset, stop = start, size if end is None else min(end, size)
            while offset < stop:
                data = await asyncio.to_thread(os.pread, file.fileno(),
                                               min(chunk_size, stop - offset), offset)
                if not data:
                    break
                offset += len(data)
                yield data
        finally:
            file.close()

    @asynccontextmanager
    async def open_blob(self, digest: Digest, offset: int = 0) -> AsyncIterator[BodyResponse]:
        try:
            file = await self._open(digest)
        except BlobUnknown:
            yield FileBody(404, None, {}, _FileReader(None, 0))
            return
        try:
            size = os.fstat(file.fileno()).st_size
            headers = {"Content-Range": f"bytes {offset}-{size - 1}/{size}"} if offset else {}
            yield FileBody(206 if offset else 200, size - offset, headers,
                           _FileReader(file, offset))
        finally:
            file.close()

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        return await asyncio.to_thread(self.store.read_manifest, digest)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        await asyncio.to_thread(self.store.write_manifest, digest, data, media_type)

    async def list_blobs(self) -> AsyncIterator[Digest]:
        for digest in await asyncio.to_thread(_walk, self.store.root / "blobs"):
            yield digest

    async def list_manifests(self) -> AsyncIterator[Digest]:
        for digest in await asyncio.to_thread(_walk, self.store.root / "manifests"):
            yield digest

    async def delete_blob(self, digest: Digest) -> None:
        await asyncio.to_thread(self.store.remove_blob, digest)

    async def delete_manifest(self, digest: Digest) -> None:
        await asyncio.to_thread(self.store.remove_manifest, digest)

    async def _open(self, digest: Digest) -> IO[bytes]:
        try:
            return await asyncio.to_thread(open, self.store.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not stored") from None


def _walk(top: Path) -> list[Digest]:
    """Digests of the content files under ``blobs/`` or ``manifests/``."""
    found = []
    for path in top.glob("*/*/*"):
        if path.suffix:  # a manifest's .type file
            continue
        with contextlib.suppress(Exception):
            found.append(Digest.parse(f"{path.parent.parent.name}:{path.name}"))
    return found


@dataclass
class FileBody:
    """A stored blob as a response-like body (see :class:`~mirror.storage.base.BodyResponse`)."""

    status: int
    content_length: int | None
    headers: Mapping[str, str]
    content: _FileReader


@dataclass
class _FileReader:
    file: IO[bytes] | None
    offset: int
    _pending: bytes = field(default=b"", repr=False)

    async def read(self, n: int = -1) -> bytes:
        if self.file is None:
            return b""
        size = n if n > 0 else 1 << 20
        data = await asyncio.to_thread(os.pread, self.file.fileno(), size, self.offset)
        self.offset += len(data)
        return data

    def read_nowait(self, n: int = -1) -> bytes:
        return b""


class LocalBlobWriter:
    """A :class:`~mirror.storage.writer.TempWriter` that becomes the blob on commit."""

    def __init__(self, store: FilesystemStore, digest: Digest, temp: Path,
                 expected_size: int | None) -> None:
        self._store = store
        self._writer = TempWriter(temp, digest)
        self._expected = expected_size
        self._open = True

    async def write(self, data: bytes) -> None:
        if not self._open:
            raise ValueError("write after commit or abort")
        await asyncio.to_thread(self._writer.write, data)

    async def commit(self) -> None:
        if not self._open:
            raise ValueError("commit after commit or abort")
        try:
            await asyncio.to_thread(self._commit)
        except BaseException:
            await self.abort()
            raise

    def _commit(self) -> None:
        self._writer.verify_and_close(None, self._expected)
        assert self._writer.path is not None
        self._store.publish_blob(self._writer.path, self._writer.digest)
        self._open = False

    async def abort(self) -> None:
        self._open = False
        await asyncio.to_thread(self._writer.discard)
