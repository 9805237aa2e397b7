"""Blobs: answered from disk (small ones from memory), filled once on a miss.

Blob content never changes, so a blob on disk is served without asking
upstream. Sizes of known blobs and the bytes of small ones are kept in bounded
in-memory caches so that a hot request costs no disk call on the event loop.

A corrupted blob is never served as wrong bytes where it can be caught cheaply:
small blobs are hashed when they are loaded into memory, and a blob the index
does not vouch for (adopted at start-up after a crash) is hashed once before
it is first served. A blob that fails is removed and fetched again. Large
verified blobs are not re-hashed on every read (that would halve throughput);
``mirror cache fsck`` re-hashes everything.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from cachetools import LRUCache

from mirror.config import CacheSettings
from mirror.errors import BlobUnknown, OciError
from mirror.fetch import Fetcher, Fill, SingleFlight
from mirror.oci import Digest, referenced_digests
from mirror.sources import ContentRef, SourceChain
from mirror.storage.filesystem import FilesystemStore


@dataclass(frozen=True, slots=True)
class CachedBlob:
    """A verified blob on this node."""

    digest: Digest
    size: int
    data: bytes | None  # the bytes themselves when small enough to keep in memory


class BlobCache:
    """Finds blobs locally and starts or joins fills for the rest."""

    def __init__(self, store: FilesystemStore, fetcher: Fetcher, settings: CacheSettings,
                 on_hit: Callable[[str, str], None] = lambda _k, _d: None) -> None:
        self._store = store
        self._on_hit = on_hit
        self._open: Counter[Digest] = Counter()
        self._verifying: SingleFlight[Digest, bool | None] = SingleFlight()
        self._fetcher = fetcher
        self._item_max = settings.memory_item_max_bytes
        self._sizes: LRUCache[Digest, int] = LRUCache(maxsize=200_000)
        self._size_hints = fetcher.hints  # advisory: see mirror/fetch/hints.py
        self._memory: LRUCache[Digest, bytes] = LRUCache(
            maxsize=max(settings.memory_max_bytes, 1), getsizeof=len
        )

    async def cached(self, digest: Digest) -> CachedBlob | None:
        """The blob if this node has it, with its bytes when it is small."""
        data = self._memory.get(digest)
        if data is not None:
            self._on_hit("blob", str(digest))
            return CachedBlob(digest, len(data), data)
        size = self._sizes.get(digest)
        if size is None:
            info = await asyncio.to_thread(self._store.blob_info, digest)
            if info is None:
                return None
            size, verified = info
            if not verified and size > self._item_max and not await self._verify(digest):
                return None
            self._sizes[digest] = size
        if size <= self._item_max:
            data = await self._load(digest)
            if data is None:
                return None
        self._on_hit("blob", str(digest))
        return CachedBlob(digest, size, data)

    async def put(self, digest: Digest, data: bytes) -> None:
        """Keep small bytes made here (the mirror's countersignature): checked against
        ``digest``, written once (temp file and rename) for every worker and restart."""
        if not digest.matches(data):
            raise ValueError(f"bytes do not match {digest}")
        if await asyncio.to_thread(self._store.blob_size, digest) is None:
            await asyncio.to_thread(self._store.write_blob, digest, data)
        self._memory[digest] = data

    async def _verify(self, digest: Digest) -> bool:
        """Hash a blob the index does not vouch for (once, however many ask)."""
        ok, _ = await self._verifying.run(
            digest, lambda: asyncio.to_thread(self._store.verify, "blob", digest))
        if not ok:
            self.forget(digest)
        return bool(ok)

    async def _load(self, digest: Digest) -> bytes | None:
        data = await asyncio.to_thread(self._read_verified, digest)
        if data is None:
            self.forget(digest)
            return None
        self._memory[digest] = data
        return data

    def _read_verified(self, digest: Digest) -> bytes | None:
        try:
            data = self._store.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        if digest.matches(data):
            return data
        # Bit rot or tampering: remove it (counted and logged) so it is fetched again.
        self._store.verify("blob", digest)
        return None

    async def open(self, blob: CachedBlob) -> IO[bytes] | None:
        """An open file of a cached blob, or ``None`` when it vanished (evicted).

        The caller calls :meth:`closed` when done: open blobs are never evicted.
        """
        try:
            file = await asyncio.to_thread(open, self._store.blob_path(blob.digest), "rb")
        except FileNotFoundError:
            self.forget(blob.digest)
            return None
        self._open[blob.digest] += 1
        return file

    def closed(self, digest: Digest) -> None:
        """A file from :meth:`open` was closed."""
        self._open[digest] -= 1
        if self._open[digest] <= 0:
            del self._open[digest]

    def busy(self, digest: Digest) -> bool:
        """Whether the blob is being read or downloaded (never evicted then)."""
        return self._open[digest] > 0 or self._fetcher.busy(digest)

    async def keep(self, held: dict[Digest, bytes], digests: set[str]) -> int:
        """Store again the small blobs of ``digests`` in ``held`` (what memory held) that
        are no longer on disk (removed by another process while this one answered them).
        Returns how many."""
        wanted = {d: data for d, data in held.items() if str(d) in digests}

        def restore() -> int:
            restored = 0
            for digest, data in wanted.items():
                if self._store.blob_size(digest) is None:
                    self._store.write_blob(digest, data)
                    restored += 1
            return restored

        return await asyncio.to_thread(restore)

    def clear_memory(self) -> None:
        """Forget every size and byte held in memory (content was removed elsewhere)."""
        self.take_memory()

    def take_memory(self) -> dict[Digest, bytes]:
        """Forget every size and byte held in memory (content was removed elsewhere) and
        return the bytes, for :meth:`keep`."""
        held = dict(self._memory)
        self._sizes.clear()
        self._memory.clear()
        return held

    def forget(self, digest: Digest) -> None:
        """Drop what memory knows of a blob (it was removed from disk)."""
        self._sizes.pop(digest, None)
        self._memory.pop(digest, None)

    def in_flight(self, digest: Digest) -> Fill | None:
        """The download under way for ``digest``, if any."""
        return self._fetcher.current(digest)

    async def fill(self, origin: SourceChain, ref: ContentRef) -> tuple[Fill, bool]:
        """Join the download of ``ref.digest`` or start one through ``origin``'s sources.

        Returns:
            The fill, and whether this request joined one under way.
        """
        fill, joined = await self._fetcher.start(ref.digest, origin.opener(ref), origin.name,
                                                 expected_size=self._size_hints.get(ref.digest))
        if not joined:
            origin.offer_blob(ref, fill)
        return fill, joined

    def learn_sizes(self, document: dict[str, Any]) -> None:
        """Remember the blob sizes a manifest declares.

        A fill can then announce the size (and stream) even when upstream
        sends no Content-Length, and refuses a body of another size.
        """
        for kind, text, size in referenced_digests(document):
            if kind == "blob" and size > 0:
                try:
                    self._size_hints[Digest.parse(text)] = size
                except OciError:
                    continue

    async def source_size(self, origin: SourceChain, ref: ContentRef) -> int:
        """A blob's size without downloading it (for HEAD), from the first source that has it.

        Raises:
            BlobUnknown: no source has it.
            UpstreamUnavailable: upstream failed or sent no length.
        """
        size = await origin.blob_size(ref)
        if size is None:
            raise BlobUnknown(f"blob {ref.digest} is unknown upstream")
        return size
