"""What the handlers reach: the node (through the typed app key :data:`NODE`), the
accounting of answers (:data:`ACCOUNTING`) and the record of the request's answer
(:func:`served_of`), whose free-form fields are the request's log fields."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mirror.node import Node
from mirror.server.accounting import Accounting, Served

NODE = web.AppKey("node", Node)
#: The one accounting of every answer of this process.
ACCOUNTING = web.AppKey("accounting", Accounting)
#: The record of a request's answer, filled by handlers and accounted by the middleware.
SERVED: web.RequestKey[Served] = web.RequestKey("served", Served)


def served_of(request: web.Request) -> Served:
    """The record of this request's answer (created on first use)."""
    served: Served | None = request.get(SERVED)
    if served is None:
        served = Served(method=request.method, path=request.path)
        request[SERVED] = served
    return served


def log_context(request: web.Request) -> dict[str, Any]:
    """The free-form log fields of this request (``error``, ``ns``, ``cut``...)."""
    return served_of(request).fields
