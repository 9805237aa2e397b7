"""One conformance suite for every storage backend (mirror.storage.base.ContentStore).

The same tests run against the in-memory twin, the local folder and S3 (moto's real S3 API
on a loopback port, never a patched client): write, verify, publish, abort,
ranged reads, list, delete, and readers of a growing blob filled from the
backend through the single-flight machinery.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from yarl import URL

from mirror.config import S3Settings, Secret
from mirror.errors import BlobUnknown, DigestMismatch
from mirror.fetch import Fetcher
from mirror.oci import Digest
from mirror.storage.base import BodyResponse, ContentStore
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.local import LocalContentStore
from mirror.storage.memory import MemoryStore
from mirror.storage.s3 import S3Body, S3Store, open_s3
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(size: int, seed: int = 1) -> tuple[bytes, Digest]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = os.urandom(64) + data[64:] if size > 64 else data
    return data, Digest.of(data)


@pytest.fixture(params=["memory", "filesystem", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ContentStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "filesystem":
        store = FilesystemStore(tmp_path / "fs")
        await asyncio.to_thread(store.prepare)
        yield LocalContentStore(store)
        return
    server: MotoS3 = request.getfixturevalue("moto_s3")
    bucket = await asyncio.to_thread(server.new_bucket, "conformance")
    settings = S3Settings(bucket=bucket, prefix="team/mirror", region=REGION,
                          endpoint_url=URL(server.url),
                          access_key_id=Secret(ACCESS_KEY), secret_access_key=Secret(SECRET_KEY),
                          part_size=5 * MiB)
    async with open_s3(settings) as s3:
        yield s3


async def _write(store: ContentStore, data: bytes, digest: Digest, piece: int = 256 * 1024,
                 expected_size: int | None = None) -> None:
    writer = await store.begin_blob(digest, expected_size)
    for start in range(0, len(data), piece):
        await writer.write(data[start:start + piece])
    await writer.commit()


async def _read(store: ContentStore, digest: Digest, start: int = 0, end: int | None = None,
                chunk_size: int = 1 << 20) -> list[bytes]:
    return [chunk async for chunk in store.read_blob(digest, start, end, chunk_size)]


async def _listed(store: ContentStore, kind: str) -> set[Digest]:
    items = store.list_blobs() if kind == "blob" else store.list_manifests()
    return {digest async for digest in items}


async def test_a_blob_is_invisible_until_committed_then_whole(backend: ContentStore) -> None:
    data, digest = _blob(300_000)
    writer = await backend.begin_blob(digest, len(data))
    await writer.write(data[:100_000])
    assert await backend.blob_size(digest) is None
    assert digest not in await _listed(backend, "blob")
    with pytest.raises(BlobUnknown):
        await _read(backend, digest)
    await writer.write(data[100_000:])
    await writer.commit()
    assert await backend.blob_size(digest) == len(data)
    assert b"".join(await _read(backend, digest)) == data
    assert digest in await _listed(backend, "blob")


async def test_ranged_reads_come_in_bounded_chunks(backend: ContentStore) -> None:
    data, digest = _blob(200_000, seed=2)
    await _write(backend, data, digest)
    for start, end in [(0, 1), (0, 10), (100, 70_000), (199_999, 200_000), (5, None)]:
        chunks = await _read(backend, digest, start, end, chunk_size=16_384)
        assert b"".join(chunks) == data[start:end], (start, end)
        assert all(len(chunk) <= 16_384 for chunk in chunks)
    assert await _read(backend, digest, 10, 10) == []


async def test_wrong_bytes_are_refused_and_never_published(backend: ContentStore) -> None:
    data, digest = _blob(50_000, seed=3)
    writer = await backend.begin_blob(digest)
    await writer.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DigestMismatch):
        await writer.commit()
    assert await backend.blob_size(digest) is None
    writer = await backend.begin_blob(digest, expected_size=len(data) + 1)
    await writer.write(data)
    with pytest.raises(DigestMismatch):
        await writer.commit()
    assert await backend.blob_size(digest) is None
    assert digest not in await _listed(backend, "blob")


async def test_abort_leaves_nothing(backend: ContentStore, tmp_path: Path) -> None:
    data, digest = _blob(6 * MiB, seed=4)  # past one S3 part: a multipart upload is under way
    writer = await backend.begin_blob(digest)
    await writer.write(data)
    await writer.abort()
    await writer.abort()
    assert await backend.blob_size(digest) is None
    if isinstance(backend, LocalContentStore):
        assert list((backend.store.root / "tmp").iterdir()) == []
    if isinstance(backend, S3Store):
        uploads = await backend.client.list_multipart_uploads(Bucket=backend.bucket)
        assert not uploads.get("Uploads")


async def test_large_blob_in_parts_reads_back_exactly(backend: ContentStore) -> None:
    data, digest = _blob(11 * MiB + 17, seed=5)
    await _write(backend, data, digest, piece=MiB)
    assert await backend.blob_size(digest) == len(data)
    hasher = hashlib.sha256()
    async for chunk in backend.read_blob(digest):
        hasher.update(chunk)
    assert hasher.hexdigest() == digest.hex


async def test_manifests_put_get_list_delete(backend: ContentStore) -> None:
    data = b'{"schemaVersion": 2, "mediaType": "%s"}' % OCI_MANIFEST.encode()
    digest = Digest.of(data)
    assert await backend.get_manifest(digest) is None
    await backend.put_manifest(digest, data, OCI_MANIFEST)
    assert await backend.get_manifest(digest) == (data, OCI_MANIFEST)
    assert await _listed(backend, "manifest") == {digest}
    await backend.delete_manifest(digest)
    await backend.delete_manifest(digest)
    assert await backend.get_manifest(digest) is None
    assert await _listed(backend, "manifest") == set()


async def test_delete_blob_and_list(backend: ContentStore) -> None:
    blobs = [_blob(1000 + i, seed=10 + i) for i in range(3)]
    for data, digest in blobs:
        await _write(backend, data, digest)
    assert await _listed(backend, "blob") == {d for _, d in blobs}
    await backend.delete_blob(blobs[0][1])
    await backend.delete_blob(blobs[0][1])
    assert await backend.blob_size(blobs[0][1]) is None
    assert await _listed(backend, "blob") == {d for _, d in blobs[1:]}


async def test_open_blob_answers_like_a_registry(backend: ContentStore) -> None:
    data, digest = _blob(10_000, seed=6)
    missing = Digest.of(b"missing")
    async with backend.open_blob(missing) as response:
        assert response.status == 404
    await _write(backend, data, digest)
    async with backend.open_blob(digest) as response:
        assert (response.status, response.content_length) == (200, len(data))
        assert await _drain(response) == data
    async with backend.open_blob(digest, 4000) as response:
        assert response.status == 206
        assert response.headers["Content-Range"].startswith("bytes 4000-9999/")
        assert await _drain(response) == data[4000:]


async def _drain(response: BodyResponse) -> bytes:
    parts = []
    while chunk := await response.content.read(4096):
        parts.append(chunk)
    return b"".join(parts)


async def test_readers_of_a_growing_blob_filled_from_the_backend(
        backend: ContentStore, tmp_path: Path) -> None:
    """A fill sourced from this backend: readers stream the local temp file as it grows."""
    data, digest = _blob(3 * MiB, seed=7)
    await _write(backend, data, digest)
    local = FilesystemStore(tmp_path / "local")
    await asyncio.to_thread(local.prepare)
    fetcher = Fetcher(local, chunk_size=256 * 1024)
    gate = asyncio.Event()

    def opener(offset: int) -> AbstractAsyncContextManager[BodyResponse]:
        return _gated(backend.open_blob(digest, offset), gate)

    fill, joined = await fetcher.start(digest, opener, "conformance", len(data))
    assert not joined
    first_chunk = [asyncio.Event() for _ in range(4)]

    async def reader(index: int) -> bytes:
        parts = []
        async for chunk in fill.read(0, len(data), 256 * 1024):
            parts.append(chunk)
            first_chunk[index].set()
        return b"".join(parts)

    readers = [asyncio.ensure_future(reader(i)) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_chunk)), 10)
    assert not fill.done  # every reader had bytes while the blob was still growing
    again, joined = await fetcher.start(digest, opener, "conformance", len(data))
    assert again is fill and joined
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*readers), 30) == [data] * 4
    assert local.blob_path(digest).read_bytes() == data
    await fetcher.close()


@asynccontextmanager
async def _gated(inner: AbstractAsyncContextManager[BodyResponse],
                 gate: asyncio.Event) -> AsyncIterator[BodyResponse]:
    """The backend's body, held after its first chunk until ``gate`` opens."""
    async with inner as response:
        yield S3Body(response.status, response.content_length, response.headers,
                     _GatedReader(response, gate))


class _GatedReader:
    def __init__(self, response: BodyResponse, gate: asyncio.Event) -> None:
        self._response = response
        self._gate = gate
        self._reads = 0

    async def read(self, n: int = -1) -> bytes:
        self._reads += 1
        if self._reads > 1:
            await self._gate.wait()
        return await self._response.content.read(min(n, 256 * 1024))

    def read_nowait(self, n: int = -1) -> bytes:
        return b""
