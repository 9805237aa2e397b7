"""One record per answer, and the one function that accounts it.

Both serving paths (the full one through routing, middleware and handlers, and the
lean one of :mod:`mirror.server.fastpath`) describe every answer with a
:class:`Served` record and hand it to :meth:`Accounting.account`, which alone:

- counts the metrics (requests by route, method and status; seconds; cache results;
  body bytes, in total and per registry),
- counts the pull for popularity (a tag's pull, learning an index's platforms; a
  manifest by digest), once per answer whichever path gave it,
- writes the canonical access line (one per request),
- tells every sink in :attr:`Accounting.sinks` (the place for another consumer of
  every answer, such as an audit line per manifest decision: append a callable).

What does not change between two answers of a kept entry (metric children, the
constant part of the access line rendered as JSON) is prepared once, by
:meth:`Accounting.prepare`, and kept with the entry: the lean path pays for the
per-request fields only.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from mirror import metrics
from mirror.cache.manifests import Manifest
from mirror.oci import is_digest_reference

if TYPE_CHECKING:
    from mirror.sync.popularity import Popularity

_access = structlog.get_logger("mirror.access")

#: Routes whose answers are counted but get no access line (scrapes and probes).
QUIET_ROUTES = frozenset({"metrics", "health", "peer_health"})
#: Typed fields a handler may still have written into the free-form log fields.
_TYPED = ("route", "registry", "repository", "reference", "digest", "cache", "source")

Sink = Callable[["Served"], None]


@dataclass(slots=True, eq=False)
class Prepared:
    """What accounting an answer needs that does not change between answers of one kept
    entry: metric children, and the access line's constant part."""

    requests: Any
    seconds: Any
    counters: tuple[Any, ...]  # cache-result children, incremented once per answer
    served: tuple[Any, ...]  # served-bytes children
    body: int  # body bytes each answer counts at accounting time
    line: bytes | None  # the constant fields as JSON without braces (``None``: structlog)
    fields: dict[str, Any]  # the same fields (structlog's renderer)
    level: str
    quiet: bool  # no access line (scrapes and probes)
    pull: Pull | None  # what popularity counts of each answer
    pending: int = 0  # answers not yet added to the counters


@dataclass(slots=True, frozen=True)
class Pull:
    """A pull popularity counts: of a tag (learning an index's platforms), or a manifest
    fetched by digest."""

    manifest: Manifest
    digest: str
    tag: tuple[str, str, str] | None  # (registry, repository, tag)
    head: bool


@dataclass(slots=True, eq=False)
class Served:
    """One answer: what was asked, what was answered, from where, for whom.

    Typed fields are what the serving code decides on; ``fields`` holds the rest of the
    access line (``ns``, ``error``, ``cut``, ``peer``, the authenticated ``user``...).
    ``bytes`` are body bytes sent, counted under ``delivery``; ``counted`` those a
    streamed answer already counted as they went out (:meth:`Accounting.sent`).
    ``client`` is the address; ``user`` the authenticated user, for the pull counts.
    """

    route: str = "other"
    method: str = "GET"
    path: str = ""
    status: int = 500
    registry: str | None = None
    repository: str | None = None
    reference: str | None = None
    digest: str | None = None
    media_type: str | None = None
    cache: str | None = None
    source: str | None = None  # where the bytes came from (a fill's source)
    delivery: str | None = None  # how the body went out: memory, disk or fill
    bytes: int = 0
    counted: int = 0
    client: str = ""
    user: str | None = None
    request_id: str = ""
    user_agent: str = ""
    seconds: float = 0.0
    manifest: Manifest | None = None  # the manifest answered (popularity learns platforms)
    fields: dict[str, Any] = field(default_factory=dict)
    prepared: Prepared | None = None

    @property
    def by_tag(self) -> bool:
        """A manifest asked for by tag."""
        return (self.route == "manifest" and self.reference is not None
                and not is_digest_reference(self.reference))

    @property
    def kind(self) -> str:
        """What cache results count it as."""
        return "manifest" if self.route == "manifest" else "blob"

    def absorb(self) -> None:
        """Move typed fields that code wrote into the free-form ``fields`` (as every
        page and API handler does with ``route``) to their place."""
        fields = self.fields
        for name in _TYPED:
            if name in fields:
                value = fields.pop(name)
                if value is not None:
                    setattr(self, name, value)

    def again(self, request_id: str, client: str, user_agent: str, seconds: float) -> Served:
        """The same answer given again to another request (the lean path)."""
        return Served(self.route, self.method, self.path, self.status, self.registry,
                      self.repository, self.reference, self.digest, self.media_type,
                      self.cache, self.source, self.delivery, self.bytes, 0, client,
                      self.user, request_id,
                      user_agent, seconds, self.manifest, self.fields, self.prepared)

    def constant_fields(self) -> dict[str, Any]:
        """The access line's fields that are the same for every answer of this kind."""
        line: dict[str, Any] = {"method": self.method, "path": self.path[:300],
                                "status": self.status}
        for name in _TYPED:
            value = getattr(self, name)
            if value is not None:
                line[name] = value
        line.update(self.fields)
        return line


class AccessLine:
    """Writes access lines rendered with orjson around a pre-rendered constant part, in
    batches once per loop turn (what structlog's JSON renderer would write)."""

    def __init__(self, enabled: bool, as_json: bool = True, stream: Any = None) -> None:
        """Args:
            enabled: lines are written at all (``log.level`` info or debug).
            as_json: JSON lines to ``stream`` (default stderr); else every line goes
                through structlog (its console renderer on a terminal).
        """
        self.enabled = enabled
        self.as_json = as_json
        self._stream = stream
        self._pending: list[bytes] = []
        self._second = -1
        self._stamp_prefix = ""

    def write(self, variable: dict[str, Any], constant: bytes) -> None:
        """Queue one line: ``variable`` fields rendered now, ``constant`` pre-rendered."""
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


class Accounting:
    """Accounts every answer of one process: metrics, popularity, access line, sinks."""

    def __init__(self, access: AccessLine) -> None:
        self.access = access
        #: Called with every accounted answer, after the access line.
        self.sinks: list[Sink] = []
        self.popularity: Popularity | None = None  # set once the node started
        self._counted: list[Prepared] = []

    def prepare(self, served: Served, *, kept: bool = False) -> Prepared:
        """Resolve once what accounting ``served`` needs; ``kept``: for an answer the lean
        path gives again (its line's constant part is rendered as JSON once)."""
        registry, kind, cache = served.registry, served.kind, served.cache
        counters: list[Any] = []
        if cache is not None:
            counters.append(metrics.child(metrics.CACHE_RESULTS, kind, cache))
            if registry:
                counters.append(metrics.child(metrics.REGISTRY_CACHE_RESULTS, registry, kind,
                                              cache))
        served_children: list[Any] = []
        if served.delivery is not None:
            served_children.append(metrics.child(metrics.SERVED_BYTES, served.delivery))
            if registry:
                served_children.append(metrics.child(metrics.REGISTRY_SERVED_BYTES, registry,
                                                     served.delivery))
        level = "warning" if served.status >= 500 else "info"
        constant = served.constant_fields()
        line = None
        if kept and self.access.as_json:
            # What structlog would merge from contextvars (a worker's index), then ours.
            bound = {k: v for k, v in structlog.contextvars.get_contextvars().items()
                     if k != "request_id"}
            line = orjson.dumps({**bound, **constant, "event": "request", "level": level},
                                default=repr)[1:-1]
        return Prepared(
            requests=metrics.child(metrics.REQUESTS, served.route, served.method,
                                   str(served.status)),
            seconds=metrics.child(metrics.REQUEST_SECONDS, served.route),
            counters=tuple(counters), served=tuple(served_children),
            body=served.bytes - served.counted, line=line, fields=constant, level=level,
            quiet=served.route in QUIET_ROUTES, pull=_pull_of(served))

    def sent(self, served: Served, count: int) -> None:
        """A streamed answer handed ``count`` more body bytes to the kernel: count them
        now (a cut answer counts what went out)."""
        if count <= 0 or served.delivery is None:
            return
        served.counted += count
        served.bytes = max(served.bytes, served.counted)
        metrics.child(metrics.SERVED_BYTES, served.delivery).inc(count)
        if served.registry:
            metrics.child(metrics.REGISTRY_SERVED_BYTES, served.registry,
                          served.delivery).inc(count)

    def account(self, served: Served) -> None:
        """Account one answer: metrics, popularity, the access line, every sink."""
        prepared = served.prepared
        if prepared is None:
            prepared = served.prepared = self.prepare(served)
        if not prepared.pending:  # counters are added once per loop turn, not per answer
            if not self._counted:
                _call_soon(self._count)
            self._counted.append(prepared)
        prepared.pending += 1
        prepared.seconds.observe(served.seconds)
        pull = prepared.pull
        if pull is not None and self.popularity is not None:
            who = f"user:{served.user}" if served.user else served.client
            if pull.tag is not None:
                self.popularity.tag_pulled(*pull.tag, pull.manifest, who, head=pull.head)
            elif not pull.head:
                self.popularity.manifest_pulled(pull.digest, who)
        if self.access.enabled and not prepared.quiet:
            self._write_line(served, prepared)
        for sink in self.sinks:
            sink(served)

    def flush(self) -> None:
        """Add every pending answer to the counters now."""
        self._count()

    def _count(self) -> None:
        counted, self._counted = self._counted, []
        for prepared in counted:
            count, prepared.pending = prepared.pending, 0
            prepared.requests.inc(count)
            for counter in prepared.counters:
                counter.inc(count)
            if prepared.body:
                for counter in prepared.served:
                    counter.inc(prepared.body * count)

    def _write_line(self, served: Served, prepared: Prepared) -> None:
        variable = {"request_id": served.request_id, "client": served.client,
                    "user_agent": served.user_agent[:200],
                    "duration_ms": round(served.seconds * 1000, 2)}
        if prepared.line is not None:
            self.access.write(variable, prepared.line)
            return
        emit = _access.warning if prepared.level == "warning" else _access.info
        emit("request", **variable, **prepared.fields)


def _pull_of(served: Served) -> Pull | None:
    manifest = served.manifest
    if manifest is None:
        return None
    tag = None
    if served.by_tag:
        assert served.registry and served.repository and served.reference
        tag = (served.registry, served.repository, served.reference)
    return Pull(manifest, str(manifest.digest), tag, served.method == "HEAD")


def _call_soon(callback: Callable[[], None]) -> None:
    try:
        asyncio.get_running_loop().call_soon(callback)
    except RuntimeError:  # no loop (a test): count now
        callback()
