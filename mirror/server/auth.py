"""Client authentication and access rules, checked at the edge.

One middleware (:func:`edge`) runs before any handler: it authenticates the
request's ``Authorization`` header (Basic against the htpasswd file or a
static token, or ``Bearer <static token>``) and answers ``401 UNAUTHORIZED``
with the OCI error body and a ``WWW-Authenticate: Basic realm=...``
challenge when the credentials are wrong or missing (every registry client
answers a Basic challenge with the credentials it holds for the host). The
handler calls :func:`authorize` once the request is routed (registry and
repository known), before any cache or upstream work. ``/metrics``, the
status page and the admin API (``/admin/...``) want the admin token instead,
when one is set.

bcrypt is slow on purpose, so a verified password is remembered (by its
SHA-256, never in clear) for ``auth.cache_ttl``, and checks run in threads,
two at a time, off the event loop. The request's user goes in its log line;
the secret never does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import bcrypt
import structlog
from aiohttp import web
from cachetools import TTLCache

from mirror import metrics
from mirror.config import AccessRule, AdminSettings, AuthSettings, Settings
from mirror.config.auth import ANONYMOUS
from mirror.errors import Denied, OciError, Unauthorized
from mirror.routing import Target
from mirror.server.state import log_context

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Paths that never ask for credentials: liveness and readiness probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: The peer API (mirror.server.peer) authenticates other nodes with its own tokens.
PEER_PREFIX = "/_peer/"
#: Paths for operators: the admin token guards them, when set.
ADMIN_PATHS = frozenset({"/metrics", "/"})
#: The admin API (mirror.server.admin: popularity, sync status, warming) is for operators too.
ADMIN_PREFIX = "/admin/"


def is_admin_path(path: str) -> bool:
    """Whether ``path`` is for operators (``/metrics``, ``/``, ``/admin/...``)."""
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIX)
_MAX_HEADER = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request: a user with groups, or anonymous."""

    user: str
    groups: frozenset[str] = frozenset()
    authenticated: bool = True


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, authenticated=False)
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)


class Htpasswd:
    """The bcrypt entries of an htpasswd file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, bytes] = {}
        self.dummy = b""  # checked for unknown users: they take as long as known ones

    def lookup(self, user: str) -> bytes | None:
        """The hash of ``user`` (blocking: stats, maybe re-reads the file)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return self._hashes.get(user)  # moved away for a moment: keep the last good copy
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._hashes = _read_htpasswd(self.path)
            self._stamp = stamp
            cost = min((int(h[4:6]) for h in self._hashes.values() if h[4:6].isdigit()),
                       default=10)
            self.dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(max(4, min(cost, 14))))
            log.info("htpasswd_loaded", path=str(self.path), users=len(self._hashes))
        return self._hashes.get(user)


def _read_htpasswd(path: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for line in path.read_text().splitlines():
        user, sep, hashed = line.strip().partition(":")
        if sep and user and not user.startswith("#") and hashed.startswith("$2"):
            # $2y$ (Apache's htpasswd) is the same algorithm as $2b$.
            found[user] = ("$2b$" + hashed[4:]).encode() if hashed.startswith("$2y$") \
                else hashed.encode()
    return found


class Authenticator:
    """Checks credentials against the htpasswd file and static tokens."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.challenge = f'Basic realm="{settings.realm}"'
        self._htpasswd = Htpasswd(settings.htpasswd) if settings.htpasswd else None
        self._tokens = {t.name: t.token.reveal().encode() for t in settings.tokens}
        self._verified: TTLCache[bytes, str] = TTLCache(maxsize=10_000,
                                                         ttl=max(settings.cache_ttl, 0.001))
        self._bcrypt = asyncio.Semaphore(2)

    def identity(self, user: str) -> Identity:
        """The identity of an authenticated ``user``."""
        return Identity(user, self.settings.groups_of(user))

    async def authenticate(self, header: str | None) -> Identity:
        """The identity an ``Authorization`` header proves.

        Raises:
            Unauthorized: missing (and anonymous access is off), malformed or wrong.
        """
        if not header:
            if self.settings.anonymous:
                return ANONYMOUS_IDENTITY
            metrics.child(metrics.AUTH_FAILURES, "unauthorized").inc()
            raise Unauthorized("authentication required", self.challenge)
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            user = self._token_user(value.strip().encode())
        elif scheme == "basic":
            user = await self._basic_user(value.strip())
        else:
            user = None
        if user is None:
            metrics.child(metrics.AUTH_FAILURES, "unauthorized").inc()
            raise Unauthorized("wrong credentials", self.challenge)
        return self.identity(user)

    def _token_user(self, token: bytes) -> str | None:
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(token, expected):  # every token compared: no early exit
                found = name
        return found

    async def _basic_user(self, value: str) -> str | None:
        try:
            text = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = text.partition(":")
        if not sep or not user or user == ANONYMOUS:  # that name means "no credentials"
            return None
        if user in self._tokens:
            ok = hmac.compare_digest(password.encode(), self._tokens[user])
            return user if ok else None
        if self._htpasswd is None:
            return None
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if self._verified.get(key) == user:
            return user
        async with self._bcrypt:
            ok = await asyncio.to_thread(self._check_password, user, password.encode())
        if ok:
            self._verified[key] = user
        return user if ok else None

    def _check_password(self, user: str, password: bytes) -> bool:
        assert self._htpasswd is not None
        hashed = self._htpasswd.lookup(user)
        if len(password) > 72:  # bcrypt reads at most 72 bytes
            return False
        try:
            if hashed is None:
                bcrypt.checkpw(password, self._htpasswd.dummy)
                return False
            return bcrypt.checkpw(password, hashed)
        except ValueError:  # a corrupt hash in the file
            return False


def allowed(rules: tuple[AccessRule, ...], who: Identity, registry: str | None,
            repository: str) -> bool:
    """Whether a rule lets ``who`` pull ``repository`` of ``registry``.

    A ping (no registry or repository) is allowed to anyone who got this far.
    """
    if not repository:
        return True
    return any(_matches_who(rule, who) and _matches_where(rule, registry, repository)
               for rule in rules)


def _matches_who(rule: AccessRule, who: Identity) -> bool:
    for entry in rule.who:
        if entry == "*" or (entry == ANONYMOUS and not who.authenticated):
            return True
        if entry == "authenticated" and who.authenticated:
            return True
        kind, _, name = entry.partition(":")
        if who.authenticated and ((kind == "user" and name == who.user)
                                  or (kind == "group" and name in who.groups)):
            return True
    return False


def _matches_where(rule: AccessRule, registry: str | None, repository: str) -> bool:
    if "*" not in rule.registries and (registry or "").lower() not in rule.registries:
        return False
    return any(fnmatchcase(repository, glob) for glob in rule.repositories)


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
ADMIN = web.AppKey("admin", AdminSettings)


def authorize(request: web.Request, target: Target) -> None:
    """Refuse a routed request its identity may not pull; call before any cache work.

    Raises:
        Unauthorized: an anonymous client may not pull this (it may log in).
        Denied: an authenticated client may not pull this.
    """
    authenticator = request.app.get(AUTHENTICATOR)
    if authenticator is None:
        return
    who = request.get(IDENTITY, ANONYMOUS_IDENTITY)
    registry = target.upstream.name if target.upstream is not None else None
    if allowed(authenticator.settings.access, who, registry, target.repository):
        return
    log_context(request)["denied"] = True
    metrics.child(metrics.AUTH_FAILURES, "denied").inc()
    if not who.authenticated:
        raise Unauthorized(f"authentication required to pull {target.repository}",
                           authenticator.challenge)
    raise Denied(f"{who.user} may not pull {target.repository} from {registry}")


def admin_allowed(settings: AdminSettings | None, header: str | None) -> bool:
    """Whether a request may read ``/metrics`` and the status page.

    The token is accepted as ``Bearer <token>`` (Prometheus) or as the
    password of Basic credentials (a browser's login prompt).
    """
    if settings is None or settings.token is None:
        return True
    expected = settings.token.reveal().encode()
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), expected)
    if scheme.lower() == "basic":
        try:
            text = base64.b64decode(value.strip(), validate=True)
        except binascii.Error:
            return False
        return hmac.compare_digest(text.partition(b":")[2], expected)
    return False


class RouteNotFound(OciError):
    code = "NOT_FOUND"
    status = 404


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every request before its handler runs (after ``observe``).

    With ``admin.listen``, the admin port answers only the probes and the admin
    paths, and the main port does not answer the admin paths. Without an admin
    token, the admin paths want what registry paths want (any valid
    credentials once ``auth`` is on).
    """
    path = request.path
    admin = request.app.get(ADMIN)
    header = request.headers.get("Authorization")
    if header is not None and len(header) > _MAX_HEADER:
        header = "x"  # wrong, whatever it was
    if admin is not None and admin.listen is not None:
        on_admin_port = _local_port(request) == admin.listen[1]
        if on_admin_port != is_admin_path(path) and path not in OPEN_PATHS:
            raise RouteNotFound(f"no such endpoint on this port: {path[:200]}")
    if path in OPEN_PATHS or path.startswith(PEER_PREFIX):
        return await handler(request)  # the peer API checks its own signed tokens
    admin_path = is_admin_path(path)
    if admin_path and admin is not None and admin.token is not None:
        if not admin_allowed(admin, header):
            raise Unauthorized("the admin token is required", 'Basic realm="mirror admin"')
        return await handler(request)
    if admin_path and admin is not None and admin.listen is not None:
        return await handler(request)  # the admin network is trusted
    authenticator = request.app.get(AUTHENTICATOR)
    if authenticator is not None:
        who = await authenticator.authenticate(header)
        if admin_path and not who.authenticated:
            raise Unauthorized("log in to see this", authenticator.challenge)
        request[IDENTITY] = who
        log_context(request)["user"] = who.user
    return await handler(request)


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return None


def install(app: web.Application, settings: Settings) -> None:
    """Give ``app`` what :func:`edge` reads (its middleware goes in at construction)."""
    if settings.auth is not None:
        app[AUTHENTICATOR] = Authenticator(settings.auth)
    if settings.admin is not None:
        app[ADMIN] = settings.admin
