"""Handlers of the OCI pull API: adapters that parse, call the pull service, and render.

Each handler gets a parsed :class:`~mirror.routing.Target`, asks
:class:`~mirror.pull.PullService` (which decides where content comes from),
and renders the answer. Handlers record what they answered in the request's
:class:`~mirror.server.accounting.Served` record (:func:`served_of`), which the
middleware accounts once per request (metrics, popularity, the access line).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from mirror import metrics
from mirror.cache.blobs import CachedBlob
from mirror.errors import (
    NameUnknown,
    OciError,
    PaginationNumberInvalid,
    PolicyDenied,
    TagInvalid,
    Unsupported,
)
from mirror.oci import accepted_types, is_number
from mirror.pull import BlobFlight, BlobRedirect, BlobSize, PullService, Repo
from mirror.routing import Kind, Target, tags_link
from mirror.server import decisions
from mirror.server.auth import IDENTITY, authorize
from mirror.server.decisions import audit_manifest
from mirror.server.responses import (
    FileSliceResponse,
    Span,
    blob_headers,
    bytes_response,
    etag_matches,
    file_parts,
    manifest_headers,
    memory_parts,
    parse_range,
    parse_ranges,
    send_parts,
    stream_fill,
)
from mirror.server.state import ACCOUNTING, NODE, served_of

JSON_TYPE = "application/json"
#: The largest ``n`` a tag list request may ask for.
TAGS_N_MAX = 100_000


async def registry(request: web.Request) -> web.StreamResponse:
    """Dispatch every ``/v2`` request (and ``/<prefix>/v2``) to its handler."""
    node = request.app[NODE]
    query = {"ns": request.query["ns"]} if "ns" in request.query else None
    target = node.router.route(request.path, query)
    if request.method not in ("GET", "HEAD"):
        raise Unsupported("this mirror is read-only: only GET and HEAD are supported")
    authorize(request, target)
    served = served_of(request)
    served.route = target.kind.value
    served.registry = target.upstream.name if target.upstream else None
    served.repository = target.repository or None
    served.reference = target.reference or None
    if target.ns:
        served.fields["ns"] = target.ns
    who = request.get(IDENTITY)
    if who is not None and who.authenticated:
        served.user = who.user
    if target.kind is Kind.PING:
        return _json(b"{}")
    pull = node.pull
    repo = repo_of(target)
    if target.kind is Kind.MANIFEST:
        return await manifest(request, pull, repo, target)
    if target.kind is Kind.BLOB:
        return await blob(request, pull, repo, target)
    if target.kind is Kind.TAGS:
        return await tags_list(request, pull, repo, target)
    return await referrers(request, pull, repo, target)


def repo_of(target: Target) -> Repo:
    """The repository of a configured registry that a target names."""
    if target.upstream is None:
        raise NameUnknown("the request names no configured registry")
    return Repo(target.upstream.name, target.repository)


async def manifest(request: web.Request, pull: PullService, repo: Repo,
                   target: Target) -> web.Response:
    """GET or HEAD a manifest by tag or digest; HEAD has exactly GET's headers."""
    accepted = accepted_types(request.headers.getall("Accept", []))
    trail = request.app[NODE].audit
    audited = {"registry": repo.registry, "repository": repo.repository,
               "reference": str(target.digest or target.reference)}
    try:
        resolved = await pull.manifest(repo, target.digest or target.reference, accepted)
    except PolicyDenied as exc:
        audit_manifest(trail, request, {**audited, "digest": exc.digest, "status": 403},
                       decisions.note(request, None, exc))
        raise
    found = resolved.manifest
    _record_cache(request, "manifest", resolved.cache, found.digest)
    audit_manifest(trail, request, {**audited, "digest": str(found.digest),
                                    "media_type": found.media_type, "cache": resolved.cache,
                                    "status": 200}, decisions.note(request, resolved.verdict))
    served = served_of(request)
    served.manifest, served.media_type = found, found.media_type  # the pull is counted
    headers = manifest_headers(found.digest, found.media_type, target.ns)
    headers.update(decisions.warning_header(resolved.verdict))
    if etag_matches(request, found.digest):
        return web.Response(status=304, headers=headers)
    if request.method == "GET":
        _served(request, "memory", len(found.data))
    return web.Response(body=found.data, headers=headers)


async def blob(request: web.Request, pull: PullService, repo: Repo,
               target: Target, *, redirect: bool = True) -> web.StreamResponse:
    """GET or HEAD a blob, as the pull service answers: a file, a fill, a redirect, a size."""
    assert target.digest is not None
    head = request.method == "HEAD"
    # S3 answers several ranges with the whole object: they are answered here.
    redirect = redirect and "," not in request.headers.get("Range", "")
    answer = await pull.blob(repo, target.digest, head=head, redirect=redirect)
    if isinstance(answer, CachedBlob):
        response = await _cached_blob(request, pull, answer)
        if response is not None:
            _record_cache(request, "blob", "hit", target.digest)
            return response
        answer = await pull.blob(repo, target.digest, head=head, redirect=redirect)  # evicted
    if isinstance(answer, BlobRedirect):
        _record_cache(request, "blob", "redirect", target.digest)
        metrics.S3_REDIRECTS.inc()
        return web.Response(status=307, headers={"Location": answer.url,
                                                 "Docker-Content-Digest": str(target.digest)})
    if isinstance(answer, BlobSize):
        _record_cache(request, "blob", "miss", target.digest)
        span = parse_range(request.headers.get("Range"), answer.size)
        response = web.StreamResponse(status=206 if span else 200,
                                      headers=blob_headers(target.digest, answer.size, span))
        response.content_length = (span[1] - span[0]) if span else answer.size
        return response
    if not isinstance(answer, BlobFlight):
        raise OciError(f"blob {target.digest} vanished while it was being answered")
    fill = answer.fill
    _record_cache(request, "blob", "joined" if answer.joined else "miss", target.digest)
    size = await fill.wait_size()
    served_of(request).source = fill.source
    spans = _spans(request, size)
    chunk_size = request.app[NODE].settings.server.chunk_size
    ranges = answer.ranges
    if spans is not None and len(spans) > 1:
        response = await send_parts(
            request, spans, size, blob_headers(target.digest, size, None),
            lambda start, end: fill.read(start, end, chunk_size, ranges))
        _served(request, "fill", response.content_length or 0)
        return response
    span = spans[0] if spans else None
    headers = blob_headers(target.digest, size, span)
    return await stream_fill(request, answer, span, headers, chunk_size,
                             on_bytes=_serving(request, "fill"))


def _spans(request: web.Request, size: int) -> list[Span] | None:
    """The ranges a blob request asks for (``None``: the whole blob). A HEAD's headers are
    those of a single-range GET, or of the whole blob for several ranges."""
    header = request.headers.get("Range")
    if request.method == "HEAD":
        span = parse_range(header, size)
        return [span] if span is not None else None
    return parse_ranges(header, size)


async def _cached_blob(request: web.Request, pull: PullService,
                       cached: CachedBlob) -> web.StreamResponse | None:
    spans = _spans(request, cached.size)
    span = spans[0] if spans is not None and len(spans) == 1 else None
    headers = blob_headers(cached.digest, cached.size, span)
    if etag_matches(request, cached.digest) and spans is None:
        return web.Response(status=304, headers=headers)
    chunk_size = request.app[NODE].settings.server.chunk_size
    count = sum(end - start for start, end in spans) if spans else cached.size
    if cached.data is not None:
        _served(request, "memory", count)
        if spans is not None and len(spans) > 1:
            return await send_parts(request, spans, cached.size, headers,
                                    memory_parts(cached.data))
        start, end = span or (0, cached.size)
        return bytes_response(206 if span else 200, cached.data[start:end], headers)
    file = await pull.open_cached(cached)
    if file is None:
        return None
    digest = cached.digest
    if spans is not None and len(spans) > 1:
        _served(request, "disk", count)
        try:
            return await send_parts(request, spans, cached.size, headers,
                                    file_parts(file, chunk_size))
        finally:
            file.close()
            pull.closed(digest)
    start, end = span or (0, cached.size)
    return FileSliceResponse(file, start, end - start, status=206 if span else 200,
                             headers=headers, chunk_size=chunk_size,
                             on_close=lambda: pull.closed(digest),
                             on_bytes=_serving(request, "disk"))


async def tags_list(request: web.Request, pull: PullService, repo: Repo,
                    target: Target) -> web.Response:
    """A page of the tag list (``n``, ``last``), with ``Link`` to the next page."""
    n, last = _pagination(request)
    page = await pull.tags(repo, n, last)
    body = _dumps({"name": page.name, "tags": page.tags})
    headers = {}
    if page.next_last is not None:
        headers["Link"] = tags_link(target, page.n, page.next_last)
    return _json(body, headers)


async def referrers(request: web.Request, pull: PullService, repo: Repo,
                    target: Target) -> web.Response:
    """The image index of the manifests that refer to a digest (empty when none)."""
    assert target.digest is not None
    artifact_type = request.query.get("artifactType") or None
    found = await pull.referrers(repo, target.digest, artifact_type)
    headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
    if found.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=found.body, headers=headers)


def _pagination(request: web.Request) -> tuple[int | None, str | None]:
    n: int | None = None
    if "n" in request.query:
        text = request.query["n"]
        if not is_number(text) or int(text) > TAGS_N_MAX:
            raise PaginationNumberInvalid(
                f"n must be a whole number up to {TAGS_N_MAX}, got {text[:20]!r}")
        n = int(text)
    last = request.query.get("last")
    if last is not None and len(last) > 128:
        raise TagInvalid("last is longer than a tag can be")
    return n, last


def _dumps(document: object) -> bytes:
    return json.dumps(document).encode()


def _json(body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": JSON_TYPE, **(headers or {})})


def _record_cache(request: web.Request, kind: str, result: str, digest: object) -> None:
    """The answer's cache result (counted when the answer is accounted)."""
    served = served_of(request)
    served.absorb()  # a peer's request names its registry in the log fields
    served.cache, served.digest = result, str(digest)


def _serving(request: web.Request, source: str) -> Callable[[int], None]:
    """Counts body bytes as a streamed answer sends them (a cut one counts what went out)."""
    served = served_of(request)
    served.delivery = source
    accounting = request.app[ACCOUNTING]

    def count(sent: int) -> None:
        accounting.sent(served, sent)
    return count


def _served(request: web.Request, source: str, count: int) -> None:
    """Body bytes this answer sends (counted, in total and for its registry, when the
    answer is accounted)."""
    served = served_of(request)
    served.delivery = source
    served.bytes += count
