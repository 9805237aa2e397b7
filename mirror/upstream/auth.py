"""Upstream authentication: ``WWW-Authenticate`` challenges and bearer tokens.

The flow (PROTOCOL.md section 3.1): a request goes out anonymously; a 401 names
a challenge; for ``Bearer`` we fetch a token from the challenge's realm, scoped
to one repository, and cache it per (realm, service, scope) until shortly
before it expires. Token values and passwords never appear in a repr, a log
line or an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import structlog
from yarl import URL

from mirror.config import Secret
from mirror.errors import Denied, TooManyRequests, TransientError, UpstreamUnavailable
from mirror.metrics import TOKEN_FETCHES
from mirror.upstream.guard import parse_retry_after

log = structlog.get_logger(__name__)

MIN_TOKEN_LIFETIME = 60.0
"""Tokens shorter-lived than this are treated as living this long (containers/image)."""
MAX_REFRESH_MARGIN = 30.0

_TOKEN68_RE = re.compile(r"\s*([A-Za-z0-9._~+/-]+=*)\s*(?:,|$)")
_SCHEME_RE = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?=\s|,|$)")
_PARAM_RE = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)"""
)


@dataclass(frozen=True)
class Challenge:
    """One RFC 7235 challenge: a lowercase scheme and its auth-params (lowercase keys)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """The ``error`` auth-param (``invalid_token``, ``insufficient_scope``...)."""
        return self.params.get("error")


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """Parse every challenge out of one or more ``WWW-Authenticate`` header values.

    Args:
        values: the header values, e.g. ``resp.headers.getall("WWW-Authenticate", [])``.

    Returns:
        The challenges in order; malformed trailing text is ignored.
    """
    return [challenge for value in values for challenge in _parse_header(value)]


def _parse_header(value: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(value):
        if value[pos] in ", \t":
            pos += 1
            continue
        match = _SCHEME_RE.match(value, pos)
        if match is None:
            break
        params, pos = _parse_params(value, match.end())
        challenges.append(Challenge(match.group(1).lower(), params))
    return challenges


def _parse_params(value: str, pos: int) -> tuple[dict[str, str], int]:
    """Read auth-params after a scheme; stop where the next challenge's scheme begins."""
    params: dict[str, str] = {}
    # A token68 (``Negotiate abc==``) is legal but carries nothing we use.
    token68 = _TOKEN68_RE.match(value, pos)
    if token68 is not None:
        return params, token68.end()
    while True:
        match = _PARAM_RE.match(value, pos)
        if match is None:
            return params, pos
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
        pos = match.end()


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer if offered, else Basic, else ``None``."""
    by_scheme = {c.scheme: c for c in reversed(list(challenges))}
    return by_scheme.get("bearer") or by_scheme.get("basic")


def basic_authorization(username: str, password: Secret) -> Secret:
    """The ``Authorization: Basic`` header value for a username and password."""
    raw = f"{username}:{password.reveal()}".encode()
    return Secret("Basic " + base64.b64encode(raw).decode("ascii"))


@dataclass(frozen=True)
class BearerToken:
    """A bearer token and the monotonic time when it must no longer be used."""

    value: Secret
    expires_at: float
    obtained_at: float

    def authorization(self) -> str:
        """The ``Authorization`` header value carrying this token."""
        return f"Bearer {self.value.reveal()}"

    def fresh(self, now: float) -> bool:
        """Whether the token is still good, leaving a margin before expiry."""
        lifetime = self.expires_at - self.obtained_at
        return now < self.expires_at - min(MAX_REFRESH_MARGIN, lifetime / 10)


def parse_token_response(body: Any, now: float, wall_now: float | None = None) -> BearerToken:
    """Build a :class:`BearerToken` from a token endpoint's JSON body.

    Args:
        body: the decoded JSON.
        now: the monotonic clock reading when the response arrived.
        wall_now: the wall clock then (for ``issued_at``); defaults to ``time.time()``.

    Raises:
        ValueError: the body carries no token.
    """
    if not isinstance(body, dict):
        raise ValueError("token response is not a JSON object")
    value = body.get("token") or body.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("token response has no token")
    expires_in = body.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, int | float) else MIN_TOKEN_LIFETIME
    lifetime = max(lifetime, MIN_TOKEN_LIFETIME)
    age = _age(body.get("issued_at"), time.time() if wall_now is None else wall_now)
    # A skewed clock must not make every token look expired: trust issued_at
    # only for up to half the lifetime.
    age = min(max(age, 0.0), lifetime / 2)
    return BearerToken(Secret(value), expires_at=now + lifetime - age, obtained_at=now)


def _age(issued_at: Any, wall_now: float) -> float:
    if not isinstance(issued_at, str):
        return 0.0
    try:
        issued = datetime.fromisoformat(issued_at.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if issued.tzinfo is None:
        return 0.0
    return wall_now - issued.timestamp()


TokenKey = tuple[str, str, tuple[str, ...]]
"""(realm, service, sorted scopes)."""


class TokenCache:
    """Bearer tokens per (realm, service, scopes); one fetch per key at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tokens: dict[TokenKey, BearerToken] = {}
        self._locks: dict[TokenKey, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"TokenCache(<{len(self._tokens)} tokens>)"

    def peek(self, key: TokenKey) -> BearerToken | None:
        """The cached token for ``key`` if it is still fresh."""
        token = self._tokens.get(key)
        return token if token is not None and token.fresh(self.clock()) else None

    async def get(self, key: TokenKey, fetch: Callable[[], Awaitable[BearerToken]]) -> BearerToken:
        """A fresh token for ``key``, calling ``fetch`` only if none is cached.

        Concurrent callers for the same key wait for one fetch.
        """
        token = self.peek(key)
        if token is not None:
            return token
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            token = self.peek(key)  # another task may have fetched it meanwhile
            if token is None:
                token = await fetch()
                self._tokens[key] = token
            return token

    def invalidate(self, key: TokenKey, token: BearerToken) -> None:
        """Drop ``token`` if it is still the cached one (a newer one is kept)."""
        if self._tokens.get(key) is token:
            del self._tokens[key]


def token_key(challenge: Challenge, scopes: Iterable[str]) -> TokenKey:
    """The cache key of a Bearer challenge answered for ``scopes``."""
    return (challenge.params.get("realm", ""), challenge.params.get("service", ""),
            tuple(sorted(set(scopes))))


async def fetch_token(
    session: aiohttp.ClientSession,
    key: TokenKey,
    *,
    registry: str,
    credentials: Secret | None,
    now: Callable[[], float],
) -> BearerToken:
    """GET a token from ``realm?service=..&scope=..`` (one ``scope`` per scope).

    Args:
        session: the HTTP session.
        key: realm, service and scopes, from :func:`token_key`.
        registry: the upstream's name, for metrics, logs and messages.
        credentials: a ``Basic`` Authorization value, or ``None`` for anonymous.
        now: the clock the token's expiry is measured on.

    Raises:
        Denied: the endpoint answered 401 or 403.
        TooManyRequests: the endpoint answered 429 (never reported as DENIED).
        TransientError: connection trouble, timeout or 5xx (worth retrying).
        UpstreamUnavailable: no realm, another status, or no token in the answer.
    """
    try:
        token = await _request_token(session, key, registry, credentials, now)
    except Exception:
        TOKEN_FETCHES.labels(registry, "error").inc()
        raise
    TOKEN_FETCHES.labels(registry, "ok").inc()
    log.debug("upstream_token_fetched", registry=registry, scopes=len(key[2]),
              lifetime=round(token.expires_at - token.obtained_at))
    return token


async def _request_token(
    session: aiohttp.ClientSession,
    key: TokenKey,
    registry: str,
    credentials: Secret | None,
    now: Callable[[], float],
) -> BearerToken:
    realm, service, scopes = key
    if not realm.startswith(("http://", "https://")):
        raise UpstreamUnavailable(f"{registry}: bearer challenge has no usable realm", status=502)
    query = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
    headers = {"Authorization": credentials.reveal()} if credentials is not None else {}
    try:
        async with session.get(URL(realm).extend_query(query), headers=headers,
                               allow_redirects=True) as resp:
            if resp.status == 429:
                raise TooManyRequests(f"{registry}: token endpoint rate limit reached",
                                      parse_retry_after(resp.headers.get("Retry-After")))
            _check_token_status(resp.status, registry)
            body = await resp.json(content_type=None)
        return parse_token_response(body, now())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transient_from(exc, "token endpoint") from None
    except ValueError as exc:  # bad JSON or no token in it
        raise UpstreamUnavailable(f"{registry}: token endpoint sent no token ({exc})",
                                  status=502) from None


def _check_token_status(status: int, registry: str) -> None:
    if status in (401, 403):
        raise Denied(f"{registry}: token endpoint refused the request (status {status})")
    if status >= 500:
        raise TransientError("status_5xx", 502, f"token endpoint answered {status}")
    if status != 200:
        raise UpstreamUnavailable(f"{registry}: token endpoint answered {status}", status=502)


def transient_from(exc: BaseException, what: str) -> TransientError:
    """Classify a network exception; the message never carries a URL."""
    kind = type(exc).__name__
    if isinstance(exc, TimeoutError):  # includes aiohttp.ServerTimeoutError
        return TransientError("timeout", 504, f"{what} timed out ({kind})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        why = os.strerror(errno) if errno else kind
        return TransientError("connect", 503, f"cannot connect to {what}: {why}")
    return TransientError("connect", 502, f"{what} connection failed ({kind})")
