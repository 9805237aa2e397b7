"""What a running mirror holds: settings, caches, fills and upstream clients.

Built and torn down by one ``cleanup_ctx`` in :mod:`mirror.server.app`; the
handlers reach it through the typed app key :data:`STATE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mirror.cache.blobs import BlobCache
from mirror.cache.eviction import Evictor
from mirror.cache.manifests import ManifestCache
from mirror.cache.membership import Membership
from mirror.cache.shared import SharedTier
from mirror.cache.tags import TagStore
from mirror.config import Settings
from mirror.errors import NameUnknown
from mirror.fetch import Fetcher
from mirror.popularity import Popularity, TopCounter
from mirror.routing import Router, Target
from mirror.storage.filesystem import FilesystemStore
from mirror.upstream import UpstreamClient


@dataclass
class MirrorState:
    """Everything the handlers use, owned by the application."""

    settings: Settings
    router: Router
    store: FilesystemStore
    tags: TagStore
    fetcher: Fetcher
    manifests: ManifestCache
    blobs: BlobCache
    evictor: Evictor
    clients: dict[str, UpstreamClient] = field(default_factory=dict)
    shared: SharedTier | None = None
    ready: bool = False
    membership: Membership | None = None
    popularity: Popularity = field(default_factory=TopCounter)

    def client(self, target: Target) -> UpstreamClient:
        """The upstream client a target routes to."""
        if target.upstream is None or target.upstream.name not in self.clients:
            raise NameUnknown("the request names no configured registry")
        return self.clients[target.upstream.name]


STATE = web.AppKey("state", MirrorState)
#: Per-request log fields, filled by handlers and written by the middleware.
LOG: web.RequestKey[dict[str, Any]] = web.RequestKey("log", dict)


def log_context(request: web.Request) -> dict[str, Any]:
    """The log fields of this request (created on first use)."""
    context: dict[str, Any] | None = request.get(LOG)
    if context is None:
        context = {}
        request[LOG] = context
    return context
