"""Handlers of the OCI pull API: ping, manifests, blobs, tags, referrers.

Each handler gets a parsed :class:`~mirror.routing.Target` and answers from
the cache layer. Handlers record what they did in the request's log context
(``request[LOG]``), which the middleware writes as one line per request.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from mirror import metrics
from mirror.cache.blobs import CachedBlob
from mirror.errors import (
    NameUnknown,
    OciError,
    TagInvalid,
    Unsupported,
    UpstreamUnavailable,
)
from mirror.oci import MANIFEST_MAX_BYTES, accepted_types, is_number
from mirror.routing import Kind, Target, next_link
from mirror.server.responses import (
    FileSliceResponse,
    blob_headers,
    bytes_response,
    etag_matches,
    manifest_headers,
    parse_range,
    stream_fill,
)
from mirror.server.state import LOG, STATE, MirrorState, log_context
from mirror.upstream import bodies

JSON_TYPE = "application/json"


async def registry(request: web.Request) -> web.StreamResponse:
    """Dispatch every ``/v2`` request (and ``/<prefix>/v2``) to its handler."""
    state = request.app[STATE]
    query = {"ns": request.query["ns"]} if "ns" in request.query else None
    target = state.router.route(request.path, query)
    if request.method not in ("GET", "HEAD"):
        raise Unsupported("this mirror is read-only: only GET and HEAD are supported")
    context = log_context(request)
    fields = {"route": target.kind.value,
              "registry": target.upstream.name if target.upstream else None,
              "repository": target.repository, "reference": target.reference, "ns": target.ns}
    context.update({k: v for k, v in fields.items() if v})
    if target.kind is Kind.PING:
        return _json(b"{}")
    if target.kind is Kind.MANIFEST:
        return await manifest(request, state, target)
    if target.kind is Kind.BLOB:
        return await blob(request, state, target)
    if target.kind is Kind.TAGS:
        return await tags_list(request, state, target)
    return await referrers(request, state, target)


async def manifest(request: web.Request, state: MirrorState, target: Target) -> web.Response:
    """GET or HEAD a manifest by tag or digest; HEAD has exactly GET's headers."""
    client = state.client(target)
    accepted = accepted_types(request.headers.getall("Accept", []))
    if target.digest is not None:
        resolved = await state.manifests.by_digest(client, target.repository, target.digest,
                                                   accepted)
    else:
        resolved = await state.manifests.by_tag(client, target.repository, target.reference,
                                                accepted)
    found = resolved.manifest
    _record_cache(request, "manifest", resolved.cache, found.digest)
    headers = manifest_headers(found.digest, found.media_type, target.ns)
    if etag_matches(request, found.digest):
        return web.Response(status=304, headers=headers)
    if request.method == "GET":
        metrics.child(metrics.SERVED_BYTES, "memory").inc(len(found.data))
    return web.Response(body=found.data, headers=headers)


async def blob(request: web.Request, state: MirrorState, target: Target) -> web.StreamResponse:
    """GET or HEAD a blob: from cache, from a fill under way, or by starting one."""
    assert target.digest is not None
    cached = await state.blobs.cached(target.digest)
    if cached is not None:
        response = await _cached_blob(request, state, cached)
        if response is not None:
            _record_cache(request, "blob", "hit", target.digest)
            return response
    client = state.client(target)
    fill = state.blobs.in_flight(target.digest)
    if fill is None and request.method == "HEAD":
        size = await state.blobs.upstream_size(client, target.repository, target.digest)
        _record_cache(request, "blob", "miss", target.digest)
        span = parse_range(request.headers.get("Range"), size)
        response = web.StreamResponse(status=206 if span else 200,
                                      headers=blob_headers(target.digest, size, span))
        response.content_length = (span[1] - span[0]) if span else size
        return response
    if fill is None and request.method == "GET" and state.shared is not None \
            and state.shared.redirect:
        url = await state.shared.presigned_url(target.digest)
        if url is not None:
            _record_cache(request, "blob", "redirect", target.digest)
            metrics.S3_REDIRECTS.inc()
            return web.Response(status=307, headers={"Location": url,
                                                     "Docker-Content-Digest": str(target.digest)})
    joined = fill is not None
    if fill is None:
        fill, joined = await state.blobs.fill(client, target.repository, target.digest)
    _record_cache(request, "blob", "joined" if joined else "miss", target.digest)
    log_context(request)["source"] = fill.source
    size = await fill.wait_size()
    span = parse_range(request.headers.get("Range"), size)
    headers = blob_headers(target.digest, size, span)
    response = await stream_fill(request, fill, span, headers, state.settings.server.chunk_size)
    metrics.child(metrics.SERVED_BYTES, "fill").inc(response.content_length or 0)
    return response


async def _cached_blob(request: web.Request, state: MirrorState,
                       cached: CachedBlob) -> web.StreamResponse | None:
    span = parse_range(request.headers.get("Range"), cached.size)
    headers = blob_headers(cached.digest, cached.size, span)
    status = 206 if span else 200
    start, end = span or (0, cached.size)
    if etag_matches(request, cached.digest) and span is None:
        return web.Response(status=304, headers=headers)
    if cached.data is not None:
        metrics.child(metrics.SERVED_BYTES, "memory").inc(end - start)
        return bytes_response(status, cached.data[start:end], headers)
    file = await state.blobs.open(cached)
    if file is None:
        return None
    metrics.child(metrics.SERVED_BYTES, "disk").inc(end - start)
    digest = cached.digest
    return FileSliceResponse(file, start, end - start, status=status, headers=headers,
                             chunk_size=state.settings.server.chunk_size,
                             on_close=lambda: state.blobs.closed(digest))


async def tags_list(request: web.Request, state: MirrorState, target: Target) -> web.Response:
    """The upstream tag list, paginated with ``n`` and ``last``, ``Link`` rewritten."""
    params = _pagination(request)
    client = state.client(target)
    async with client.request("GET", target.repository, "tags/list", params=params) as resp:
        if resp.status == 404:
            raise NameUnknown(f"repository {target.repository!r} is unknown upstream")
        body = await _small_body(resp, "tag list")
        link = next_link(target, resp.headers.get("Link"))
    bodies.tag_list(body)
    headers = {"Link": link} if link else {}
    return _json(body, headers)


async def referrers(request: web.Request, state: MirrorState, target: Target) -> web.Response:
    """The upstream referrers index; an upstream 404 is passed through unchanged."""
    params = {"artifactType": request.query["artifactType"]} \
        if "artifactType" in request.query else None
    client = state.client(target)
    async with client.request("GET", target.repository, f"referrers/{target.reference}",
                              params=params) as resp:
        status = resp.status
        if status not in (200, 404):
            raise UpstreamUnavailable(f"upstream answered {status} for referrers", status=502)
        body = await _small_body(resp, "referrers index", allow_status=(200, 404))
        content_type = resp.headers.get("Content-Type", JSON_TYPE)
        filters = resp.headers.get("OCI-Filters-Applied")
    if status == 200:
        bodies.referrers_index(body)
    headers = {"Content-Type": content_type}
    if filters:
        headers["OCI-Filters-Applied"] = filters
    return web.Response(status=status, body=body, headers=headers)


def _pagination(request: web.Request) -> dict[str, str]:
    params: dict[str, str] = {}
    if "n" in request.query:
        n = request.query["n"]
        if not is_number(n) or int(n) > 100_000:
            raise PaginationNumberInvalid(f"n must be a whole number up to 100000, got {n[:20]!r}")
        params["n"] = n
    if "last" in request.query:
        last = request.query["last"]
        if len(last) > 128:
            raise TagInvalid("last is longer than a tag can be")
        params["last"] = last
    return params


class PaginationNumberInvalid(OciError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


async def _small_body(resp: aiohttp.ClientResponse, what: str,
                      allow_status: tuple[int, ...] = (200,)) -> bytes:
    if resp.status not in allow_status:
        raise UpstreamUnavailable(f"upstream answered {resp.status} for the {what}", status=502)
    if resp.content_length is not None and resp.content_length > MANIFEST_MAX_BYTES:
        raise UpstreamUnavailable(f"upstream {what} is too large", status=502)
    try:
        data = await resp.content.read(MANIFEST_MAX_BYTES + 1)
        while len(data) <= MANIFEST_MAX_BYTES and (more := await resp.content.read(65536)):
            data += more
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"upstream {what} broke off", status=502) from exc
    if len(data) > MANIFEST_MAX_BYTES:
        raise UpstreamUnavailable(f"upstream {what} is too large", status=502)
    return data


def _json(body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": JSON_TYPE, **(headers or {})})


def _record_cache(request: web.Request, kind: str, result: str, digest: object) -> None:
    metrics.child(metrics.CACHE_RESULTS, kind, result).inc()
    context = request.get(LOG)
    if context is not None:
        context.update(cache=result, digest=str(digest))

