"""What a manifest answer says about the policy, and its audit line.

The manifest handler (and the lean path, replaying a kept answer) call :func:`audit_manifest`
once per decision; admin actions call :func:`audit_admin`. Both go to the node's one
:class:`~mirror.audit.AuditTrail` entry point, ``record``.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from mirror.audit import AuditTrail
from mirror.errors import PolicyDenied
from mirror.policy import Verdict
from mirror.server.auth import IDENTITY, OPERATOR
from mirror.server.middleware import REQUEST_ID
from mirror.server.state import NODE, log_context

log = structlog.get_logger(__name__)
#: The policy part of a manifest answer's audit line (kept for the lean path's replays).
POLICY: web.RequestKey[dict[str, Any]] = web.RequestKey("policy", dict)


def verdict_fields(verdict: Verdict | None, denied: PolicyDenied | None = None
                   ) -> dict[str, Any] | None:
    """The ``policy`` part of an audit line and of the access line."""
    if denied is not None:
        return {"verdict": "deny", "rule": denied.rule, "reason": denied.reason}
    if verdict is None:
        return None
    return {"verdict": "warn" if verdict.warning else "allow", "rule": verdict.rule,
            "reason": verdict.reason, "signer": verdict.signer}


def warning_header(verdict: Verdict | None) -> dict[str, str]:
    """RFC 7234's ``Warning: 299`` for an image served under a failed ``warn`` rule."""
    if verdict is None or not verdict.warning:
        return {}
    reason = verdict.reason.replace('"', "'")[:300]
    return {"Warning": f'299 - "policy: {reason}"'}


def note(request: web.Request, verdict: Verdict | None,
         denied: PolicyDenied | None = None) -> dict[str, Any] | None:
    """Put the verdict in the request's access line (and log a warning once for ``warn``)."""
    fields = verdict_fields(verdict, denied)
    if fields is not None:
        request[POLICY] = fields
        log_context(request)["policy"] = fields["verdict"]
        if fields["verdict"] != "allow":
            log_context(request)["policy_reason"] = fields["reason"]
        if fields["verdict"] == "warn":
            log.warning("policy_warning", **{k: v for k, v in fields.items() if v})
    return fields


def actor(request: web.Request) -> str:
    """Who asked: ``user:<name>``, ``operator:<how>`` or ``anonymous``."""
    who = request.get(IDENTITY)
    if who is not None and who.authenticated:
        return f"user:{who.user}"
    how = request.get(OPERATOR)
    return f"operator:{how}" if how else "anonymous"


def audit_manifest(trail: AuditTrail | None, request: web.Request, fields: dict[str, Any],
                   policy: dict[str, Any] | None, *, request_id: str | None = None) -> None:
    """One audit line for a manifest decision (nothing when no ``audit:`` is configured).

    ``trail`` is the node's (the lean path answers before the request has an app)."""
    if trail is None:
        return
    trail.record("manifest", {
        "request_id": request_id or request.get(REQUEST_ID), "actor": actor(request),
        "client": request.remote, "user_agent": request.headers.get("User-Agent", "")[:200],
        "method": request.method, **fields, "policy": policy})


def audit_admin(request: web.Request, action: str, status: int, **details: Any) -> None:
    """One audit line for an admin action."""
    trail = request.app[NODE].audit
    if trail is None:
        return
    trail.record("admin", {
        "request_id": request.get(REQUEST_ID), "actor": actor(request),
        "client": request.remote, "user_agent": request.headers.get("User-Agent", "")[:200],
        "method": request.method, "path": request.path[:300], "action": action,
        "status": status, **details})
