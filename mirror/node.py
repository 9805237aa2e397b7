"""The node: builds every part of the mirror from the settings and owns its background work.

::

    Node.start()                      Node.stop() (reverse order)
      storage folder + index            stop serving (ready = False)
      tag records                       background tasks: loops stopped, reconcile awaited
      S3 tier (optional)                fills: ``server.shutdown_grace``, then cancelled
      caches, fetcher, sources          in-flight manifest/tag work cancelled
      upstream clients, pull service    S3 uploads: given a grace, then cancelled
      background: reconcile -> eviction upstream clients, tag records, index closed

Every background task runs in the node's :class:`~mirror.tasks.TaskGroup`: a
loop that fails is restarted with backoff and counted. Requests never wait on
background work; they only use the pull service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AsyncExitStack

import structlog

from mirror.cache.blobs import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.manifests import ManifestCache
from mirror.cache.tags import TagStore
from mirror.clock import SYSTEM, Clock
from mirror.config import Settings
from mirror.fetch import Fetcher
from mirror.oci import Digest
from mirror.pull import PullService
from mirror.routing import Router
from mirror.sources import Source, SourceChain, UpstreamSource
from mirror.sources.chain import Rejections
from mirror.sources.s3 import S3Source
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry
from mirror.storage.s3 import open_s3
from mirror.tasks import TaskGroup
from mirror.upstream import UpstreamClient
from mirror.upstream.guard import UpstreamGuard

log = structlog.get_logger(__name__)

class Node:
    """One mirror process: storage, caches, sources, upstream clients, background tasks."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM,
                 extra_sources: Sequence[Source] = ()) -> None:
        """Args:
            settings: validated settings.
            clock: the time every TTL and schedule reads (tests pass a manual one).
            extra_sources: sources asked before S3 and upstream (tests; imported bundles).
        """
        self.settings = settings
        self.clock = clock
        self.router = Router(settings.upstreams)
        self.tasks = TaskGroup("node")
        self.ready = False
        self.s3: S3Source | None = None
        self._extra_sources = tuple(extra_sources)
        self._stack = AsyncExitStack()
        self.store = FilesystemStore(settings.storage.path)
        self.tags = TagStore(self.store.tags)
        self.evictor = Evictor(self.store, settings.storage)
        self.fetcher = Fetcher(self.store, settings.server.chunk_size, space=self.evictor,
                               relay_max_bytes=settings.storage.relay_window)
        self.blobs = BlobCache(self.store, self.fetcher, settings.cache, on_hit=self.evictor.touch)
        self.manifests = ManifestCache(self.store, self.tags, settings.cache,
                                       on_fetched=self.blobs.learn_sizes,
                                       on_hit=self.evictor.touch, clock=clock)
        self.clients = {u.name: UpstreamClient(u, clock=clock.monotonic,
                                               guard=UpstreamGuard(u, clock=clock.monotonic))
                        for u in settings.upstreams}
        self.pull: PullService

    async def start(self, *, exclusive: bool = True) -> None:
        """Open storage and the S3 tier, build the pull service, start background work.

        Args:
            exclusive: this process owns the storage (``mirror serve``): stale temp
                files are removed and reconcile and eviction run. ``False`` for CLI
                commands that may run beside a server (``mirror export``): storage is
                opened as the ``mirror cache`` commands open it, with no background work.
        """
        removed = await asyncio.to_thread(self.store.open if exclusive else self.store.open_shared)
        await self.tags.open()
        if self.settings.storage.s3 is not None:
            s3 = self.settings.storage.s3
            store = await self._stack.enter_async_context(open_s3(s3))
            self.s3 = S3Source(store, s3, self.clock)
            log.info("s3_tier_started", bucket=store.bucket, prefix=store.prefix,
                     endpoint=str(s3.endpoint_url or "aws"))
        self.pull = PullService(self._chains(), self.manifests, self.blobs, redirector=self.s3,
                                clock=self.clock, tag_list_ttl=self.settings.cache.tag_ttl)
        self._wire_evictor()
        if not exclusive:
            self.ready = True
            return
        self.tasks.spawn(self._reconcile_then_evict(), "reconcile")
        self.ready = True
        log.info("mirror_started", storage=str(self.store.root), stale_temp_removed=removed,
                 max_size=self.settings.storage.max_size,
                 upstreams=[u.name for u in self.settings.upstreams])

    def _chains(self) -> dict[str, SourceChain]:
        before: list[Source] = list(self._extra_sources)
        if self.s3 is not None:
            before.append(self.s3)
        rejections = Rejections(clock=self.clock)
        return {name: SourceChain(before, UpstreamSource(client), rejections)
                for name, client in self.clients.items()}

    async def stop(self) -> None:
        """Stop in the reverse order of :meth:`start`."""
        self.ready = False
        await self.tasks.close()
        await self.fetcher.close(self.settings.server.shutdown_grace)
        await self.manifests.close()
        await self.evictor.stop()
        if self.s3 is not None:
            await self.s3.close()
        await self._stack.aclose()
        for client in self.clients.values():
            await client.close()
        await self.tags.close()
        await asyncio.to_thread(self.store.index.close)
        log.info("mirror_stopped")

    async def _reconcile_then_evict(self) -> None:
        """Make the index agree with the disk while already serving, then run eviction.

        Serving before this is done is safe: a file the index does not know is
        hashed before it is served, a missing one is fetched again. Eviction
        waits, because it needs true totals. A failed reconcile is retried with
        backoff (eviction stays off only until it succeeds).
        """
        await self.tasks.loop("reconcile", self._reconcile)
        self.tasks.loop("eviction", self.evictor.run)

    async def _reconcile(self) -> None:
        found = await asyncio.to_thread(self.store.reconcile)
        log.info("cache_reconciled", cache_entries=found.entries, cache_bytes=found.bytes,
                 adopted=found.adopted, dropped=found.dropped,
                 size_mismatch=found.size_mismatch, seconds=round(found.seconds, 3))

    def _wire_evictor(self) -> None:
        """Tell the evictor what is in use, and the caches what was evicted."""
        blobs, manifests = self.blobs, self.manifests

        def in_use(digest: str) -> bool:
            return blobs.busy(Digest.parse(digest))

        def evicted(entry: Entry) -> None:
            digest = Digest.parse(entry.digest)
            if entry.kind == "blob":
                blobs.forget(digest)
            else:
                manifests.forget(digest)

        def changed_elsewhere() -> None:
            blobs.clear_memory()
            manifests.clear_memory()

        self.evictor.wire(in_use, evicted, changed_elsewhere)
