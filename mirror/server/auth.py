"""Client authentication and access rules, checked at the edge.

One middleware (:func:`edge`) runs before any handler: it authenticates the
request's ``Authorization`` header (Basic against the htpasswd file or a
static token, or ``Bearer <static token>``) and answers ``401 UNAUTHORIZED``
with the OCI error body and a ``WWW-Authenticate: Basic realm=...``
challenge when the credentials are wrong or missing (every registry client
answers a Basic challenge with the credentials it holds for the host). The
handler calls :func:`authorize` once the request is routed (registry and
repository known), before any cache or upstream work.

A client without credentials is let through as ``anonymous`` when
``auth.anonymous`` is on, except at the ping ``/v2/``: that challenges, so that
skopeo, podman and crane learn the mirror wants a login and send the
credentials they hold (clients that hold none answer with empty Basic
credentials, ``:``, which count as anonymous, or with nothing). Docker Engine is
the exception (:func:`_challenge_at_ping`): its ping is answered as before.

``/metrics``, the status page and the admin API (``/admin/...``) are for
operators (:func:`admit_operator`): the admin token, the admin listener, the
node's local admin token (:mod:`mirror.server.localtoken`) or, with ``auth``,
a user of ``auth.admin_groups``.

bcrypt is slow on purpose, so a verified password is remembered (by its
SHA-256, never in clear) for ``auth.cache_ttl``, and so is a wrong one; checks
run in threads, two at a time, off the event loop, behind the limits of
:mod:`mirror.server.logins`. The request's user goes in its log line; the
secret never does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import random
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
from mirror.errors import Denied, OciError, TooManyRequests, Unauthorized
from mirror.routing import Target
from mirror.server import localtoken
from mirror.server.logins import BcryptQueue, FailureLimits
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
#: The API version check clients send first: it always challenges, so they send what they hold.
PING_PATHS = frozenset({"/v2/", "/v2"})
ADMIN_CHALLENGE = 'Basic realm="mirror admin"'
#: Docker Engine's User-Agent prefix (its classic puller cannot answer Basic without creds).
DOCKER_ENGINE_AGENT = "docker/"


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
#: How an operator request got in: "token", "listener", "local" or "user" (admin group).
OPERATOR: web.RequestKey[str] = web.RequestKey("operator", str)


class Htpasswd:
    """The bcrypt entries of an htpasswd file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, bytes] = {}
        self.dummy = b""  # checked for unknown users: they take as long as known ones
        self.generation = 0  # counts re-reads: remembered answers from before are dropped

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
            self.generation += 1
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
        ttl = max(settings.cache_ttl, 0.001)
        self._verified: TTLCache[bytes, str] = TTLCache(maxsize=10_000, ttl=ttl)
        self._failed: TTLCache[bytes, bool] = TTLCache(maxsize=100_000, ttl=ttl)
        self._generation = 0
        self.limits = FailureLimits(settings.limits)
        self._bcrypt = BcryptQueue(2, settings.limits.queue)

    def identity(self, user: str) -> Identity:
        """The identity of an authenticated ``user``."""
        return Identity(user, self.settings.groups_of(user))

    def is_operator(self, who: Identity) -> bool:
        """Whether ``who`` has the admin role (a member of ``auth.admin_groups``)."""
        return who.authenticated and not who.groups.isdisjoint(self.settings.admin_groups)

    async def authenticate(self, header: str | None, *, address: str = "",
                           ping: bool = False) -> Identity:
        """The identity an ``Authorization`` header proves.

        Args:
            header: the request's ``Authorization`` header, if any.
            address: the client's address (failed logins are limited per address).
            ping: the request is ``/v2/``, which challenges a client without credentials.

        Raises:
            Unauthorized: missing (and anonymous access is off, or a ping), malformed
                or wrong.
            TooManyRequests: too many failed logins from ``address`` or for the user.
            LoginsBusy: too many password checks are waiting already.
        """
        if _no_credentials(header):
            if self.settings.anonymous and not (ping and not header):
                return ANONYMOUS_IDENTITY
            metrics.child(metrics.AUTH_FAILURES, "unauthorized").inc()
            raise Unauthorized("authentication required", self.challenge)
        assert header is not None
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            user = self._token_user(value.strip().encode())
        elif scheme == "basic":
            user = await self._basic_user(value.strip(), address)
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

    async def _basic_user(self, value: str, address: str) -> str | None:
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
        return await self._password_user(user, password, address)

    async def _password_user(self, user: str, password: str, address: str) -> str | None:
        """``user`` if ``password`` is theirs: remembered answers first, then bcrypt."""
        self._forget_if_reloaded()
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if self._verified.get(key) == user:
            return user
        if key in self._failed:  # the same wrong password again: no bcrypt, no count
            await self._fail_delay()
            return None
        try:
            self.limits.admit(address, user)
        except TooManyRequests:
            await self._fail_delay()
            raise
        ran = ok = False
        try:
            ok = await self._bcrypt.run(lambda: self._check_password(user, password.encode()))
            ran = True
        finally:
            self.limits.done(address, user, failed=ran and not ok)
        self._forget_if_reloaded()
        if ok:
            self._verified[key] = user
            return user
        self._failed[key] = True
        return None

    async def _fail_delay(self) -> None:
        """Answer a failure found without bcrypt late (``auth.limits.delay``, 0.5x to 1.5x at
        random, so that a flood's connections do not come back all at once)."""
        delay = self.settings.limits.delay
        if delay > 0:
            await asyncio.sleep(delay * (0.5 + random.random()))

    def _forget_if_reloaded(self) -> None:
        """Drop remembered answers once the htpasswd file was read again (it changed)."""
        assert self._htpasswd is not None
        if self._generation != self._htpasswd.generation:
            self._generation = self._htpasswd.generation
            self._verified.clear()
            self._failed.clear()

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


def _no_credentials(header: str | None) -> bool:
    """No ``Authorization`` header, or Basic with an empty user and password (``:``),
    which containers/image sends when it holds nothing for the host."""
    if not header:
        return True
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        return base64.b64decode(value.strip(), validate=True) == b":"
    except binascii.Error:
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
#: The node's local admin token (mirror.server.localtoken), read or made at start.
LOCAL_TOKEN = web.AppKey("local_admin_token", str)


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
    paths, and the main port does not answer the admin paths. The admin paths
    want an operator (:func:`admit_operator`).
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
    if is_admin_path(path):
        await admit_operator(request, header)
        return await handler(request)
    authenticator = request.app.get(AUTHENTICATOR)
    if authenticator is not None:
        who = await authenticator.authenticate(header, address=request.remote or "",
                                               ping=_challenge_at_ping(request))
        request[IDENTITY] = who
        log_context(request)["user"] = who.user
    return await handler(request)


async def admit_operator(request: web.Request, header: str | None) -> None:
    """Let an operator through to ``/metrics``, ``/`` or ``/admin/...``; mark how.

    Operators: the node's local admin token; the admin token (Bearer, or the
    password of Basic credentials); anyone on the admin listener; with ``auth``,
    a user of ``auth.admin_groups``. Without any of these configured (no ``auth``,
    no admin token or listener) the pages are open, as the start-up warning
    ``open_without_auth`` says, and admin actions still want the local token
    (:func:`mirror.server.admin.require_operator`).

    Raises:
        Unauthorized: no credentials an operator would have.
        Denied: a user without the admin role.
    """
    admin = request.app.get(ADMIN)
    authenticator = request.app.get(AUTHENTICATOR)
    if localtoken.matches(request.app.get(LOCAL_TOKEN), header):
        request[OPERATOR] = "local"
    elif admin is not None and admin.token is not None and admin_allowed(admin, header):
        request[OPERATOR] = "token"
    elif admin is not None and admin.listen is not None and admin.token is None:
        request[OPERATOR] = "listener"  # the admin network is trusted
    elif authenticator is not None and not _no_credentials(header) \
            and not (admin is not None and admin.token is not None
                     and (header or "").lower().startswith("bearer ")):
        who = await authenticator.authenticate(header, address=request.remote or "")
        request[IDENTITY] = who
        log_context(request)["user"] = who.user
        if not authenticator.is_operator(who):
            metrics.child(metrics.AUTH_FAILURES, "denied").inc()
            raise Denied(f"{who.user} is not an operator (auth.admin_groups)")
        request[OPERATOR] = "user"
    elif authenticator is not None or (admin is not None and admin.guarded):
        metrics.child(metrics.AUTH_FAILURES, "unauthorized").inc()
        token_set = admin is not None and admin.token is not None
        challenge = ADMIN_CHALLENGE if authenticator is None or token_set \
            else authenticator.challenge
        raise Unauthorized("for operators: the admin token, or a login of auth.admin_groups",
                           challenge)


def _challenge_at_ping(request: web.Request) -> bool:
    """Whether this is a ``/v2/`` ping that must challenge even where anonymous may pull.

    Not for Docker Engine (``User-Agent: docker/...``): as a ``registry-mirrors`` client
    it never holds the mirror's credentials, and a Basic challenge it cannot answer makes
    it give up on the mirror ("no basic auth credentials") and go to Docker Hub. It pulls
    as anonymous, as before.
    """
    return request.path in PING_PATHS and not request.headers.get(
        "User-Agent", "").startswith(DOCKER_ENGINE_AGENT)


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return None


def install(app: web.Application, settings: Settings) -> None:
    """Give ``app`` what :func:`edge` reads (its middleware goes in at construction).

    Reads (or makes) the node's local admin token: blocking, once, before serving.
    """
    if settings.auth is not None:
        app[AUTHENTICATOR] = Authenticator(settings.auth)
    if settings.admin is not None:
        app[ADMIN] = settings.admin
    try:
        app[LOCAL_TOKEN] = localtoken.ensure_local_token(settings.storage.path)
    except OSError as exc:  # a read-only folder: admin actions then want admin.token
        log.warning("local_admin_token_unavailable", path=str(settings.storage.path),
                    error=str(exc))
