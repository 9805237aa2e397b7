"""Eviction: keeps the local cache under ``storage.max_size``, least recently used first.

Above the high watermark, the least recently used content that is neither
pinned nor in use (read by a client, or being downloaded) is deleted until the
cache is under the low watermark. A fill reserves its announced size when the
headers arrive and waits for that room to be made before it writes, so the
cache exceeds the limit by at most the blobs being downloaded.

Recency costs the request path one dict assignment (:meth:`Evictor.touch`);
a background task writes the batch to the index every ``FLUSH_INTERVAL`` in
a thread, and always before choosing victims, so a hit is never forgotten.
The same task re-reads the totals now and then, because ``mirror cache``
commands change the index from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from cachetools import LRUCache

from mirror import metrics
from mirror.config import StorageSettings
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry, Key

log = structlog.get_logger(__name__)

FLUSH_INTERVAL = 2.0
REFRESH_INTERVAL = 10.0
BATCH = 256


class Evictor:
    """Owns the byte budget of the local cache."""

    def __init__(self, store: FilesystemStore, settings: StorageSettings,
                 in_use: Callable[[str], bool] = lambda _d: False,
                 on_evicted: Callable[[Entry], None] = lambda _e: None) -> None:
        self._store = store
        self._index = store.index
        self._settings = settings
        self._in_use = in_use
        self._on_evicted = on_evicted
        self._on_external: Callable[[], None] = lambda: None
        self._generation: int | None = None
        self._touched: dict[Key, float] = {}
        #: The last use of recently used content, kept past the flush (node._changed_elsewhere).
        self.recent: LRUCache[Key, float] = LRUCache(maxsize=8192)
        self._reserved = 0
        self._pinned_bytes = 0
        self._lock = asyncio.Lock()
        #: Other processes (workers) serve the same cache: tell them of evictions.
        self.shared = False
        metrics.CACHE_MAX_BYTES.set(settings.max_size or 0)

    def wire(self, in_use: Callable[[str], bool], on_evicted: Callable[[Entry], None],
             on_external: Callable[[], None] = lambda: None) -> None:
        """Set what is in use and who hears of evictions (the caches are built after us).

        ``on_external`` runs when another process removed content (``mirror
        cache evict`` or ``fsck``): in-memory copies must be dropped.
        """
        self._in_use = in_use
        self._on_evicted = on_evicted
        self._on_external = on_external

    # --- the request path: no I/O ------------------------------------------------------
    def touch(self, kind: str, digest: str) -> None:
        """Content was used: renew its recency (written to the index in a batch)."""
        now = time.time()
        self._touched[(kind, digest)] = now
        self.recent[(kind, digest)] = now

    def fits(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes can ever be kept (not over ``max_size``)."""
        return self._settings.max_size is None or size <= self._settings.max_size

    async def reserve(self, size: int) -> None:
        """A download of ``size`` bytes starts: make room for it before its bytes land.

        Costs the download a few milliseconds only when the cache is over the
        high watermark (a batch of unlinks and one index write, in a thread).
        """
        self._reserved += size
        high = self._settings.high_bytes
        if high is not None and self._index.total_bytes + self._reserved > high:
            try:
                await self.check()
            except Exception as exc:  # the download goes on; the loop retries eviction
                log.warning("eviction_failed", error=str(exc) or type(exc).__name__)

    def release(self, size: int) -> None:
        """A download ended (published or not): its reservation is over."""
        self._reserved -= size

    # --- space for the fetcher -----------------------------------------------------------
    async def admit(self, size: int) -> bool:
        """Whether a verified blob of ``size`` bytes may be kept, evicting to make room.

        ``False`` when pinned or busy content leaves no room: the blob is then
        streamed to its readers and not kept.
        """
        limit = self._settings.max_size
        if limit is None:
            return True
        if self._used() + size > limit:
            await self._evict(lambda: self._used() + size - limit, "watermark")
        return self._index.total_bytes + size <= limit

    async def make_room(self, size: int) -> int:
        """The disk is full: evict at least ``size`` bytes if possible; returns bytes freed."""
        return await self.evict_bytes(size, "disk_full")

    # --- lifetime ------------------------------------------------------------------------
    async def stop(self) -> None:
        """Write the last recency updates (after the node stopped :meth:`run`)."""
        with contextlib.suppress(Exception):
            await self.flush()

    async def run(self, evict: bool = True) -> None:
        """The background loop (recency flush, totals, watermark); the node owns its task.

        Without ``evict`` (every worker but the one that evicts) it only writes recency
        and re-reads totals.
        """
        self._publish_metrics()
        refreshed = 0.0
        failures = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
                if time.monotonic() - refreshed > REFRESH_INTERVAL:
                    await self._refresh()
                    refreshed = time.monotonic()
                if evict:
                    await self.check()
                failures = 0
            except Exception as exc:  # the loop never dies; retry with growing backoff
                failures += 1
                log.warning("eviction_loop_failed", error=str(exc) or type(exc).__name__,
                            failures=failures)
                await asyncio.sleep(min(0.5 * 2 ** failures, 30))
            self._publish_metrics()

    async def _refresh(self) -> None:
        """Re-read what other processes may have changed: totals, pins, removals."""
        await asyncio.to_thread(self._index.refresh_totals)
        self._pinned_bytes = await asyncio.to_thread(self._index.pinned_bytes)
        generation = await asyncio.to_thread(self._index.generation)
        if self._generation is not None and generation != self._generation:
            log.info("cache_changed_elsewhere", hint="mirror cache evict or fsck removed content")
            self._on_external()
        self._generation = generation

    # --- eviction --------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write pending recency updates to the index (in a thread)."""
        if not self._touched:
            return
        pending, self._touched = self._touched, {}
        try:
            await asyncio.to_thread(self._index.touch,
                                    [(k, d, t) for (k, d), t in pending.items()])
        except BaseException:
            for key, when in pending.items():
                self._touched.setdefault(key, when)
            raise

    async def check(self) -> int:
        """Evict down to the low watermark if the cache is over the high one.

        The excess is computed under the lock, after any eviction before it: however
        many fills reserve at once, the cache stops at the low watermark.

        Returns:
            Bytes freed.
        """
        high, low = self._settings.high_bytes, self._settings.low_bytes
        if high is None or low is None or self._used() <= high:
            return 0
        return await self._evict(lambda: self._used() - low if self._used() > high else 0,
                                 "watermark")

    def _used(self) -> int:
        return self._index.total_bytes + self._reserved

    async def evict_bytes(self, amount: int, reason: str) -> int:
        """Evict at least ``amount`` bytes of unpinned, unused content, oldest use first.

        Returns:
            Bytes freed (less than asked when everything left is pinned or busy).
        """
        return await self._evict(lambda: amount, reason)

    async def _evict(self, wanted: Callable[[], int], reason: str) -> int:
        """Evict ``wanted()`` bytes, the amount decided once the lock is held."""
        async with self._lock:
            await self.flush()
            amount = wanted()
            if amount <= 0:
                return 0
            freed = skipped = 0
            while freed < amount:
                batch = await asyncio.to_thread(self._index.least_recent, BATCH, skipped)
                if not batch:
                    break
                victims, skipped = self._choose(batch, amount - freed, skipped)
                if victims:
                    freed += await self._delete(victims, reason)
            if freed < amount:
                log.warning("eviction_short", reason=reason, wanted=amount, freed=freed,
                            cache_bytes=self._index.total_bytes,
                            hint="the rest is pinned or in use")
            self._publish_metrics()
            return freed

    def _choose(self, batch: list[Entry], wanted: int, skipped: int) -> tuple[list[Entry], int]:
        victims: list[Entry] = []
        planned = 0
        for entry in batch:
            if entry.key in self._touched or self._in_use(entry.digest):
                skipped += 1
                continue
            victims.append(entry)
            planned += entry.size
            if planned >= wanted:
                break
        return victims, skipped

    async def _delete(self, victims: list[Entry], reason: str) -> int:
        freed = await asyncio.to_thread(self._store.evict, victims)
        for entry in victims:
            self._on_evicted(entry)
        if self.shared:  # the other workers drop their memory copies on their next refresh
            await asyncio.to_thread(self._index.bump_generation)
            self._generation = await asyncio.to_thread(self._index.generation)
        metrics.EVICTIONS.labels(reason).inc(len(victims))
        metrics.EVICTED_BYTES.labels(reason).inc(freed)
        log.info("evicted", reason=reason, entries=len(victims), bytes=freed,
                 cache_bytes=self._index.total_bytes)
        return freed

    def _publish_metrics(self) -> None:
        total = self._index.total_bytes
        metrics.CACHE_BYTES.set(total)
        metrics.CACHE_ENTRIES.set(self._index.total_entries)
        metrics.CACHE_PINNED_BYTES.set(self._pinned_bytes)
        high, low = self._settings.high_bytes, self._settings.low_bytes
        state = 0
        if high is not None and low is not None:
            state = 2 if total > high else 1 if total > low else 0
        metrics.CACHE_WATERMARK.set(state)
