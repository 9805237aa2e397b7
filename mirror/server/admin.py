"""The admin API: popularity and sync status as JSON, warming on demand.

::

    GET  /admin/popular[?top=N]   the most-pulled tags and the platforms pulled (JSON)
    GET  /admin/sync              rules, pauses, per-reference records, popularity (JSON)
    POST /admin/sync              one pass now: {"dry_run": bool} -> the run's report (JSON)
    POST /admin/warm              {"refs": [...], "platforms": [...], "referrers": bool,
                                   "detach": bool}
                                  -> progress as NDJSON lines, then {"event": "end", ...}

Who may: the edge (:func:`mirror.server.auth.admit_operator`) lets operators in. The
POSTs start upstream work, so they want an operator even where the pages are open
(no ``auth``, no admin token or listener): then the node's local admin token, which
``mirror warm`` and ``mirror sync`` read beside the server. A warm asked by a user
(of ``auth.admin_groups``) names only images that user may pull: one ref outside
their access rules refuses the whole request (403) before anything is fetched.

A warm whose client goes away is cancelled (fills that others wait on go on), unless
it asked ``"detach": true``: then it runs to its end in the node. A request holds at
most :data:`REFS_MAX` refs and :data:`BODY_MAX` bytes (400 and 413 beyond).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web

from mirror.errors import Denied, OciError, Unauthorized
from mirror.server import localtoken
from mirror.server.auth import (
    ADMIN_CHALLENGE,
    AUTHENTICATOR,
    IDENTITY,
    LOCAL_TOKEN,
    OPERATOR,
    allowed,
)
from mirror.server.decisions import audit_admin
from mirror.server.state import NODE, log_context
from mirror.sync.loop import parse_reference

log = structlog.get_logger(__name__)
NDJSON = "application/x-ndjson"
REFS_MAX = 100
BODY_MAX = 32 * 1024
PLATFORMS_MAX = 16


async def popular(request: web.Request) -> web.Response:
    """The most-pulled tags (``top``, default 20) and the platforms pulled per repository."""
    log_context(request)["route"] = "admin"
    top = _int(request.query.get("top", "20"), "top", 1, 10_000)
    return web.json_response(request.app[NODE].popularity.as_json(top))


async def sync_status(request: web.Request) -> web.Response:
    """What ``mirror sync status`` shows."""
    log_context(request)["route"] = "admin"
    node = request.app[NODE]
    status = await node.sync.node_status()  # the node's records, not only this worker's
    status["enabled"] = node.settings.sync is not None
    return web.json_response(status)


async def sync_run(request: web.Request) -> web.Response:
    """One pass of every rule now (``mirror sync --once``)."""
    log_context(request)["route"] = "admin"
    require_operator(request)
    body = await _json_body(request)
    dry_run = bool(body.get("dry_run", False))
    audit_admin(request, "sync_run", 200, dry_run=dry_run)
    report = await request.app[NODE].sync.run_once(dry_run=dry_run)
    return web.json_response(report)


async def warm(request: web.Request) -> web.StreamResponse:
    """Warm references now, streaming progress events (``mirror warm``)."""
    log_context(request)["route"] = "admin"
    require_operator(request)
    body = await _json_body(request)
    refs, platforms = _warm_refs(body), _platforms(body)
    _check_access(request, refs)
    detach = body.get("detach", False) is True
    log_context(request).update(refs=len(refs), detach=detach)
    audit_admin(request, "warm", 200, refs=refs, platforms=list(platforms), detach=detach)
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    node = request.app[NODE]
    work = node.tasks.spawn(node.sync.warm_refs(
        refs, platforms=platforms, referrers=bool(body.get("referrers", False)),
        progress=events.put_nowait), "admin_warm")
    work.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (event := await events.get()) is not None:
            await response.write(json.dumps(event).encode() + b"\n")
        results = await work
    except (asyncio.CancelledError, ConnectionError):
        if not detach:
            work.cancel()  # fills that other clients wait on go on: the fetcher owns them
            log.info("admin_warm_cancelled", refs=len(refs), reason="client went away")
        raise
    failed = [r.as_json() for r in results if r.result in ("failed", "deferred", "refused")]
    await response.write(json.dumps({"event": "end", "failed": failed,
                                     "results": [r.as_json() for r in results]}).encode()
                         + b"\n")
    await response.write_eof()
    return response


def require_operator(request: web.Request) -> None:
    """Refuse an admin action from anyone but an operator.

    The edge marks operators; where it lets everyone through (no ``auth``, no admin
    token or listener) the node's local admin token is wanted.

    Raises:
        Unauthorized: no operator credentials.
    """
    if OPERATOR in request:
        return
    if localtoken.matches(request.app.get(LOCAL_TOKEN), request.headers.get("Authorization")):
        request[OPERATOR] = "local"
        return
    raise Unauthorized("admin actions want the admin token (admin.token, or the node's "
                       "<storage.path>/admin.token, which mirror warm and mirror sync send)",
                       ADMIN_CHALLENGE)


def _warm_refs(body: dict[str, Any]) -> list[str]:
    refs = body.get("refs")
    if not isinstance(refs, list) or not refs or len(refs) > REFS_MAX or not all(
            isinstance(r, str) and 0 < len(r) <= 512 for r in refs):
        raise _bad(f"refs: expected a list of 1 to {REFS_MAX} image references")
    return refs


def _platforms(body: dict[str, Any]) -> tuple[str, ...]:
    platforms = body.get("platforms") or []
    if not isinstance(platforms, list) or len(platforms) > PLATFORMS_MAX or not all(
            isinstance(p, str) and 0 < len(p) <= 64 for p in platforms):
        raise _bad("platforms: expected a list like [\"linux/amd64\"]")
    return tuple(platforms)


def _check_access(request: web.Request, refs: list[str]) -> None:
    """Refuse the request if a user asks for a ref their access rules keep from them.

    Raises:
        BadRequest: a ref names no configured registry or is not a reference.
        Denied: the user may not pull one of the refs.
    """
    authenticator = request.app.get(AUTHENTICATOR)
    if request.get(OPERATOR) != "user" or authenticator is None:
        return  # the admin token, listener or local token: the operator's own rules
    who = request[IDENTITY]
    router = request.app[NODE].router
    refused = []
    for text in refs:
        try:
            repo, _ = parse_reference(router, text)
        except OciError as exc:
            raise _bad(f"refs: {text[:200]!r}: {exc.message}") from None
        if not allowed(authenticator.settings.access, who, repo.registry, repo.repository):
            refused.append(text[:200])
    if refused:
        raise Denied(f"{who.user} may not pull {', '.join(refused[:5])}"
                     + (f" and {len(refused) - 5} more" if len(refused) > 5 else ""))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > BODY_MAX:
        raise BodyTooLarge(f"the body is larger than {BODY_MAX} bytes")
    raw = bytearray()
    while chunk := await request.content.read(BODY_MAX + 1 - len(raw)):
        raw += chunk
        if len(raw) > BODY_MAX:  # a chunked body without a length
            raise BodyTooLarge(f"the body is larger than {BODY_MAX} bytes")
    try:
        text = bytes(raw).decode()
    except UnicodeDecodeError:
        raise _bad("the body is not UTF-8") from None
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError:
        raise _bad("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _int(text: str, name: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _bad(f"{name}: expected a whole number from {low} to {high}")
    return int(text)


class BadRequest(OciError):
    """400: an admin request that is not what the endpoint takes."""

    code = "BAD_REQUEST"
    status = 400


class BodyTooLarge(OciError):
    """413: an admin request body over :data:`BODY_MAX`."""

    code = "SIZE_INVALID"
    status = 413


def _bad(message: str) -> OciError:
    return BadRequest(message)
