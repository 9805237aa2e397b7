"""The peer API: content by digest for other nodes of the fleet, under ``/_peer``.

Only requests with a valid peer token (see :mod:`mirror.cluster`) made for this node,
this method and this path are answered; anything else gets 401 and touches nothing.
Only manifests and blobs by digest, only of configured registries, and only under a
registry known to hold them (as for clients: see :mod:`mirror.cache.membership`): a
peer cannot use a node as an open proxy, and no upstream credential ever leaves the
node. A request from a peer of this region
(``X-Mirror-Hop: peer``) is filled without asking peers again; one from a child
region (``child``) without asking parents: requests never loop.
"""

from __future__ import annotations

from aiohttp import web

from mirror import metrics
from mirror.cluster import HEALTH_PATH, HOP_HEADER, POPULAR_PATH, verify_token
from mirror.errors import NameInvalid, RouteNotFound, Unauthorized, Unsupported
from mirror.oci import is_number
from mirror.routing import Kind
from mirror.server.handlers import blob, manifest, repo_of
from mirror.server.state import NODE, log_context

PREFIX = "/_peer"
CHALLENGE = 'Bearer realm="mirror-peer"'
POPULAR_MAX = 1000


async def peer_api(request: web.Request) -> web.StreamResponse:
    """Answer another node: health, or a manifest or blob by digest."""
    node = request.app[NODE]
    context = log_context(request)
    context["route"] = "peer"
    cluster = node.settings.cluster
    if cluster is None:
        raise RouteNotFound("this node is not part of a cluster")
    authorization = request.headers.get("Authorization", "")
    token = authorization[7:] if authorization.startswith("Bearer ") else ""
    audiences = [url for url in (cluster.self_url, *cluster.audiences) if url]
    peer = verify_token(cluster.secret.reveal(), token, node.clock.time(), cluster.token_ttl,
                        audiences=audiences, method=request.method, path=request.raw_path)
    if peer is None:
        metrics.PEER_REFUSED.inc()
        raise Unauthorized("the peer API needs a valid peer token", CHALLENGE)
    context["peer"] = peer
    if request.path == HEALTH_PATH:
        context["route"] = "peer_health"
        return web.json_response({"node_id": cluster.node_id, "region": cluster.region,
                                  "ready": node.ready})
    if request.method not in ("GET", "HEAD"):
        raise Unsupported("the peer API is read-only")
    if request.path == POPULAR_PATH:
        context["route"] = "peer_popular"
        top = request.query.get("top", "50")
        count = min(int(top), POPULAR_MAX) if is_number(top) else 50
        return web.json_response(node.popularity.as_json(count))
    hop = request.headers.get(HOP_HEADER, "peer")
    if hop not in node.pull_for:
        raise NameInvalid(f"unknown {HOP_HEADER}: {hop[:20]!r}")
    query = {"ns": request.query["ns"]} if "ns" in request.query else None
    target = node.router.route(request.path[len(PREFIX):], query)
    if target.kind not in (Kind.BLOB, Kind.MANIFEST) or target.digest is None:
        raise RouteNotFound("the peer API serves manifests and blobs by digest only")
    context.update(hop=hop, registry=target.upstream.name if target.upstream else None,
                   repository=target.repository, reference=target.reference)
    metrics.child(metrics.PEER_SERVED, hop, target.kind.value).inc()
    pull = node.pull_for[hop]
    if target.kind is Kind.BLOB:
        return await blob(request, pull, repo_of(target), target, redirect=False)
    return await manifest(request, pull, repo_of(target), target)
