"""The aiohttp application: routes, and the lifetime of everything it holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from functools import partial

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror import log as logs
from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.config import Settings
from mirror.node import Node
from mirror.server import admin
from mirror.server.accounting import AccessLine, Accounting
from mirror.server.auth import edge, install
from mirror.server.fastpath import HotAnswers
from mirror.server.handlers import registry
from mirror.server.middleware import add_api_version, observe
from mirror.server.peer import PREFIX, peer_api
from mirror.server.state import ACCOUNTING, NODE, log_context
from mirror.server.status import history_ctx, status_page
from mirror.sources import Source

log = structlog.get_logger(__name__)


def create_app(settings: Settings, *, clock: Clock = SYSTEM,
               extra_sources: Sequence[Source] = ()) -> web.Application:
    """Build the mirror's application; the node starts and stops with the app."""
    # The edge check only when there is something to check: one middleware less per request.
    guarded = settings.auth is not None or settings.admin is not None
    # The lean path only when every request may be answered without the edge check.
    app = web.Application(middlewares=[observe, edge] if guarded else [observe],
                          client_max_size=64 * 1024)
    install(app, settings)
    accounting = Accounting(AccessLine(logs.ACCESS.enabled, logs.ACCESS.json))
    app[ACCOUNTING] = accounting
    app.cleanup_ctx.append(partial(_node, settings, clock, tuple(extra_sources)))
    app.cleanup_ctx.append(history_ctx)  # the status page's charts and problem list
    if not guarded:
        HotAnswers(accounting, clock=clock.monotonic).install(app)
    app.on_response_prepare.append(add_api_version)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", PREFIX + "/{path:.*}", peer_api)
    app.router.add_get("/", status_page)
    app.router.add_get("/admin/popular", admin.popular)
    app.router.add_get("/admin/sync", admin.sync_status)
    app.router.add_post("/admin/sync", admin.sync_run)
    app.router.add_post("/admin/warm", admin.warm)
    app.router.add_route("*", "/{path:.*}", registry)
    return app


async def _node(settings: Settings, clock: Clock, extra_sources: tuple[Source, ...],
                app: web.Application) -> AsyncIterator[None]:
    node = Node(settings, clock=clock, extra_sources=extra_sources)
    await node.start()
    app[NODE] = node
    app[ACCOUNTING].popularity = node.popularity
    try:
        yield
    finally:
        app[ACCOUNTING].flush()
        await node.stop()


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus exposition of every metric in :mod:`mirror.metrics`."""
    log_context(request)["route"] = "metrics"
    body = await asyncio.to_thread(metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    log_context(request)["route"] = "health"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: storage and index are open."""
    log_context(request)["route"] = "health"
    ready = NODE in request.app and request.app[NODE].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)
