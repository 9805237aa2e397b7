"""The registry client: one per upstream, shared by every request task.

``request()`` hands back the final response with its body unread. Around it:
anonymous first, then the challenge's scheme (PROTOCOL.md section 3); redirects
followed by hand so signed URLs keep their bytes and credentials never leave
their origin; retries with backoff for connection trouble, timeouts and 5xx;
429 waited out only when the wait is short. Credentials come from a
:class:`~mirror.upstream.credentials.CredentialPool`; a rate-limited one is
swapped for the next (a 429 is retried at once with it). Every attempt passes
the upstream's guard first (request budget, circuit breaker: see guard.py),
and every response's rate-limit headers are read.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from mirror.config import Secret, StaticCredential, UpstreamSettings
from mirror.errors import (
    Denied,
    NameUnknown,
    TooManyRequests,
    TransientError,
    UpstreamUnavailable,
)
from mirror.metrics import (
    CALLER,
    UPSTREAM_BY_CALLER,
    UPSTREAM_ERRORS,
    UPSTREAM_REQUESTS,
    UPSTREAM_RETRIES,
    child,
)
from mirror.upstream.auth import (
    BearerToken,
    Challenge,
    TokenCache,
    TokenKey,
    fetch_token,
    parse_www_authenticate,
    pick_challenge,
    token_key,
    transient_from,
)
from mirror.upstream.credentials import CredentialPool, make_source
from mirror.upstream.guard import UpstreamGuard, parse_retry_after
from mirror.upstream.hosts import OwnHosts, confined

log = structlog.get_logger(__name__)

USER_AGENT = "oci-mirror/0.1"
MAX_REDIRECTS = 10
MAX_AUTH_ROUNDS = 3
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

Origin = tuple[str, str, int | None]


def origin_of(url: URL) -> Origin:
    """Scheme, host and port (default ports made explicit) of ``url``."""
    return (url.scheme, (url.host or "").lower(), url.port)


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.1 s, 0.2 s, 0.4 s... capped at 2 s."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class _Request:
    """One request, whatever its retries: what the breaker counts."""

    __slots__ = ("forgiven",)

    def __init__(self) -> None:
        self.forgiven = False  # its 5xx were found to be about it, not about the registry


@dataclass
class _Attempt:
    """State of one try at a request: auth rounds per origin, redirect hops."""

    repository: str
    started: float
    auth_rounds: dict[Origin, int] = field(default_factory=dict)
    tokens_sent: dict[Origin, tuple[TokenKey, BearerToken]] = field(default_factory=dict)
    hops: int = 0
    credential: str | None = None  # label of the credential in use
    renewed: bool = False  # a rejected Basic credential was fetched afresh once
    request: _Request | None = None  # shared by every try of one request
    confined: bool = True  # redirects only to the registry's own hosts (see hosts.py)


class UpstreamClient:
    """HTTP client for one upstream registry; safe to share between tasks.

    Args:
        settings: the upstream's validated settings.
        session: an existing session to use (not closed by :meth:`close`); by
            default one is created on first use.
        clock: monotonic clock for token expiry (tests move it forward).
        guard: the upstream's budget and breaker; by default one from ``settings``.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        guard: UpstreamGuard | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._owns_session = session is None
        self._origin = origin_of(settings.url)
        self._tokens = TokenCache(clock)
        self._challenges: dict[Origin, Challenge] = {}
        credentials = settings.credentials
        if not credentials and settings.username is not None and settings.password is not None:
            credentials = (StaticCredential("static-0", settings.username, settings.password),)
        self._credentials = CredentialPool(
            settings.name, [make_source(c, settings.name) for c in credentials])
        self.guard = guard or UpstreamGuard(settings)
        self._health: asyncio.Future[bool] | None = None
        self._own_hosts = OwnHosts(settings)

    def __repr__(self) -> str:
        return f"UpstreamClient(name={self.name!r}, url={str(self._settings.url)!r})"

    @property
    def name(self) -> str:
        """The upstream's configured name."""
        return self._settings.name

    @property
    def credential(self) -> str | None:
        """The label of the credential in use (``None``: anonymous), for logs and metrics."""
        return self._credentials.active

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def request(
        self,
        method: str,
        repository: str,
        suffix: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        retry: bool = True,
        background: bool = False,
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """Send ``method`` to ``<upstream>/v2/<repository>/<suffix>``.

        Args:
            method: ``GET`` or ``HEAD``.
            repository: validated repository name, e.g. ``library/nginx``.
            suffix: e.g. ``manifests/latest`` or ``blobs/sha256:...``.
            headers: extra request headers (``Accept``, ``Range``...).
            params: query parameters (``n``, ``last``...).
            retry: retry connection errors, timeouts, 5xx and short 429s.
            background: the request is not for a waiting client (warming,
                prefetch, revalidation in the background): it waits for the
                upstream's request budget instead of spending the client overdraft.

        Returns:
            A context manager yielding the final response, body unread; any status
            other than those below is the caller's to interpret.

        Raises:
            Denied: 403, or still 401 after authenticating.
            NameUnknown: still 401 with ``insufficient_scope`` (Docker Hub's 404).
            TooManyRequests: 429 that cannot be waited out, a client request over
                the budget, or the breaker open after 429s.
            UpstreamUnavailable: connection trouble, timeouts or 5xx after retries,
                or the breaker open.
        """
        url = self._v2_url(f"{repository}/{suffix}")
        if method == "HEAD" and suffix.startswith("blobs/") and self._settings.blob_probe == "get":
            method = "GET"  # ECR Public answers a blob HEAD with 401; only the headers are read
        # Small answers have a total deadline, so a drip cannot hold a pooled connection;
        # a blob takes as long as it takes (read_timeout bounds each silence).
        deadline = None if suffix.startswith("blobs/") else self._settings.request_timeout
        return self._open(method, repository, url.extend_query(params or {}), headers or {}, retry,
                          background=background, deadline=deadline, confined=confined(suffix))

    async def ping(self, *, background: bool = False) -> None:
        """GET ``/v2/`` with authentication.

        Raises:
            UpstreamUnavailable: the upstream is down or did not answer 2xx;
                otherwise like :meth:`request`.
        """
        async with self._open("GET", "", self._v2_url(""), {}, True, background=background,
                              deadline=self._settings.request_timeout) as resp:
            if not 200 <= resp.status < 300:
                raise UpstreamUnavailable(f"{self.name}: /v2/ answered {resp.status}", status=502)

    def _v2_url(self, tail: str) -> URL:
        base = self._settings.url
        # Names and references are validated at the edge; encoded=True keeps the
        # ":" of a digest as is.
        return base.with_path(f"{base.raw_path.rstrip('/')}/v2/{tail}", encoded=True)

    @asynccontextmanager
    async def _open(
        self, method: str, repository: str, url: URL, headers: Mapping[str, str], retry: bool,
        *, background: bool = False, deadline: float | None = None, confined: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response, released at the end; with ``deadline``, the whole exchange (retries,
        waits and the caller's reading of the body) must end within it.

        Raises:
            UpstreamUnavailable: (504) the deadline passed.
        """
        try:
            async with asyncio.timeout(deadline):
                resp = await self._send(method, repository, url, headers, retry,
                                        background=background, confined=confined)
                try:
                    yield resp
                finally:
                    resp.release()
        except TimeoutError:
            if deadline is None:
                raise
            UPSTREAM_ERRORS.labels(self.name, "timeout").inc()
            raise UpstreamUnavailable(f"{self.name}: no complete answer within {deadline:g}s "
                                      "(request_timeout)", status=504) from None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self._settings
            timeout = aiohttp.ClientTimeout(
                total=None, connect=s.connect_timeout, sock_connect=s.connect_timeout,
                sock_read=s.read_timeout,
            )
            self._session = aiohttp.ClientSession(
                auto_decompress=False, timeout=timeout, requote_redirect_url=False,
                connector=aiohttp.TCPConnector(limit=s.max_connections),
            )
        return self._session

    async def _send(
        self, method: str, repository: str, url: URL, headers: Mapping[str, str], retry: bool,
        *, background: bool = False, confined: bool = True,
    ) -> aiohttp.ClientResponse:
        """Retry loop around :meth:`_attempt`: transient errors and short 429s."""
        attempts = self._settings.retries + 1 if retry else 1
        rotations = 0
        request = _Request()  # the breaker counts this request's retries as one failure
        for attempt in range(1, attempts + 1):
            try:
                state = _Attempt(repository, started=self._tokens.clock(),
                                 credential=self._credentials.active, request=request,
                                 confined=confined)
                resp = await self._guarded(method, url, headers, state, background=background)
            except TransientError as exc:
                UPSTREAM_ERRORS.labels(self.name, exc.reason).inc()
                if attempt == attempts or self.guard.failing_fast:
                    raise UpstreamUnavailable(f"{self.name}: {exc.detail}",
                                              status=exc.status) from None
                await self._pause(backoff_delay(attempt), exc.reason, attempt)
                continue
            if resp.status != 429:
                self._note_remaining(resp, state)
                return resp
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            resp.release()
            UPSTREAM_ERRORS.labels(self.name, "rate_limited").inc()
            if attempt < attempts and rotations < len(self._credentials) - 1 and self._rotate(
                    state.credential, "429"):
                rotations += 1
                continue
            if wait is None or wait > self._settings.max_retry_wait or attempt == attempts:
                raise TooManyRequests(f"{self.name}: upstream rate limit reached",
                                      self.guard.client_retry_after(wait))
            await self._pause(wait, "rate_limited", attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _guarded(
        self, method: str, url: URL, headers: Mapping[str, str], state: _Attempt, *,
        background: bool,
    ) -> aiohttp.ClientResponse:
        """:meth:`_attempt` admitted by the guard, its outcome reported to the breaker.

        Connection errors, timeouts, 5xx and 429 count as failures; any other
        answer, a refusal included, shows upstream is up. A 5xx that would open
        the breaker is checked against ``/v2/`` first (see guard.py).
        """
        ticket = await self.guard.admit(background=background)
        ok: bool | None = None
        limited, retry_after, suspect = False, None, False
        try:
            resp = await self._attempt(method, url, headers, state)
            ok = resp.status != 429
            if not ok:
                limited, retry_after = True, parse_retry_after(resp.headers.get("Retry-After"))
            return resp
        except TransientError as exc:
            ok, suspect = False, exc.reason == "status_5xx"
            request = state.request
            if suspect and request is not None and request.forgiven:
                ok = None
            elif suspect and request is not None and not ticket.probe \
                    and self.guard.would_open(request) and await self._registry_answers():
                ok, request.forgiven = None, True
                self.guard.forgive()
                log.warning("upstream_5xx_not_counted", registry=self.name,
                            repository=state.repository,
                            hint="/v2/ answers: the 5xx are about these requests, not the "
                                 "registry's health; the circuit breaker stays closed")
            raise
        except TooManyRequests as exc:  # the token endpoint's 429
            ok, limited, retry_after = False, True, exc.retry_after
            UPSTREAM_ERRORS.labels(self.name, "rate_limited").inc()
            raise TooManyRequests(exc.message, self.guard.client_retry_after(retry_after)) \
                from None
        except (Denied, NameUnknown):
            ok = True
            raise
        finally:
            self.guard.settle(ticket, ok, rate_limited=limited, retry_after=retry_after,
                              request=state.request, suspect=suspect)

    async def _registry_answers(self) -> bool:
        """Whether upstream's ``/v2/`` answers below 500 (401 included): the registry is up.

        One check at a time; concurrent callers share it.
        """
        if self._health is None or self._health.done():
            self._health = asyncio.ensure_future(self._check_v2())
        return await asyncio.shield(self._health)

    async def _check_v2(self) -> bool:
        try:
            resp = await self._raw("GET", self._v2_url(""), self._headers({}, None))
        except TransientError:
            return False
        resp.release()
        return resp.status < 500

    def _note_remaining(self, resp: aiohttp.ClientResponse, state: _Attempt) -> None:
        """Docker Hub's ``ratelimit-remaining: 0;w=21600``: the next request would be a 429."""
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None and remaining.split(";", 1)[0].strip() == "0":
            self._rotate(state.credential, "remaining")

    def _rotate(self, label: str | None, reason: str) -> bool:
        """Switch away from a rate-limited credential; True if another one is now active."""
        switching = label is not None and self._credentials.active == label
        if not self._credentials.rate_limited(label, reason):
            return False
        if switching:
            # Tokens were granted to the old credential and count against its limit.
            self._tokens = TokenCache(self._tokens.clock)
        return True

    async def _pause(self, delay: float, reason: str, attempt: int) -> None:
        UPSTREAM_RETRIES.labels(self.name).inc()
        log.warning("upstream_retry", registry=self.name, reason=reason, attempt=attempt,
                    delay=round(delay, 3))
        await asyncio.sleep(delay)

    async def _attempt(
        self, method: str, url: URL, headers: Mapping[str, str], state: _Attempt
    ) -> aiohttp.ClientResponse:
        """One try: authenticate and follow redirects until a final response."""
        while True:
            origin = origin_of(url)
            authorization = await self._authorization(origin, state)
            resp = await self._raw(method, url, self._headers(headers, authorization))
            if origin == self._origin:
                # Whose limit the headers speak of: the credential the request went with.
                credential = state.credential if authorization is not None else None
                self.guard.observe(resp.headers, credential or "anonymous")
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                method, url = self._redirect(method, url, resp, state)
            elif resp.status == 401:
                if origin not in self._challenges and "WWW-Authenticate" not in resp.headers:
                    await self._learn_challenge(url, origin)
                self._on_unauthorized(resp, origin, authorization is not None, state)
            elif resp.status == 400 and authorization and self._drop_stale_token(origin, state):
                # ECR Public answers an expired token with 400 and no challenge, not 401
                # (aws/containers-roadmap#2835): fetch a new one, once.
                resp.release()
            elif resp.status == 403:
                resp.release()
                UPSTREAM_ERRORS.labels(self.name, "denied").inc()
                raise Denied(f"{self.name}: access to {state.repository or '/v2/'} denied")
            elif resp.status >= 500:
                resp.release()
                raise TransientError("status_5xx", 502, f"upstream answered {resp.status}")
            else:
                return resp

    async def _raw(
        self, method: str, url: URL, headers: CIMultiDict[str]
    ) -> aiohttp.ClientResponse:
        try:
            resp = await self._get_session().request(method, url, headers=headers,
                                                     allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "upstream" if origin_of(url) == self._origin else "redirect target"
            raise transient_from(exc, what) from None
        UPSTREAM_REQUESTS.labels(self.name, method, str(resp.status)).inc()
        child(UPSTREAM_BY_CALLER, self.name, CALLER.get()).inc()
        return resp

    def _headers(self, extra: Mapping[str, str], authorization: str | None) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict({"User-Agent": USER_AGENT})
        headers.update(extra)
        headers["Accept-Encoding"] = "identity"
        # Only the client decides what authorization goes to which origin.
        headers.popall("Authorization", None)
        if authorization is not None:
            headers["Authorization"] = authorization
        return headers

    def _redirect(
        self, method: str, url: URL, resp: aiohttp.ClientResponse, state: _Attempt
    ) -> tuple[str, URL]:
        location = resp.headers["Location"]
        resp.release()
        state.hops += 1
        if state.hops > MAX_REDIRECTS:
            raise UpstreamUnavailable(f"{self.name}: more than {MAX_REDIRECTS} redirects",
                                      status=502)
        try:
            # Signed query strings must reach the CDN byte for byte: never re-encode.
            target = URL(location, encoded=True)
            next_url = target if target.is_absolute() else url.join(target)
        except ValueError:
            raise UpstreamUnavailable(f"{self.name}: unusable redirect Location",
                                      status=502) from None
        if next_url.scheme not in ("http", "https"):
            raise UpstreamUnavailable(f"{self.name}: redirect to a non-HTTP URL", status=502)
        if state.confined and next_url not in self._own_hosts:
            UPSTREAM_ERRORS.labels(self.name, "bad_content").inc()
            log.warning("upstream_redirect_refused", registry=self.name, host=next_url.host,
                        hint="tag lists, referrers and manifests by tag are not verifiable "
                             "by digest: they are taken from the registry's own hosts only")
            raise UpstreamUnavailable(f"{self.name}: redirected to a host that is not the "
                                      "registry's own", status=502)
        if resp.status == 303 and method != "HEAD":
            method = "GET"
        log.debug("upstream_redirect", registry=self.name, status=resp.status,
                  host=next_url.host, hop=state.hops)
        return method, next_url

    def _on_unauthorized(
        self, resp: aiohttp.ClientResponse, origin: Origin, sent_auth: bool, state: _Attempt
    ) -> None:
        """Learn the challenge of a 401, or raise if authenticating cannot help."""
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        resp.release()
        offered = pick_challenge(challenges)
        rounds = state.auth_rounds.get(origin, 0) + 1
        state.auth_rounds[origin] = rounds
        challenge = offered or self._challenges.get(origin)
        if challenge is None or rounds > MAX_AUTH_ROUNDS or not self._can_answer(challenge, origin):
            self._deny(challenges, state.repository)
        if sent_auth and not (self._drop_stale_token(origin, state)
                              or self._renew_basic(challenge, state)):
            self._deny(challenges, state.repository)
        self._challenges[origin] = challenge

    def _renew_basic(self, challenge: Challenge, state: _Attempt) -> bool:
        """A rejected Basic credential that its source can fetch afresh (ECR, a helper):
        once per try. A static one is rejected for good."""
        if challenge.scheme != "basic" or state.renewed:
            return False
        state.renewed = True
        return self._credentials.invalidate()

    async def _learn_challenge(self, url: URL, origin: Origin) -> None:
        """GCR may answer 401 with no challenge except on ``/v2/`` (containers/image
        ``setupRequestAuth``): ask there, anonymously, and remember what it says."""
        ping = self._v2_url("") if origin == self._origin else url.with_path("/v2/")
        resp = await self._raw("GET", ping, self._headers({}, None))
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        resp.release()
        challenge = pick_challenge(challenges)
        if resp.status == 401 and challenge is not None and self._can_answer(challenge, origin):
            self._challenges[origin] = challenge

    def _can_answer(self, challenge: Challenge, origin: Origin) -> bool:
        if challenge.scheme == "bearer":
            return True
        return challenge.scheme == "basic" and origin == self._origin and len(self._credentials) > 0

    def _drop_stale_token(self, origin: Origin, state: _Attempt) -> bool:
        """After a 401 despite a token: drop it and return True if it predates this try.

        A token fetched during this try was rejected for good: retrying is useless.
        """
        sent = state.tokens_sent.get(origin)
        if sent is None or sent[1].obtained_at >= state.started:
            return False
        self._tokens.invalidate(*sent)
        return True

    def _deny(self, challenges: list[Challenge], repository: str) -> NoReturn:
        UPSTREAM_ERRORS.labels(self.name, "denied").inc()
        if any(c.error == "insufficient_scope" for c in challenges):
            raise NameUnknown(f"{self.name}: repository {repository} not found or not accessible")
        raise Denied(f"{self.name}: authentication for {repository or '/v2/'} failed")

    def _scopes(self, origin: Origin, repository: str, challenge: Challenge) -> list[str]:
        scope = challenge.params.get("scope")
        # Another host names its repositories its own way; a ping has none.
        if repository and (origin == self._origin or not scope):
            return [f"repository:{repository}:pull"]
        return scope.split(" ") if scope else []

    async def _authorization(self, origin: Origin, state: _Attempt) -> str | None:
        """The Authorization value to send to ``origin`` up front, if any is known."""
        challenge = self._challenges.get(origin)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if origin != self._origin:
                return None
            basic = await self._credentials.authorization()
            return basic.reveal() if basic is not None else None
        key = token_key(challenge, self._scopes(origin, state.repository, challenge))
        credentials = await self._token_credentials(origin, key[0])

        async def fetch() -> BearerToken:
            try:
                return await fetch_token(self._get_session(), key, registry=self.name,
                                         credentials=credentials, now=self._tokens.clock)
            except Denied:
                UPSTREAM_ERRORS.labels(self.name, "denied").inc()
                raise

        token = await self._tokens.get(key, fetch)
        state.tokens_sent[origin] = (key, token)
        return token.authorization()

    async def _token_credentials(self, origin: Origin, realm: str) -> Secret | None:
        """Our Basic credentials for a token realm: only for our own upstream's
        challenges, and never in clear text to an http realm of an https upstream."""
        if origin != self._origin or not len(self._credentials):
            return None
        if URL(realm).scheme != "https" and self._origin[0] == "https":
            return None
        return await self._credentials.authorization()
