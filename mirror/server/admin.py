"""The admin API: popularity and sync status as JSON, warming on demand.

::

    GET  /admin/popular[?top=N]   the most-pulled tags and the platforms pulled (JSON)
    GET  /admin/sync              rules, pauses, per-reference records, popularity (JSON)
    POST /admin/sync              one pass now: {"dry_run": bool} -> the run's report (JSON)
    POST /admin/warm              {"refs": [...], "platforms": [...], "referrers": bool}
                                  -> progress as NDJSON lines, then {"event": "end", ...}

Reading is open (other regions read popularity); the POSTs start upstream work and
are accepted from loopback only (``mirror warm`` and ``mirror sync`` run beside the
server).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from aiohttp import web

from mirror.errors import Denied, OciError
from mirror.server.state import NODE, log_context

NDJSON = "application/x-ndjson"
REFS_MAX = 1000


async def popular(request: web.Request) -> web.Response:
    """The most-pulled tags (``top``, default 20) and the platforms pulled per repository."""
    log_context(request)["route"] = "admin"
    top = _int(request.query.get("top", "20"), "top", 1, 10_000)
    return web.json_response(request.app[NODE].popularity.as_json(top))


async def sync_status(request: web.Request) -> web.Response:
    """What ``mirror sync status`` shows."""
    log_context(request)["route"] = "admin"
    node = request.app[NODE]
    status = node.sync.status()
    status["enabled"] = node.settings.sync is not None
    return web.json_response(status)


async def sync_run(request: web.Request) -> web.Response:
    """One pass of every rule now (``mirror sync --once``)."""
    log_context(request)["route"] = "admin"
    _loopback_only(request)
    body = await _json_body(request)
    report = await request.app[NODE].sync.run_once(dry_run=bool(body.get("dry_run", False)))
    return web.json_response(report)


async def warm(request: web.Request) -> web.StreamResponse:
    """Warm references now, streaming progress events (``mirror warm``)."""
    log_context(request)["route"] = "admin"
    _loopback_only(request)
    body = await _json_body(request)
    refs = body.get("refs")
    platforms = body.get("platforms") or []
    if not isinstance(refs, list) or not refs or len(refs) > REFS_MAX or not all(
            isinstance(r, str) for r in refs):
        raise _bad(f"refs: expected a list of 1 to {REFS_MAX} image references")
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise _bad("platforms: expected a list like [\"linux/amd64\"]")
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    work = asyncio.ensure_future(request.app[NODE].sync.warm_refs(
        refs, platforms=tuple(platforms), referrers=bool(body.get("referrers", False)),
        progress=events.put_nowait))
    work.add_done_callback(lambda _: events.put_nowait(None))
    while (event := await events.get()) is not None:
        await response.write(json.dumps(event).encode() + b"\n")
    results = await work
    failed = [r.as_json() for r in results if r.result in ("failed", "deferred")]
    await response.write(json.dumps({"event": "end", "failed": failed,
                                     "results": [r.as_json() for r in results]}).encode()
                         + b"\n")
    await response.write_eof()
    return response


def _loopback_only(request: web.Request) -> None:
    try:
        loopback = ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Denied("admin actions are accepted from loopback only")


async def _json_body(request: web.Request) -> dict[str, Any]:
    text = await request.text()
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


def _bad(message: str) -> OciError:
    return BadRequest(message)
