"""Any :class:`~mirror.storage.base.ContentStore` as a source: the in-memory store of the
tests, and later an imported bundle's layout. Content-addressed, so the repository of
the request does not matter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mirror.sources.base import ContentRef, PassiveSource
from mirror.storage.base import BodyResponse, ContentStore


class StoreSource(PassiveSource):
    """Reads blobs and manifests of a content store by digest."""

    def __init__(self, store: ContentStore, kind: str) -> None:
        self.store = store
        self._kind = kind

    @property
    def kind(self) -> str:
        return self._kind

    @asynccontextmanager
    async def open_blob(self, ref: ContentRef, offset: int,
                        end: int | None = None) -> AsyncIterator[BodyResponse]:
        # A store reads from a local file or memory: bytes past ``end`` cost nothing.
        async with self.store.open_blob(ref.digest, offset) as body:
            yield body

    async def blob_size(self, ref: ContentRef) -> int | None:
        return await self.store.blob_size(ref.digest)

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        return await self.store.get_manifest(ref.digest)
