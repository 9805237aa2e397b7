"""What stands between the mirror and one upstream: a request budget, a circuit
breaker, and what the upstream says about its own rate limits.

Every attempt of :meth:`mirror.upstream.client.UpstreamClient.request` passes
:meth:`UpstreamGuard.admit` first and reports how it went with
:meth:`UpstreamGuard.settle`:

::

    admit(background)
      ├── breaker open (cool-down running)   -> fail fast: UpstreamUnavailable,
      │                                         or TooManyRequests if 429s opened it
      ├── budget: background waits for a token; a client request takes one, or
      │   one of the client overdraft, or fails fast with TooManyRequests
      └── breaker half-open: this attempt is the one probe; others fail fast
    settle(ticket, ok, request=, suspect=)
      ok=True   a final answer (any status but 5xx/429): closes a half-open breaker
      ok=False  connect error, timeout, 5xx or 429: N failed *requests* in a window
                open the breaker (the retries of one request count once)
      ok=None   no verdict (cancelled, unusable redirect): a probe slot is freed

Only failures that say the *registry* is unhealthy may open the breaker, never
one client's bad request: a 5xx (``suspect``) that would open it is first
checked by the client against upstream's ``/v2/``; if that answers, the 5xx
were about those requests (a name upstream chokes on) and are forgiven
(:meth:`UpstreamGuard.forgive`), so anonymous clients cannot shut a registry
off for everyone.

Background work reaches upstream with ``background=True`` on each request (an
:class:`~mirror.sources.upstream.UpstreamSource` built with ``background=True``
sends every request so).

Failing fast raises the errors the cache already handles: a tag with a cached
digest is then served stale (cache/manifests.py), so an outage or a 429 storm
costs clients nothing they have seen before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import NoReturn

import structlog

from mirror import metrics
from mirror.config import BreakerSettings, BudgetSettings, UpstreamSettings
from mirror.errors import TooManyRequests, UpstreamUnavailable
from mirror.oci import is_number

log = structlog.get_logger(__name__)

DEFAULT_RETRY_AFTER = 60.0
"""``Retry-After`` sent to clients when upstream's 429 carried none."""

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

Clock = Callable[[], float]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_ratelimit(value: str | None) -> tuple[int, int | None] | None:
    """``(count, window seconds)`` from a Docker Hub header like ``100;w=21600``.

    A bare number (the IETF draft's form) has no window. Anything else is ``None``.
    """
    if not value:
        return None
    head, *params = value.split(";")
    if not is_number(head.strip()):
        return None
    count = int(head.strip())
    window = None
    for param in params:
        name, _, raw = param.strip().partition("=")
        if name.strip().lower() == "w" and is_number(raw.strip()):
            window = int(raw.strip())
    return (count, window) if count >= 0 else None


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``capacity``."""

    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._at = clock()

    def level(self) -> float:
        """Tokens available now."""
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def take(self) -> bool:
        """Take one token if a whole one is there."""
        if self.level() >= 1:
            self._level -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until a whole token is there."""
        return max(0.0, (1.0 - self.level()) / self.rate)


class Budget:
    """The request budget of one upstream (``upstreams[].budget``).

    Two buckets: the budget (``rate``, ``burst``), and the clients' overdraft
    (``client_overdraft`` times both). Background work takes from the budget
    only and waits for it. Client requests take from the budget when it has a
    token, else from the overdraft; when both are empty they fail fast with
    TOOMANYREQUESTS rather than wait, because the cache can then answer a
    known tag stale at once. So clients never queue behind background work,
    and upstream sees at most ``(1 + client_overdraft) * rate``, the extra
    share from clients only.
    """

    def __init__(self, registry: str, settings: BudgetSettings, clock: Clock) -> None:
        self._registry = registry
        self._bucket = TokenBucket(settings.rate, float(settings.burst), clock)
        share = settings.client_overdraft
        self._overdraft = TokenBucket(settings.rate * share, max(1.0, settings.burst * share),
                                      clock) if share > 0 else None
        self._queue = asyncio.Lock()

    def left(self) -> tuple[float, float]:
        """Requests the budget has now, and its burst (for the status page)."""
        return self._bucket.level(), self._bucket.capacity

    async def acquire(self, *, background: bool, cap: float) -> None:
        """Spend one token for one upstream request.

        Args:
            background: wait for a budget token; never use the overdraft.
            cap: the longest ``Retry-After`` to give a refused client.

        Raises:
            TooManyRequests: a client request found the budget and the client
                overdraft empty.
        """
        if not background:
            self._client(cap)
            return
        if self._bucket.take():
            return
        metrics.child(metrics.BUDGET_WAITS, self._registry).inc()
        async with self._queue:  # background requests are served in arrival order
            while not self._bucket.take():
                await self._refill()

    async def _refill(self) -> None:
        """Sleep until the budget should hold a token (a client may take it first)."""
        await asyncio.sleep(max(self._bucket.wait(), 0.001))

    def _client(self, cap: float) -> None:
        if self._bucket.take():
            return
        if self._overdraft is not None and self._overdraft.take():
            metrics.child(metrics.BUDGET_OVERDRAFTS, self._registry).inc()
            return
        metrics.child(metrics.BUDGET_REFUSALS, self._registry).inc()
        waits = [b.wait() for b in (self._bucket, self._overdraft) if b is not None]
        raise TooManyRequests(f"{self._registry}: the mirror's request budget for this "
                              "registry is spent", max(1.0, math.ceil(min(*waits, cap))))


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted attempt; ``probe`` if it is the half-open breaker's one probe."""

    probe: bool


class Breaker:
    """Circuit breaker of one upstream (``upstreams[].breaker``).

    Args:
        registry: the upstream's name, for metrics and logs.
        settings: failures, window and cool-down.
        clock: monotonic clock.
        max_wait: the longest an upstream ``Retry-After`` may stretch the
            cool-down, and the longest ``Retry-After`` given to clients.
    """

    def __init__(self, registry: str, settings: BreakerSettings, clock: Clock,
                 max_wait: float = 3600.0) -> None:
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self._max_wait = max_wait
        self.state = CLOSED
        # (when, the request it belongs to, a 5xx that may be about that request only)
        self._failures: deque[tuple[float, object, bool]] = deque()
        self._opened_at = 0.0
        self._cool_down = settings.cool_down
        self._probing = False
        self._rate_limited = False
        self._retry_after: float | None = None
        metrics.BREAKER_STATE.labels(registry).set(0)

    def check(self) -> None:
        """Fail fast if :meth:`enter` would, without taking a probe slot."""
        remaining = self._opened_at + self._cool_down - self._clock()
        if (self.state == OPEN and remaining > 0) or (self.state == HALF_OPEN and self._probing):
            self._refuse(remaining)

    def enter(self) -> Ticket:
        """Let an attempt through, or fail fast.

        Raises:
            TooManyRequests: open (or probing) after upstream 429s.
            UpstreamUnavailable: open (or probing) after connection errors,
                timeouts or 5xx.
        """
        if self.state == CLOSED:
            return Ticket(probe=False)
        remaining = self._opened_at + self._cool_down - self._clock()
        if self.state == OPEN and remaining <= 0:
            self._move(HALF_OPEN)
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return Ticket(probe=True)
        self._refuse(remaining)

    def _refuse(self, remaining: float) -> NoReturn:
        wait = float(min(max(1, math.ceil(remaining)), max(1, math.ceil(self._max_wait))))
        if self._rate_limited:
            raise TooManyRequests(f"{self._registry}: upstream is rate-limiting the mirror; "
                                  "not asking again yet", wait)
        raise UpstreamUnavailable(f"{self._registry}: upstream is failing; not asking again "
                                  f"for {wait:.0f}s (circuit open)", status=503, retry_after=wait)

    def settle(self, ticket: Ticket, ok: bool | None, *, rate_limited: bool = False,
               retry_after: float | None = None, request: object = None,
               suspect: bool = False) -> None:
        """Record how an admitted attempt ended (see the module docstring).

        Args:
            ticket: from :meth:`enter`.
            ok: the verdict.
            rate_limited: the failure was a 429.
            retry_after: upstream's ``Retry-After`` with it.
            request: the request the attempt belongs to (its retries share it);
                ``None``: an attempt of its own.
            suspect: a 5xx, which :meth:`forgive` may take back.
        """
        if ticket.probe:
            self._probing = False
        if ok is None:
            return
        if ok:
            self._failures.clear()
            if self.state != CLOSED:
                self._move(CLOSED)
            return
        self._rate_limited = rate_limited
        self._retry_after = retry_after
        if ticket.probe or self.state == HALF_OPEN:
            self._open(reason="probe failed")
            return
        now = self._clock()
        self._failures.append((now, object() if request is None else request, suspect))
        count = self._failed_requests(now)
        if self.state == CLOSED and count >= self._settings.failures > 0:
            self._open(reason=f"{count} failed requests in a row")

    def would_open(self, request: object) -> bool:
        """Whether one more failure of ``request`` would open the breaker."""
        if self.state != CLOSED or self._settings.failures <= 0:
            return False
        self._failed_requests(self._clock())  # forget what fell out of the window
        counted = {key for _, key, _ in self._failures} | {request}
        return len(counted) >= self._settings.failures

    def forgive(self) -> None:
        """Forget the 5xx failures: upstream is up, they were about their requests."""
        self._failures = deque(f for f in self._failures if not f[2])

    def _failed_requests(self, now: float) -> int:
        while self._failures and self._failures[0][0] < now - self._settings.window:
            self._failures.popleft()
        return len({key for _, key, _ in self._failures})

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        # Asking again before upstream's own Retry-After has passed only earns another 429.
        stretch = min(self._retry_after or 0.0, self._max_wait)
        self._cool_down = max(self._settings.cool_down, stretch)
        self._failures.clear()
        self._move(OPEN, reason=reason, cool_down=round(self._cool_down, 3),
                   cause="rate_limited" if self._rate_limited else "unavailable")

    def _move(self, state: str, **fields: object) -> None:
        previous, self.state = self.state, state
        metrics.BREAKER_STATE.labels(self._registry).set(_STATE_VALUES[state])
        metrics.BREAKER_TRANSITIONS.labels(self._registry, state).inc()
        level = log.warning if state == OPEN else log.info
        level(f"upstream_breaker_{state}", registry=self._registry, previous=previous, **fields)


class UpstreamGuard:
    """Budget, breaker and rate-limit headers of one upstream.

    Args:
        settings: the upstream's settings (``budget``, ``breaker``,
            ``max_client_retry_after``).
        clock: monotonic clock (tests pass a fake one).
    """

    def __init__(self, settings: UpstreamSettings, clock: Clock = time.monotonic) -> None:
        self._settings = settings
        self.breaker = Breaker(settings.name, settings.breaker, clock,
                               settings.max_client_retry_after)
        self.budget = Budget(settings.name, settings.budget, clock) if settings.budget else None
        self._ratelimits: dict[str, tuple[int | None, int | None]] = {}

    @property
    def failing_fast(self) -> bool:
        """Whether the breaker is open: a retry now would only be refused."""
        return self.breaker.state == OPEN

    async def admit(self, *, background: bool) -> Ticket:
        """Let one attempt through, waiting on the budget for background work.

        Raises:
            TooManyRequests: the budget is spent (client requests), or the
                breaker is open after 429s.
            UpstreamUnavailable: the breaker is open.
        """
        self.breaker.check()  # fail fast before spending budget
        if self.budget is not None:
            await self.budget.acquire(background=background,
                                      cap=self._settings.max_client_retry_after)
        return self.breaker.enter()

    def settle(self, ticket: Ticket, ok: bool | None, *, rate_limited: bool = False,
               retry_after: float | None = None, request: object = None,
               suspect: bool = False) -> None:
        """Report the outcome of an admitted attempt to the breaker (see :meth:`Breaker.settle`)."""
        self.breaker.settle(ticket, ok, rate_limited=rate_limited, retry_after=retry_after,
                            request=request, suspect=suspect)

    def would_open(self, request: object) -> bool:
        """Whether one more failure of ``request`` would open the breaker."""
        return self.breaker.would_open(request)

    def forgive(self) -> None:
        """Upstream's ``/v2/`` answers: the 5xx counted so far were about their requests."""
        self.breaker.forgive()

    def client_retry_after(self, upstream: float | None) -> float:
        """The ``Retry-After`` to give clients: upstream's, or a default, bounded."""
        wait = DEFAULT_RETRY_AFTER if upstream is None else upstream
        return float(min(max(1, math.ceil(wait)),
                         max(1, math.ceil(self._settings.max_client_retry_after))))

    def observe(self, headers: Mapping[str, str], credential: str) -> None:
        """Read Docker Hub's ``ratelimit-*`` headers off an upstream response.

        Args:
            headers: the response headers.
            credential: the label of the credential the request went out with,
                or ``anonymous``; never a secret.
        """
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        remaining = parse_ratelimit(headers.get("ratelimit-remaining"))
        if limit is None and remaining is None:
            return
        registry = self._settings.name
        if limit is not None:
            metrics.child(metrics.RATELIMIT_LIMIT, registry, credential).set(limit[0])
            window = limit[1]
            if window is not None:
                metrics.child(metrics.RATELIMIT_WINDOW, registry, credential).set(window)
        if remaining is not None:
            metrics.child(metrics.RATELIMIT_REMAINING, registry, credential).set(remaining[0])
        self._ratelimits[credential] = (limit[0] if limit else None,
                                        remaining[0] if remaining else None)

    def ratelimit_remaining(self, credential: str) -> int | None:
        """The last ``ratelimit-remaining`` upstream reported for a credential."""
        return self._ratelimits.get(credential, (None, None))[1]
