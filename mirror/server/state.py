"""What the handlers reach: the node (through the typed app key :data:`NODE`) and the
per-request log fields (:data:`LOG`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mirror.node import Node

NODE = web.AppKey("node", Node)
#: Per-request log fields, filled by handlers and written by the middleware.
LOG: web.RequestKey[dict[str, Any]] = web.RequestKey("log", dict)


def log_context(request: web.Request) -> dict[str, Any]:
    """The log fields of this request (created on first use)."""
    context: dict[str, Any] | None = request.get(LOG)
    if context is None:
        context = {}
        request[LOG] = context
    return context
