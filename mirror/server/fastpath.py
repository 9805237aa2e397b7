"""The lean path: small hot answers from memory, with no work per request that could be done once.

Most requests of a pull are small and hot: manifests by digest, configs and other small
blobs, tags inside their TTL, HEADs. The full path answers one of them (routing, the pull
service, rendering headers, the access line through structlog); the answer is then kept
here, ready, keyed on method, path with query, and Accept::

    body (empty for HEAD)   headers (rendered once)   constant fields of the access line
    metric children         what to touch for eviction recency     expiry

and the next identical request is answered from it ahead of routing and every middleware
(it wraps the application's handler; the full path's outermost middleware keeps answers).
Each answer from here is the kept :class:`~mirror.server.accounting.Served` record given
again, accounted by the same :meth:`~mirror.server.accounting.Accounting.account` as the
full path's (one access line with the same fields, the same metrics, the pull counted
for popularity; what does not change between answers is prepared once); it also renews
the content's recency for eviction.

The key holds the raw path with its query, and routing reads nothing else: it names the
registry (``?ns=``, a registry as first path part) and the repository, so an answer the
full path gave after deciding that this registry holds this digest is never replayed
under another registry or repository; those go the full way, which decides for them.

What is kept: only answers the full path gave from the cache (``cache`` hit, or a manifest
by digest), status 200, to requests without ``Range``, ``If-None-Match`` or
``If-Modified-Since``. Content entries live :data:`CONTENT_TTL` seconds, so a blob
evicted (or removed with ``mirror cache evict``) stops being answered here within that
time; a tag's entry ends when the tag's TTL ends. The bytes were verified when the full
path served them. The lean path is off when client auth or an admin listener is
configured: every request then goes through the edge check.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from mirror import metrics
from mirror.node import Node
from mirror.server.accounting import Accounting, Served
from mirror.server.decisions import POLICY, audit_manifest
from mirror.server.middleware import SERVER, request_id_of
from mirror.server.state import NODE, served_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Seconds an entry of content (manifest by digest, blob) is answered here before the full
#: path is asked again: bounds how long evicted content is still served from memory.
CONTENT_TTL = 10.0
#: Bytes of bodies kept at most (entries are dropped oldest first beyond).
MAX_BYTES = 32 * 2**20
#: Entries kept at most.
MAX_ENTRIES = 20_000
#: Request headers that make an answer differ from the kept one.
_VARYING = ("Range", "If-None-Match", "If-Modified-Since", "If-Range")
_SKIPPED_HEADERS = frozenset({"x-request-id", "date", "server"})


@dataclass(slots=True)
class Hot:
    """A ready answer: its body, its headers (rendered once, copied per answer), when it
    ends, and the record every answer from here is (prepared for accounting)."""

    body: bytes
    rendered: CIMultiDict[str]
    expires: float  # time.monotonic()
    served: Served
    touch: tuple[str, str] | None  # (kind, digest) for eviction recency
    audit: dict[str, Any] | None = None  # a manifest answer's audit fields (replayed)
    policy_counter: Any = None  # the policy decision it counts again, per answer


class HotAnswers:
    """The kept answers of one process, and the middleware that serves them."""

    def __init__(self, accounting: Accounting, *, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.accounting = accounting
        self._clock = clock
        self._entries: dict[tuple[str, str, str], Hot] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._id_prefix = os.urandom(4).hex() + "f"  # never equal to the middleware's ids
        self._node: Node | None = None
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every kept answer."""
        self._entries.clear()
        self._bytes = 0

    def forget(self, digest: str | None) -> None:
        """Content was removed from the cache: forget answers of it (``None``: of all)."""
        if digest is None:
            self.clear()
            return
        for key in [k for k, hot in self._entries.items()
                    if hot.touch is not None and hot.touch[1] == digest]:
            self._drop(key)

    async def attach(self, app: web.Application) -> None:
        """``on_startup`` (after the node started): hear of content the node removes."""
        self._node = app[NODE]
        self._node.on_removed.append(self.forget)

    def install(self, app: web.Application) -> None:
        """Answer kept entries ahead of the application's router and middleware, and keep
        the answers of the full path (its outermost middleware)."""
        full: Handler = app._handle
        entries, clock = self._entries, self._clock

        async def handle(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            hot = entries.get((request.method, request.raw_path,
                               ",".join(headers.getall("Accept", ()))))
            if hot is not None and not any(name in headers for name in _VARYING):
                started = time.perf_counter()
                if hot.expires > clock():
                    return self._serve(request, hot, started)
            return await full(request)

        app._handle = handle  # type: ignore[method-assign]
        app.middlewares.insert(0, self.middleware)
        app.on_startup.append(self.attach)  # after the node's start (cleanup_ctx runs first)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let the full path answer, and keep its answer when it may be given again."""
        response = await handler(request)
        headers = request.headers
        if response.status == 200 and not any(name in headers for name in _VARYING):
            key = (request.method, request.raw_path, ",".join(headers.getall("Accept", ())))
            await self._keep(request, key, response)
        return response

    def _serve(self, request: web.Request, hot: Hot, started: float) -> web.StreamResponse:
        request_id = request_id_of(request, self._id_prefix, self._ids)
        headers = hot.rendered.copy()
        headers["X-Request-Id"] = request_id
        response = web.Response(body=hot.body or None, headers=headers)
        node = self._node
        if node is not None and hot.touch is not None:
            node.evictor.touch(*hot.touch)
        # auth is off here: the address is the client
        self.accounting.account(hot.served.again(
            request_id, request.remote or "", request.headers.get("User-Agent", ""),
            time.perf_counter() - started))
        if hot.policy_counter is not None:
            hot.policy_counter.inc()
        if node is not None and hot.audit is not None and node.audit is not None:
            audit_manifest(node.audit, request, hot.audit, hot.audit["policy"],
                           request_id=request_id)
        return response

    def _drop(self, key: tuple[str, str, str]) -> None:
        hot = self._entries.pop(key, None)
        if hot is not None:
            self._bytes -= len(hot.body)

    async def _keep(self, request: web.Request, key: tuple[str, str, str],
                    response: web.StreamResponse) -> None:
        served = served_of(request)
        served.absorb()
        if "error" in served.fields:
            return
        head = request.method == "HEAD"
        body = b""
        if not head:
            if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
                return  # a file or a stream: the full path's sendfile is the fast one
            body = response.body
        ttl = await self._ttl(request, served)
        if ttl is None or ttl <= 0:
            return
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in _SKIPPED_HEADERS}
        if head and response.content_length is not None:
            headers["Content-Length"] = str(response.content_length)
        headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")
        headers["Server"] = SERVER  # answered before the app's on_response_prepare runs
        hot = self._hot(served, body=body, headers=headers, ttl=ttl)
        if served.route == "manifest":
            policy = request.get(POLICY)
            hot.audit = {"registry": served.registry, "repository": served.repository,
                         "reference": served.reference, "digest": served.digest,
                         "media_type": headers.get("Content-Type"), "cache": "hit",
                         "status": 200, "policy": policy}
            if policy is not None and served.registry:
                hot.policy_counter = metrics.child(metrics.POLICY_DECISIONS, served.registry,
                                                   policy["verdict"])
        self._store(key, hot)

    async def _ttl(self, request: web.Request, served: Served) -> float | None:
        """How long this answer may be given again, or ``None``: never."""
        if served.route == "blob":
            return CONTENT_TTL if served.cache == "hit" else None
        if served.route != "manifest" or served.cache == "stale" \
                or served.fields.get("policy") == "warn":
            return None  # a warned answer is logged each time, on the full path
        if not served.by_tag:
            return CONTENT_TTL
        if not served.registry or not served.repository or served.reference is None:
            return None
        manifests = request.app[NODE].pull.manifests
        left = await manifests.fresh_for(served.registry, served.repository, served.reference)
        return min(left, CONTENT_TTL)

    def _hot(self, served: Served, *, body: bytes, headers: dict[str, str],
             ttl: float) -> Hot:
        kept = Served(  # what every later answer from here is: a cache hit from memory
            route=served.route, method=served.method, path=served.path, status=200,
            registry=served.registry, repository=served.repository,
            reference=served.reference, digest=served.digest, media_type=served.media_type,
            cache="hit", source=served.source, delivery="memory",
            bytes=0 if served.method == "HEAD" else len(body), user=served.user,
            manifest=served.manifest, fields=dict(served.fields))
        kept.prepared = self.accounting.prepare(kept, kept=True)
        kind = "manifest" if served.route == "manifest" else "blob"
        return Hot(body=body, rendered=CIMultiDict(headers), expires=self._clock() + ttl,
                   served=kept, touch=(kind, served.digest) if served.digest else None)

    def _store(self, key: tuple[str, str, str], hot: Hot) -> None:
        self._drop(key)
        while self._entries and (self._bytes + len(hot.body) > self._max_bytes
                                 or len(self._entries) >= self._max_entries):
            self._drop(next(iter(self._entries)))  # the oldest kept
        if len(hot.body) <= self._max_bytes:
            self._entries[key] = hot
            self._bytes += len(hot.body)
