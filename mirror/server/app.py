"""The aiohttp application: routes, and the lifetime of everything it holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror import metrics
from mirror.cache.blobs import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.manifests import ManifestCache
from mirror.cache.membership import FILE_NAME as MEMBERSHIP_FILE
from mirror.cache.membership import Membership
from mirror.cache.shared import SharedTier
from mirror.cache.tags import TagStore
from mirror.config import Settings
from mirror.fetch import Fetcher
from mirror.oci import Digest
from mirror.routing import Router
from mirror.server.auth import edge, install
from mirror.server.handlers import registry
from mirror.server.middleware import add_api_version, observe
from mirror.server.state import STATE, MirrorState, log_context
from mirror.server.status import status_page
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry
from mirror.storage.s3 import open_s3
from mirror.upstream import UpstreamClient

log = structlog.get_logger(__name__)

#: The shared S3 tier, when ``storage.s3`` is configured (started before the state).
SHARED = web.AppKey("shared", SharedTier)


def create_app(settings: Settings) -> web.Application:
    """Build the mirror's application; resources start with the app."""
    # The edge check only when there is something to check: one middleware less per request.
    guarded = settings.auth is not None or settings.admin is not None
    app = web.Application(middlewares=[observe, edge] if guarded else [observe],
                          client_max_size=64 * 1024)
    install(app, settings)
    if settings.storage.s3 is not None:
        app.cleanup_ctx.append(partial(_shared_tier, settings))
    app.cleanup_ctx.append(partial(_mirror_state, settings))
    app.on_response_prepare.append(add_api_version)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", status_page)
    app.router.add_route("*", "/{path:.*}", registry)
    return app


async def _shared_tier(settings: Settings, app: web.Application) -> AsyncIterator[None]:
    """The process's one S3 client; closed after the state, so fills end first."""
    assert settings.storage.s3 is not None
    async with open_s3(settings.storage.s3) as store:
        tier = SharedTier(store, settings.storage.s3)
        app[SHARED] = tier
        log.info("s3_tier_started", bucket=store.bucket, prefix=store.prefix,
                 endpoint=str(settings.storage.s3.endpoint_url or "aws"))
        yield
        await tier.close()


async def _mirror_state(settings: Settings, app: web.Application) -> AsyncIterator[None]:
    store = FilesystemStore(settings.storage.path)
    removed = await asyncio.to_thread(store.open)
    tags = TagStore(store.tags)
    await tags.open()
    evictor = Evictor(store, settings.storage)
    fetcher = Fetcher(store, settings.server.chunk_size, space=evictor)
    shared = app.get(SHARED)
    blobs = BlobCache(store, fetcher, settings.cache, shared, on_hit=evictor.touch)
    manifests = ManifestCache(store, tags, settings.cache, on_fetched=blobs.learn_sizes,
                              shared=shared, on_hit=evictor.touch)
    _wire_evictor(evictor, blobs, manifests)
    membership = Membership(store.root / MEMBERSHIP_FILE)
    await asyncio.to_thread(membership.open)
    state = MirrorState(
        settings=settings,
        router=Router(settings.upstreams),
        store=store,
        tags=tags,
        fetcher=fetcher,
        manifests=manifests,
        blobs=blobs,
        evictor=evictor,
        clients={u.name: UpstreamClient(u) for u in settings.upstreams},
        shared=shared,
        membership=membership,
    )
    app[STATE] = state
    figures = asyncio.create_task(_registry_bytes(state))
    reconciling = asyncio.create_task(_reconcile(store, evictor))
    state.ready = True
    log.info("mirror_started", storage=str(store.root), stale_temp_removed=removed,
             max_size=settings.storage.max_size, upstreams=[u.name for u in settings.upstreams])
    yield
    state.ready = False
    figures.cancel()
    await reconciling  # a thread cannot be cancelled; it is done within seconds
    await fetcher.close()
    await state.manifests.close()
    await evictor.stop()
    for client in state.clients.values():
        await client.close()
    await tags.close()
    await asyncio.to_thread(store.index.close)
    await asyncio.to_thread(membership.close)


async def _registry_bytes(state: MirrorState, every: float = 60.0) -> None:
    """Refresh ``mirror_registry_cache_bytes`` now and then (one query, in a thread)."""
    assert state.membership is not None
    names = [u.name for u in state.settings.upstreams]
    while True:
        try:
            totals = await asyncio.to_thread(state.membership.bytes_by_registry,
                                             state.store.index.path, names)
        except Exception as exc:  # a figure, never a reason to stop serving
            log.warning("registry_bytes_failed", error=str(exc) or type(exc).__name__)
        else:
            for registry, size in totals.items():
                metrics.REGISTRY_CACHE_BYTES.labels(registry).set(size)
        await asyncio.sleep(every)


async def _reconcile(store: FilesystemStore, evictor: Evictor) -> None:
    """Make the index agree with the disk while already serving, then start eviction.

    Serving before this is done is safe: a file the index does not know is
    hashed before it is served, a missing one is fetched again. Eviction
    waits, because it needs true totals.
    """
    try:
        found = await asyncio.to_thread(store.reconcile)
    except Exception as exc:
        log.error("cache_reconcile_failed", error=str(exc) or type(exc).__name__,
                  hint="eviction is off until a restart; mirror cache fsck repairs the index")
        return
    log.info("cache_reconciled", cache_entries=found.entries, cache_bytes=found.bytes,
             adopted=found.adopted, dropped=found.dropped, size_mismatch=found.size_mismatch,
             seconds=round(found.seconds, 3))
    evictor.start()


def _wire_evictor(evictor: Evictor, blobs: BlobCache, manifests: ManifestCache) -> None:
    """Tell the evictor what is in use, and the caches what was evicted."""

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

    evictor.wire(in_use, evicted, changed_elsewhere)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus exposition of every metric in :mod:`mirror.metrics`."""
    log_context(request)["route"] = "metrics"
    body = await asyncio.to_thread(generate_latest)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    log_context(request)["route"] = "health"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: storage and index are open."""
    log_context(request)["route"] = "health"
    ready = STATE in request.app and request.app[STATE].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)
