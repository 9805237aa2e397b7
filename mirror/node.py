"""The node: builds every part of the mirror from the settings and owns its background work.

::

    Node.start()                      Node.stop() (reverse order)
      storage folder + index            stop serving (ready = False)
      tag records                       background tasks: loops stopped, reconcile awaited
      S3 tier (optional)                fills: ``server.shutdown_grace``, then cancelled
      caches, fetcher, sources          in-flight manifest/tag work cancelled
      upstream clients, pull service    S3 uploads: given a grace, then cancelled
      popularity, sync records          popularity and sync records saved
      background: reconcile -> eviction upstream clients, tag records, index closed
                  popularity saver,
                  sync loop (if `sync:`)

Every background task runs in the node's :class:`~mirror.tasks.TaskGroup`: a
loop that fails is restarted with backoff and counted. Requests never wait on
background work; they only use the pull service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import aiohttp
import structlog

from mirror import metrics, worker
from mirror.audit import AuditTrail
from mirror.cache.blobs import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.manifests import ManifestCache
from mirror.cache.membership import FILE_NAME as MEMBERSHIP_FILE
from mirror.cache.membership import Membership as RepoMembership
from mirror.cache.membership import holds_private
from mirror.cache.tags import TagStore
from mirror.clock import SYSTEM, Clock
from mirror.cluster import PeerSet, TokenSource
from mirror.config import Settings, StorageSettings, SyncSettings, resolve_max_size
from mirror.errors import ConfigError
from mirror.fetch import Coalescer, Fetcher, LocalCoalescer
from mirror.fetch.claim import ClaimCoalescer, Claims
from mirror.oci import Digest
from mirror.policy import compile_policy
from mirror.policy.countersign import Countersigner
from mirror.policy.crypto import Invalid
from mirror.policy.gate import Gate
from mirror.pull import PullService
from mirror.routing import Router
from mirror.sources import Source, SourceChain, UpstreamSource
from mirror.sources.chain import Rejections
from mirror.sources.peer import ParentSource, PeerSource
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry
from mirror.sync import Popularity, SyncService
from mirror.tasks import TaskGroup
from mirror.upstream import UpstreamClient
from mirror.upstream.guard import UpstreamGuard
from mirror.version import VERSION

if TYPE_CHECKING:
    from mirror.sources.s3 import S3Source

log = structlog.get_logger(__name__)

#: Seconds between saves of the popularity counts (when they changed) and reads of the
#: other processes' counts: alone, and with worker processes (whose pages and sync
#: loop sum every worker's counts, so they are shared promptly).
POPULARITY_SAVE_EVERY = 15.0
POPULARITY_SHARE_EVERY = 2.0


def max_size_origin(storage: StorageSettings) -> str:
    """Where the cache's cap comes from: ``auto`` (a share of the disk), ``config`` or ``none``."""
    if storage.max_size_auto:
        return "auto"
    return "none" if storage.max_size is None else "config"


class Node:
    """One mirror process: storage, caches, sources, upstream clients, background tasks."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM,
                 extra_sources: Sequence[Source] = (), sync_loop: bool = True) -> None:
        """Args:
            settings: validated settings.
            clock: the time every TTL and schedule reads (tests pass a manual one).
            extra_sources: sources asked before S3 and upstream (tests; imported bundles).
            sync_loop: run the scheduled sync loop when ``sync:`` is configured (commands
                that warm once, like ``mirror warm``, pass ``False``).
        """
        self._sync_loop = sync_loop
        self.settings = settings
        self.clock = clock
        self.router = Router(settings.upstreams)
        self.tasks = TaskGroup("node")
        self.ready = False
        self.s3: S3Source | None = None
        self._extra_sources = tuple(extra_sources)
        self._stack = AsyncExitStack()
        self.worker = worker.current()
        self.store = FilesystemStore(settings.storage.path,
                                     temp_folder=self.worker.temp_folder)
        self.tags = TagStore(self.store.tags)
        self.evictor = Evictor(self.store, settings.storage)
        # With worker processes: one download, one manifest fetch, one tag check per node.
        self._claims: Claims | None = Claims(settings.storage.path / "tmp" / "claims") \
            if self.worker.count > 1 else None
        coalescer: Coalescer = ClaimCoalescer(self._claims) if self._claims is not None \
            else LocalCoalescer()
        self.fetcher = Fetcher(self.store, settings.server.chunk_size, space=self.evictor,
                               relay_max_bytes=settings.storage.relay_window, coalescer=coalescer)
        self.blobs = BlobCache(self.store, self.fetcher, settings.cache, on_hit=self.evictor.touch)
        self.manifests = ManifestCache(self.store, self.tags, settings.cache,
                                       on_fetched=self.blobs.learn_sizes,
                                       on_hit=self.evictor.touch, clock=clock,
                                       coalescer=coalescer)
        self.clients = {u.name: UpstreamClient(u, clock=clock.monotonic,
                                               guard=UpstreamGuard(u, clock=clock.monotonic))
                        for u in settings.upstreams}
        self.repos = RepoMembership(self.store.root / MEMBERSHIP_FILE,
                                    refused_ttl=settings.cache.negative_ttl)
        sync = settings.sync or SyncSettings()
        # Pull counts for the status page, the admin API and the sync loop's `popular`.
        # Each worker counts the pulls it answers, in a file of its own (no worker's save
        # clobbers another's), and reads the others' files: every reader sees the node's.
        name = "popularity.json" if self.worker.count == 1 else \
            f"popularity-w{self.worker.index}.json"
        self.popularity = Popularity(settings.storage.path / "sync" / name,
                                     window=sync.popular.window,
                                     max_entries=sync.popular.max_entries,
                                     per_client=sync.popular.per_client, clock=clock)
        #: Called with a digest removed from the cache, or ``None``: content went away
        #: elsewhere (another process): copies kept in memory above the caches drop it.
        self.on_removed: list[Callable[[str | None], None]] = []
        self.pull: PullService
        self.sync: SyncService
        self.pull_for: dict[str, PullService] = {}
        self.audit: AuditTrail | None = None
        self.peer_set: PeerSet | None = None
        self.tokens: TokenSource | None = None
        self.peers: PeerSource | None = None
        self.parents: ParentSource | None = None

    async def start(self, *, exclusive: bool = True) -> None:
        """Open storage and the S3 tier, build the pull service, start background work.

        Args:
            exclusive: this process owns the storage (``mirror serve``): stale temp
                files are removed and reconcile and eviction run. ``False`` for CLI
                commands that may run beside a server (``mirror export``): storage is
                opened as the ``mirror cache`` commands open it, with no background work.
        """
        removed = await asyncio.to_thread(self.store.open if exclusive else self.store.open_shared)
        if exclusive and self._claims is not None:  # what a worker that died left behind
            removed += await asyncio.to_thread(self._claims.sweep)
        await self._resolve_max_size()
        await self.tags.open()
        if self.settings.storage.s3 is not None:
            # botocore (about 11 MiB resident) only in a node with an S3 tier
            from mirror.sources.s3 import S3Source  # noqa: PLC0415
            from mirror.storage.s3 import open_s3  # noqa: PLC0415

            s3 = self.settings.storage.s3
            store = await self._stack.enter_async_context(open_s3(s3))
            self.s3 = S3Source(store, s3, self.clock)
            log.info("s3_tier_started", bucket=store.bucket, prefix=store.prefix,
                     endpoint=str(s3.endpoint_url or "aws"))
        await self._start_cluster()
        chains = self._chains()
        await asyncio.to_thread(self.repos.open)
        private = frozenset(u.name for u in self.settings.upstreams if holds_private(u))
        # Isolation by registry matters once content may be private (credentials) or some
        # clients may pull less than others (auth): without either, anyone pulls anything.
        isolate = bool(private) or self.settings.auth is not None
        self.pull = PullService(chains["client"], self.manifests, self.blobs, redirector=self.s3,
                                clock=self.clock, tag_list_ttl=self.settings.cache.tag_ttl,
                                membership=self.repos, private=private, isolate=isolate)
        self.pull.gate = self._policy_gate()
        self.pull.countersigner = self._countersigner()
        if self.pull.countersigner is not None:
            self.on_removed.append(self.pull.forget_countersigned)
        self.pull_for = {hop: self.pull.with_chains(chains[hop]) for hop in ("peer", "child")}
        self.audit = self._audit_trail()
        self._wire_evictor()
        if not exclusive:
            self.sync = self._sync_service()  # plans and warms on demand; no loop runs
            await self.sync.load()
            self.ready = True
            return
        self.tasks.spawn(self._reconcile_then_evict(), "reconcile")
        self.tasks.loop("registry_bytes", self._registry_bytes)
        self.tasks.loop("disk_bytes", self._disk_bytes)
        await self._start_sync()
        self.ready = True
        log.info("mirror_started", version=VERSION, listen=f"{self.settings.listen_host}:"
                 f"{self.settings.listen_port}", tls=self.settings.tls is not None,
                 storage=str(self.store.root), stale_temp_removed=removed,
                 max_size=self.settings.storage.max_size,
                 max_size_from=max_size_origin(self.settings.storage),
                 upstreams=[u.name for u in self.settings.upstreams])
        self._warn_if_open()

    def _policy_gate(self) -> Gate | None:
        """The policy's gate on manifest answers (``None``: no ``policy:`` section). Its
        verdicts live in this process: a restart with a new config decides again."""
        return policy_gate(self.settings)

    def _countersigner(self) -> Countersigner | None:
        """The mirror's signer of images that pass (``policy.countersign_key``), if any."""
        policy = self.settings.policy
        if policy is None or policy.countersign_key is None:
            return None
        try:
            return Countersigner(policy.countersign_pem)
        except Invalid as exc:
            raise ConfigError("policy.countersign_key", exc.reason) from None

    def _audit_trail(self) -> AuditTrail | None:
        """The audit trail of this process (``None``: no ``audit:`` section)."""
        if self.settings.audit is None:
            return None
        cluster = self.settings.cluster
        name = str(cluster.self_url) if cluster is not None and cluster.self_url \
            else socket.gethostname()
        return AuditTrail(self.settings.audit, node=name, worker=self.worker.index,
                          workers=self.worker.count)

    def _warn_if_open(self) -> None:
        """Say once, at start, that a mirror without ``auth`` or admin guard is open."""
        admin = self.settings.admin
        if not self.worker.evicts:  # worker 0 speaks for the node
            return
        if self.settings.auth is None and (admin is None or not admin.guarded):
            log.warning("open_without_auth", listen=f"{self.settings.listen_host}:"
                        f"{self.settings.listen_port}",
                        detail="anyone who reaches the port pulls with the mirror's upstream "
                        "credentials and reads the status page, /metrics and /admin/; "
                        "set auth: or admin.token / admin.listen")

    async def _resolve_max_size(self) -> None:
        """``max_size: auto`` becomes bytes once the index says what the cache holds
        (every worker reads the same filesystem and index: they choose the same cap)."""
        storage = self.settings.storage
        resolved = await asyncio.to_thread(resolve_max_size, storage, self.store.index.total_bytes)
        if resolved is not storage:
            self.settings = dataclasses.replace(self.settings, storage=resolved)
            self.evictor.resize(resolved)

    async def _start_cluster(self) -> None:
        cluster = self.settings.cluster
        if cluster is None:
            return
        assert cluster.self_url is not None
        self.peer_set = peer_set = PeerSet(cluster, cluster.self_url, self.clock)
        self.tokens = tokens = TokenSource(cluster, self.clock)
        timeout = aiohttp.ClientTimeout(sock_connect=max(cluster.header_timeout, 0.5),
                                        sock_read=cluster.read_timeout)
        session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=False,
                                        connector=aiohttp.TCPConnector(limit=256))
        self._stack.push_async_callback(session.close)
        self.peers = PeerSource(cluster, session, self.tokens, peer_set)
        if cluster.parents:
            self.parents = ParentSource(cluster, session, self.tokens, self.clock.monotonic)
        await peer_set.refresh_dns()
        await peer_set.check(session, tokens)  # the hash starts with who answers
        self.tasks.loop("peers", lambda: peer_set.run(session, tokens))
        log.info("cluster_joined", node_id=cluster.node_id, region=cluster.region,
                 self_url=cluster.self_url, peers=self.peer_set.members,
                 healthy=self.peer_set.healthy(), parents=list(cluster.parents))

    def _chains(self) -> dict[str, dict[str, SourceChain]]:
        """The sources of each registry for clients, for peers (this node is the owner:
        no peers) and for child regions (no parents: requests never loop)."""
        extra = list(self._extra_sources)
        s3 = [self.s3] if self.s3 is not None else []
        peers = [self.peers] if self.peers is not None else []
        parents = [self.parents] if self.parents is not None else []
        orders: dict[str, list[Source]] = {
            "client": [*extra, *peers, *s3, *parents],
            "peer": [*extra, *s3, *parents],
            "child": [*extra, *peers, *s3],
        }
        rejections = Rejections(clock=self.clock)
        return {hop: {name: SourceChain(before, UpstreamSource(client), rejections)
                      for name, client in self.clients.items()}
                for hop, before in orders.items()}

    async def _start_sync(self) -> None:
        """Popularity counts and the sync records are loaded; the sync loop runs only when
        ``sync:`` is configured (``mirror warm`` works without it)."""
        await asyncio.to_thread(self.popularity.load)
        await asyncio.to_thread(self.popularity.read_others)
        self.sync = self._sync_service()
        await self.sync.load()
        self.tasks.loop("popularity", self._save_popularity_forever)
        if self.settings.sync is not None and self._sync_loop and self.worker.evicts:
            self.tasks.loop("sync", self.sync.run)
            log.info("sync_started", rules=[r.name for r in self.settings.sync.rules],
                     popular_top=self.settings.sync.popular.top)

    def _sync_service(self) -> SyncService:
        sync = SyncService(self.settings.sync or SyncSettings(), self.pull, self.router,
                           clients=self.clients, index=self.store.index,
                           popularity=self.popularity,
                           state_path=self.settings.storage.path / "sync" / "state.json",
                           clock=self.clock)
        if self.parents is not None:
            sync.parents_popular = self.parents.popular  # warm what parents pull most
        return sync

    async def _changed_elsewhere(self) -> None:
        """Another process removed content (``mirror cache evict``, ``fsck``): the memory
        copies go, and what this one answered from them since then is stored again (an
        image pulled right after an eviction is listed and can be pinned)."""
        try:
            since = await asyncio.to_thread(self.store.index.removed_at)
        except Exception:  # nothing counts as used after an unknown time
            since = float("inf")
        # Forget first, then restore: an answer from memory while the copies were written
        # back would be served, yet stored by nobody.
        tags, manifests, blobs = (self.tags.take_memory(), self.manifests.take_memory(),
                                  self.blobs.take_memory())
        for listener in self.on_removed:
            listener(None)
        used = [(kind, digest) for (kind, digest), when in list(self.evictor.recent.items())
                if when > since]
        used_manifests = {digest for kind, digest in used if kind == "manifest"}
        try:
            restored = {"tags": await self.tags.keep_pointing_to(tags, used_manifests),
                        "manifests": await self.manifests.keep(manifests, used_manifests),
                        "blobs": await self.blobs.keep(blobs, {d for k, d in used
                                                               if k == "blob"})}
            if any(restored.values()):
                log.info("cache_kept_after_removal", **restored,
                         hint="pulled from memory after content was removed elsewhere")
        except Exception as exc:  # the next pull stores them
            log.warning("cache_keep_failed", error=str(exc) or type(exc).__name__)

    async def _save_popularity_forever(self) -> None:
        every = POPULARITY_SHARE_EVERY if self.worker.count > 1 else POPULARITY_SAVE_EVERY
        while True:
            await asyncio.sleep(every)
            await self.save_popularity()
            await asyncio.to_thread(self.popularity.read_others)

    async def save_popularity(self) -> None:
        """Save the popularity counts if they changed (pruned to their bound first)."""
        if not self.popularity.dirty:
            return
        self.popularity.prune()
        await asyncio.to_thread(self.popularity.save, self.popularity.snapshot())

    async def stop(self) -> None:
        """Stop in the reverse order of :meth:`start`."""
        self.ready = False
        await self.tasks.close()
        await self.save_popularity()
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
        await asyncio.to_thread(self.repos.close)
        if self.audit is not None:
            self.audit.close()
        log.info("mirror_stopped", version=VERSION)

    async def _reconcile_then_evict(self) -> None:
        """Make the index agree with the disk while already serving, then run eviction.

        Serving before this is done is safe: a file the index does not know is
        hashed before it is served, a missing one is fetched again. Eviction
        waits, because it needs true totals. A failed reconcile is retried with
        backoff (eviction stays off only until it succeeds).
        """
        if not self.worker.evicts:  # another worker reconciles and evicts for the node
            self.tasks.loop("recency", lambda: self.evictor.run(evict=False))
            return
        await self.tasks.loop("reconcile", self._reconcile)
        self.tasks.loop("eviction", self.evictor.run)

    async def _reconcile(self) -> None:
        found = await asyncio.to_thread(self.store.reconcile)
        log.info("cache_reconciled", cache_entries=found.entries, cache_bytes=found.bytes,
                 adopted=found.adopted, dropped=found.dropped,
                 size_mismatch=found.size_mismatch, seconds=round(found.seconds, 3))

    async def _disk_bytes(self, every: float = 60.0) -> None:
        """Refresh ``mirror_storage_disk_bytes``: the disk alert needs it when no cap is set."""
        while True:
            try:
                disk = await asyncio.to_thread(os.statvfs, self.store.root)
            except OSError as exc:  # a figure, never a reason to stop serving
                log.warning("disk_bytes_failed", error=exc.strerror or type(exc).__name__)
            else:
                metrics.STORAGE_DISK_BYTES.labels("size").set(disk.f_blocks * disk.f_frsize)
                metrics.STORAGE_DISK_BYTES.labels("free").set(disk.f_bavail * disk.f_frsize)
            await asyncio.sleep(every)

    async def _registry_bytes(self, every: float = 60.0) -> None:
        """Refresh ``mirror_registry_cache_bytes`` now and then (one query, in a thread)."""
        names = [u.name for u in self.settings.upstreams]
        while True:
            try:
                totals = await asyncio.to_thread(self.repos.bytes_by_registry,
                                                 self.store.index.path, names)
            except Exception as exc:  # a figure, never a reason to stop serving
                log.warning("registry_bytes_failed", error=str(exc) or type(exc).__name__)
            else:
                for registry, size in totals.items():
                    metrics.REGISTRY_CACHE_BYTES.labels(registry).set(size)
            await asyncio.sleep(every)

    def _wire_evictor(self) -> None:
        """Tell the evictor what is in use, and the caches what was evicted."""
        blobs, manifests = self.blobs, self.manifests

        def in_use(digest: str) -> bool:
            return blobs.busy(Digest.parse(digest))

        listeners = self.on_removed

        def evicted(entry: Entry) -> None:
            digest = Digest.parse(entry.digest)
            if entry.kind == "blob":
                blobs.forget(digest)
            else:
                manifests.forget(digest)
            for listener in listeners:
                listener(entry.digest)

        def changed_elsewhere() -> None:
            self.tasks.spawn(self._changed_elsewhere(), "changed_elsewhere")

        self.evictor.wire(in_use, evicted, changed_elsewhere)
        # Other workers hold memory copies too: they hear of evictions as of `cache evict`.
        self.evictor.shared = self.worker.count > 1


def policy_gate(settings: Settings) -> Gate | None:
    """The gate of the config's signature policy (``None``: no ``policy:`` section); for
    the node, and for ``mirror import``, which judges a bundle's images offline.

    Raises:
        ConfigError: a key or the trusted root does not load.
    """
    if settings.policy is None:
        return None
    try:
        return Gate(compile_policy(settings.policy))
    except Invalid as exc:
        raise ConfigError("policy", exc.reason) from None
