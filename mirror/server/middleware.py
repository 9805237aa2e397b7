"""One middleware: request id, OCI error rendering, and the answer's record accounted.

An :class:`~mirror.errors.OciError` becomes its JSON body and status. A failed
download after headers went out closes the connection, so the client sees a
truncated body and never a finished wrong one; its log line has the status
the client saw (200 or 206), ``cut=true`` and the reason in ``error``. Anything
else is logged with the request id and becomes a 500 with no details in the
body.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from mirror.errors import FillError, OciError
from mirror.server.accounting import Served
from mirror.server.history import INCIDENT_LOG
from mirror.server.state import ACCOUNTING, log_context, served_of
from mirror.version import VERSION

#: The ``Server`` header of every answer.
SERVER = f"mirror/{VERSION}"

log = structlog.get_logger("mirror.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A random prefix per process and a counter: unique, and cheaper than uuid4 per request.
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: The request's id, for the response headers of answers sent before the handler returns.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)


def oci_response(error: OciError) -> web.Response:
    """The HTTP answer for an OCI error."""
    headers = {"Content-Type": "application/json", **API_VERSION, **error.headers}
    return web.Response(status=error.status, body=error.body(), headers=headers)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Wrap every request: id, errors, and its :class:`Served` record accounted once."""
    request_id = request_id_of(request, _ID_PREFIX, _ID_COUNTER)
    request[REQUEST_ID] = request_id
    served = served_of(request)
    context = served.fields
    started = time.perf_counter()
    status = 500
    try:
        # Every log line under this request (retries, fills, S3) carries its id.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            response = await _answer(request, handler, request_id)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    except (FillError, ConnectionResetError) as exc:
        # After the headers: the line says what the client saw, and why it was cut.
        status = context.get("sent_status", 499 if isinstance(exc, ConnectionResetError) else 500)
        if isinstance(exc, FillError) or not context.get("sent_all"):
            context.update(cut=True, error=str(exc) or type(exc).__name__)
        if isinstance(exc, FillError) and request.transport is not None:
            request.transport.close()
        raise
    except asyncio.CancelledError:
        # The client went away (handler_cancellation): what it asked for is dropped,
        # except a blob fill, which the fetcher owns. The line says what it had seen.
        status = context.get("sent_status", 499)
        if not context.get("sent_all"):
            context["error"] = "client went away"
            if status != 499:
                context["cut"] = True
        raise
    finally:
        context.pop("sent_status", None)
        context.pop("sent_all", None)
        _finish(request, served, status, request_id, time.perf_counter() - started)


def request_id_of(request: web.Request, prefix: str, counter: itertools.count[int]) -> str:
    """The client's ``X-Request-Id`` when it is a sane one, else ``prefix`` and a number."""
    supplied = request.headers.get("X-Request-Id", "")
    if supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return f"{prefix}{next(counter):08x}"


def _finish(request: web.Request, served: Served, status: int, request_id: str,
            seconds: float) -> None:
    """Complete the record with what only the end knows, and account it."""
    served.absorb()
    served.status, served.request_id, served.seconds = status, request_id, seconds
    served.client = request.remote or ""
    served.user_agent = request.headers.get("User-Agent", "")
    _remember_problem(request, status, served.route, served.fields)
    accounting = request.app.get(ACCOUNTING)
    if accounting is not None:
        accounting.account(served)


def _remember_problem(request: web.Request, status: int, route: str,
                      context: dict[str, object]) -> None:
    """An error or a refusal goes on the status page's list (a ping's 401 is the start
    of every authenticated pull, not a problem)."""
    incidents = request.app.get(INCIDENT_LOG)
    ping = route == "ping" or request.path.rstrip("/").endswith("/v2")
    if incidents is None or status < 400 or (status == 401 and ping):
        return
    incidents.record(status, request.method, request.path, str(context.get("error") or ""),
                     request.remote or "")


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except OciError as exc:
        log_context(request)["error"] = exc.message
        return oci_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return oci_response(_http_error(exc))
        raise
    except (FillError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled_error", request_id=request_id, path=request.path[:300])
        error = OciError(f"internal error (request id {request_id})")
        return oci_response(error)


def _http_error(exc: web.HTTPException) -> OciError:
    error = OciError(exc.reason or "error")
    error.status = exc.status  # type: ignore[misc]
    error.code = "UNSUPPORTED" if exc.status == 405 else "NOT_FOUND"  # type: ignore[misc]
    return error


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer (the lean path's too) names the API version,
    the server as ``mirror/<version>`` (not aiohttp's Python and aiohttp versions) and its
    request id (a blob streamed while it downloads sends its headers before the handler
    returns)."""
    response.headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")
    response.headers["Server"] = SERVER
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers.setdefault("X-Request-Id", request_id)
