"""Eviction: keeps the local cache under ``storage.max_size``, least recently used first.

Above the high watermark, the least recently used content that is neither
pinned nor in use (read by a client, or being downloaded) is deleted until the
cache is under the low watermark. A fill reserves its announced size when the
headers arrive and waits for that room to be made before it writes; its
reservation ends once the blob is published (or dropped), so the bytes are
counted all along.

The budget is the node's, not a process's: with worker processes
(``server.workers``) every decision reads the stored bytes and every process's
reservations from the index (one row per process, :meth:`Index.budget`) under a
lock file that one process holds at a time (:class:`NodeLock`), and whichever
process reserves evicts. Two workers filling at once therefore see each other's
downloads, and the cap holds for the node as it does for one process.

Recency costs the request path one dict assignment (:meth:`Evictor.touch`);
a background task writes the batch to the index every ``FLUSH_INTERVAL`` in
a thread, and always before choosing victims, so a hit is never forgotten.
The same task re-reads the totals now and then, because ``mirror cache``
commands change the index from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

import structlog
from cachetools import LRUCache

from mirror import metrics
from mirror.config import StorageSettings
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry, Key
from mirror.storage.nodelock import NodeLock

log = structlog.get_logger(__name__)

FLUSH_INTERVAL = 2.0
#: Totals are re-read this often (other workers and ``mirror cache`` change them).
REFRESH_INTERVAL = 2.0
BATCH = 256
#: The lock file beside the index that serialises the node's budget decisions.
LOCK_FILE = "budget.lock"


class Evictor:
    """Owns the byte budget of the local cache."""

    def __init__(self, store: FilesystemStore, settings: StorageSettings,
                 in_use: Callable[[str], bool] = lambda _d: False,
                 on_evicted: Callable[[Entry], None] = lambda _e: None,
                 pid: int | None = None) -> None:
        """Args:
            store: the local store (its index holds the node's totals).
            settings: ``storage`` settings (cap and watermarks).
            in_use: whether a digest is being read or written here.
            on_evicted: told of every entry evicted.
            pid: whose reservations these are in the index (this process by default).
        """
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
        self._others_reserved = 0  # other processes', as last read
        self._last_used = 0  # the node's bytes after the last eviction decision
        self._pid = os.getpid() if pid is None else pid
        self._pinned_bytes = 0
        self._lock = NodeLock(store.root / LOCK_FILE)
        self._row_lock = asyncio.Lock()
        self._row_writes: set[asyncio.Task[None]] = set()
        #: Other processes (workers) serve the same cache: tell them of evictions.
        self.shared = False
        metrics.CACHE_MAX_BYTES.set(settings.max_size or 0)

    def resize(self, settings: StorageSettings) -> None:
        """The cap was resolved at start (``max_size: auto``): use these settings from now."""
        self._settings = settings
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

    async def reserve(self, size: int) -> bool:
        """A download of ``size`` bytes starts: make room for it before its bytes land.

        The reservation is the node's (every process sees it). Costs the download a
        few milliseconds: one index transaction under the node's lock, and when the
        node is over the high watermark, a batch of unlinks (in a thread).

        Returns:
            Whether there is room: ``False`` when pinned content, content in use and
            the downloads under way leave less than ``size`` bytes under ``max_size``
            even after eviction; the reservation is then given back, and the download
            must not be written to disk (it is relayed to its readers, not kept).
        """
        self._reserved += size
        limit = self._settings.max_size
        if limit is None:
            return True
        try:
            await self.check()
        except Exception as exc:  # the download goes on; the loop retries eviction
            log.warning("eviction_failed", error=str(exc) or type(exc).__name__)
            return True
        if self._last_used <= limit:
            return True
        self._reserved -= size
        await self._write_reserved()  # given back at once: the others may use the room
        log.warning("no_room_for_download", bytes=size, node_bytes=self._last_used,
                    max_size=limit, hint="pinned content, content in use and downloads "
                    "under way fill storage.max_size: relayed, not kept")
        return False

    def release(self, size: int) -> None:
        """A download ended (published or not): its reservation is over.

        The other processes hear of it by a write in a task (the request path does no
        I/O); until then they count it, which errs on the side of the cap.
        """
        self._reserved -= size
        if self._settings.max_size is None:
            return
        task = asyncio.get_running_loop().create_task(self._write_reserved())
        self._row_writes.add(task)
        task.add_done_callback(self._row_writes.discard)

    async def _write_reserved(self) -> None:
        try:
            async with self._row_lock:  # the last write carries the latest figure
                await asyncio.to_thread(self._index.budget, self._pid, self._reserved)
        except Exception as exc:  # the next decision writes it again
            log.warning("reservation_write_failed", error=str(exc) or type(exc).__name__)

    async def _usage(self) -> int:
        """The node's bytes: stored, plus reserved by every live process (this one's
        written first). On a full disk (the write fails) the others' reservations are
        those last read."""
        async with self._row_lock:
            try:
                stored, reserved = await asyncio.to_thread(self._index.budget, self._pid,
                                                           self._reserved)
            except Exception as exc:  # "database or disk is full": read, do not write
                log.warning("reservation_write_failed", error=str(exc) or type(exc).__name__)
                stored = (await asyncio.to_thread(self._index.refresh_totals))[0]
                return stored + self._reserved + self._others_reserved
        self._others_reserved = reserved - self._reserved
        return stored + reserved

    # --- space for the fetcher -----------------------------------------------------------
    async def admit(self, size: int, held: int = 0) -> bool:
        """Whether a verified blob of ``size`` bytes may be kept, evicting to make room.

        Args:
            size: the blob's bytes.
            held: bytes of it that this process still holds reserved (they become the
                stored blob: not counted twice).

        Returns:
            ``False`` when pinned or busy content leaves no room: the blob is then
            streamed to its readers and not kept.
        """
        limit = self._settings.max_size
        if limit is None:
            return True
        await self._evict(lambda used: used - held + size - limit, "watermark")
        return self._index.total_bytes + size <= limit

    async def make_room(self, size: int) -> int:
        """The disk is full: evict at least ``size`` bytes if possible; returns bytes freed."""
        return await self.evict_bytes(size, "disk_full")

    # --- lifetime ------------------------------------------------------------------------
    async def stop(self) -> None:
        """Write the last recency updates (after the node stopped :meth:`run`)."""
        with contextlib.suppress(Exception):
            await self.flush()
        if self._row_writes:
            await asyncio.gather(*self._row_writes, return_exceptions=True)
        if self._settings.max_size is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._index.drop_reservation, self._pid)
        self._lock.close()

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
        """Evict down to the low watermark if the node is over the high one.

        The excess is computed under the node's lock, after any eviction before it:
        however many fills reserve at once, in however many processes, the cache
        stops at the low watermark.

        Returns:
            Bytes freed.
        """
        high, low = self._settings.high_bytes, self._settings.low_bytes
        if high is None or low is None:
            return 0
        return await self._evict(lambda used: used - low if used > high else 0, "watermark")

    async def evict_bytes(self, amount: int, reason: str) -> int:
        """Evict at least ``amount`` bytes of unpinned, unused content, oldest use first.

        Returns:
            Bytes freed (less than asked when everything left is pinned or busy).
        """
        return await self._evict(lambda _used: amount, reason)

    async def _evict(self, wanted: Callable[[int], int], reason: str) -> int:
        """Evict ``wanted(node bytes)`` bytes, decided once the node's lock is held."""
        async with self._lock:
            await self.flush()
            used = await self._usage()
            self._last_used = used
            amount = wanted(used)
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
            self._last_used = used - freed
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
