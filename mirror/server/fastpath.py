"""The lean path: small hot answers from memory, with no work per request that could be done once.

Most requests of a pull are small and hot: manifests by digest, configs and other small
blobs, tags inside their TTL, HEADs. The full path answers one of them (routing, the pull
service, rendering headers, the access line through structlog); the answer is then kept
here, ready, keyed on method, path with query, and Accept::

    body (empty for HEAD)   headers (rendered once)   constant fields of the access line
    metric children         what to touch for eviction recency     expiry

and the next identical request is answered from it ahead of routing and every middleware
(it wraps the application's handler; the full path's outermost middleware keeps answers).
It still writes one access line with the same fields (rendered with orjson around the
pre-rendered constant part), counts the same metrics, renews the content's recency for
eviction and counts the pull of a tag.

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

import asyncio
import itertools
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from mirror import metrics
from mirror.cache.tags import tag_key
from mirror.node import Node
from mirror.oci import is_digest_reference
from mirror.server.decisions import POLICY, audit_manifest
from mirror.server.middleware import SERVER
from mirror.server.state import LOG, NODE

_access = structlog.get_logger("mirror.access")
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
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SKIPPED_HEADERS = frozenset({"x-request-id", "date", "server"})


@dataclass(slots=True)
class Hot:
    """A ready answer and what serving it must count."""

    body: bytes
    headers: dict[str, str]
    expires: float  # time.monotonic()
    log_fields: bytes  # the constant fields of the access line, JSON without braces
    log_dict: dict[str, Any]  # the same fields (for a console renderer)
    requests: Any  # metric children, resolved once
    seconds: Any
    counters: tuple[Any, ...]  # cache-result children, incremented once per request
    served: tuple[Any, ...]  # served-bytes children
    served_count: int
    touch: tuple[str, str] | None  # (kind, digest) for eviction recency
    image: str | None  # the image a tag pull counts for
    pulled_digest: str | None  # a manifest GET by digest (counted for its platform)
    audit: dict[str, Any] | None = None  # a manifest answer's audit fields (replayed)
    rendered: CIMultiDict[str] = field(default_factory=CIMultiDict)  # headers, copied per answer
    pending: int = 0  # answers not yet added to the counters

    def __post_init__(self) -> None:
        self.rendered = CIMultiDict(self.headers)


class AccessLine:
    """Writes the canonical access line of a lean answer: the same fields as the
    middleware's, rendered with orjson, written in batches once per loop turn."""

    def __init__(self, enabled: bool, as_json: bool = True, stream: Any = None) -> None:
        """Args:
            enabled: lines are written at all (``log.level`` info or debug).
            as_json: JSON lines to ``stream`` (default stderr); else through structlog
                (its console renderer on a terminal).
        """
        self.enabled = enabled
        self.as_json = as_json
        self._stream = stream
        self._pending: list[bytes] = []
        self._second = -1
        self._stamp_prefix = ""

    def write(self, variable: dict[str, Any], hot: Hot) -> None:
        """Queue one line: ``variable`` fields rendered now, the entry's constant ones
        pre-rendered."""
        if not self.as_json:
            _access.info("request", **variable, **hot.log_dict)
            return
        constant = hot.log_fields
        variable["timestamp"] = self._timestamp()
        rendered = orjson.dumps(variable)
        line = rendered[:-1] + b"," + constant + b"}\n" if constant else rendered + b"\n"
        if not self._pending:
            # the running loop writes the batch at the end of its turn
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        """Write what is queued (one write call for many lines under load)."""
        lines, self._pending = self._pending, []
        if lines:
            stream = self._stream if self._stream is not None else sys.stderr.buffer
            try:
                stream.write(b"".join(lines))
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not stop serving

    def _timestamp(self) -> str:
        # structlog's TimeStamper(fmt="iso", utc=True): microseconds, "Z"; the part up to
        # the second is rendered once per second.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp_prefix = datetime.fromtimestamp(second, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp_prefix}.{int((now - second) * 1e6):06d}Z"


class HotAnswers:
    """The kept answers of one process, and the middleware that serves them."""

    def __init__(self, access: AccessLine, *, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.access = access
        self._clock = clock
        self._entries: dict[tuple[str, str, str], Hot] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._id_prefix = os.urandom(4).hex() + "f"  # never equal to the middleware's ids
        self._node: Node | None = None
        self._counted: list[Hot] = []
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
        supplied = request.headers.get("X-Request-Id", "")
        if supplied and _REQUEST_ID.fullmatch(supplied):
            request_id = supplied
        else:
            request_id = f"{self._id_prefix}{next(self._ids):07x}"
        headers = hot.rendered.copy()
        headers["X-Request-Id"] = request_id
        response = web.Response(body=hot.body or None, headers=headers)
        if not hot.pending:  # counters are added once per loop turn, not per request
            if not self._counted:
                asyncio.get_running_loop().call_soon(self._count)
            self._counted.append(hot)
        hot.pending += 1
        node = self._node
        if node is not None:
            if hot.touch is not None:
                node.evictor.touch(*hot.touch)
            if hot.audit is not None and node.audit is not None:
                audit_manifest(node.audit, request, hot.audit, hot.audit["policy"],
                               request_id=request_id)
            if hot.image is not None:  # auth is off here: the address is the client
                node.popularity.record(hot.image, request.remote or "",
                                       head=request.method == "HEAD",
                                       digest=hot.touch[1] if hot.touch else None)
            elif hot.pulled_digest is not None:
                node.popularity.manifest_pulled(hot.pulled_digest, request.remote or "")
        elapsed = time.perf_counter() - started
        hot.seconds.observe(elapsed)
        if self.access.enabled:
            self.access.write({
                "request_id": request_id, "client": request.remote,
                "user_agent": request.headers.get("User-Agent", "")[:200],
                "duration_ms": round(elapsed * 1000, 2)}, hot)
        return response

    def _count(self) -> None:
        """Add the requests answered since the last loop turn to their counters."""
        counted, self._counted = self._counted, []
        for hot in counted:
            count, hot.pending = hot.pending, 0
            hot.requests.inc(count)
            for counter in hot.counters:
                counter.inc(count)
            if hot.served_count:
                for counter in hot.served:
                    counter.inc(hot.served_count * count)

    def _drop(self, key: tuple[str, str, str]) -> None:
        hot = self._entries.pop(key, None)
        if hot is not None:
            self._bytes -= len(hot.body)

    async def _keep(self, request: web.Request, key: tuple[str, str, str],
                    response: web.StreamResponse) -> None:
        context: dict[str, Any] | None = request.get(LOG)
        if not context or "error" in context:
            return
        route = str(context.get("route"))
        head = request.method == "HEAD"
        body = b""
        if not head:
            if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
                return  # a file or a stream: the full path's sendfile is the fast one
            body = response.body
        ttl = await self._ttl(request, context)
        if ttl is None or ttl <= 0:
            return
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in _SKIPPED_HEADERS}
        if head and response.content_length is not None:
            headers["Content-Length"] = str(response.content_length)
        headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")
        headers["Server"] = SERVER  # answered before the app's on_response_prepare runs
        hot = self._hot(request, context, route, body=body, headers=headers, ttl=ttl)
        if route == "manifest":
            policy = request.get(POLICY)
            hot.audit = {k: context.get(k) for k in ("registry", "repository", "reference",
                                                    "digest")}
            hot.audit.update(media_type=headers.get("Content-Type"), cache="hit", status=200,
                             policy=policy)
            if policy is not None and context.get("registry"):
                hot.counters += (metrics.child(metrics.POLICY_DECISIONS, context["registry"],
                                               policy["verdict"]),)
        self._store(key, hot)

    async def _ttl(self, request: web.Request, context: dict[str, Any]) -> float | None:
        """How long this answer may be given again, or ``None``: never."""
        route, cache = context.get("route"), context.get("cache")
        if route == "blob":
            return CONTENT_TTL if cache == "hit" else None
        if route != "manifest" or cache == "stale" or context.get("policy") == "warn":
            return None  # a warned answer is logged each time, on the full path
        reference = str(context.get("reference", ""))
        if is_digest_reference(reference):
            return CONTENT_TTL
        node = request.app[NODE]
        registry, repository = context.get("registry"), context.get("repository")
        if not registry or not repository:
            return None
        record = await node.tags.get(tag_key(registry, repository, reference))
        if record is None:
            return None
        left = node.settings.cache.tag_ttl - record.age(node.clock.time())
        return min(left, CONTENT_TTL)

    def _hot(self, request: web.Request, context: dict[str, Any], route: str, *,
             body: bytes, headers: dict[str, str], ttl: float) -> Hot:
        registry = context.get("registry")
        cache, method = "hit", request.method  # what every later answer from here is
        kind = "manifest" if route == "manifest" else "blob"
        counters = [metrics.child(metrics.CACHE_RESULTS, kind, cache)]
        served = [metrics.child(metrics.SERVED_BYTES, "memory")]
        if registry:
            counters.append(metrics.child(metrics.REGISTRY_CACHE_RESULTS, registry, kind, cache))
            served.append(metrics.child(metrics.REGISTRY_SERVED_BYTES, registry, "memory"))
        # What structlog would merge from contextvars (a worker's index), then the request's.
        bound = {k: v for k, v in structlog.contextvars.get_contextvars().items()
                 if k != "request_id"}
        constant = {**bound, "method": method, "path": request.path[:300], "status": 200,
                    **context, "cache": cache}
        digest = context.get("digest")
        reference = str(context.get("reference", ""))
        tag = route == "manifest" and not is_digest_reference(reference)
        return Hot(
            body=body, headers=headers, expires=self._clock() + ttl,
            log_fields=orjson.dumps({**constant, "event": "request", "level": "info"},
                                    default=repr)[1:-1],
            log_dict=constant,
            requests=metrics.child(metrics.REQUESTS, route, method, "200"),
            seconds=metrics.child(metrics.REQUEST_SECONDS, route),
            counters=tuple(counters), served=tuple(served),
            served_count=0 if method == "HEAD" else len(body),
            touch=(kind, str(digest)) if digest else None,
            image=f"{registry}/{context.get('repository')}:{reference}" if tag else None,
            pulled_digest=str(digest) if route == "manifest" and not tag and method == "GET"
            else None)

    def _store(self, key: tuple[str, str, str], hot: Hot) -> None:
        self._drop(key)
        while self._entries and (self._bytes + len(hot.body) > self._max_bytes
                                 or len(self._entries) >= self._max_entries):
            self._drop(next(iter(self._entries)))  # the oldest kept
        if len(hot.body) <= self._max_bytes:
            self._entries[key] = hot
            self._bytes += len(hot.body)
