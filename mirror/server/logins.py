"""Password checks that a flood of wrong logins cannot turn against everyone else.

bcrypt is slow on purpose (about 60 ms a check at cost 10, two threads), so a client
sending wrong passwords as fast as it can would hold both threads and queue every
other login behind it. Three things keep it to itself:

- :class:`FailureLimits`: failed checks are counted per source address and per user
  name over ``auth.limits.window``; checks under way count too, so 300 requests sent
  at once cannot all get in before the first one fails. Past the limit the answer is
  429 with ``Retry-After`` and no bcrypt at all.
- :class:`BcryptQueue`: at most ``auth.limits.queue`` checks wait for the threads;
  one more gets 503 with ``Retry-After`` at once instead of waiting behind them.
- The caller (:class:`mirror.server.auth.Authenticator`) remembers failed
  (user, password) pairs by their SHA-256, so repeating a wrong password costs no
  bcrypt and no count (a misconfigured client retrying does not lock its address).

Counts are per worker process: with ``server.workers: N`` a source gets up to N times
the limit, still a fixed number of checks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from cachetools import TTLCache

from mirror import metrics
from mirror.config import LoginLimits
from mirror.errors import OciError, TooManyRequests

log = structlog.get_logger(__name__)
T = TypeVar("T")
_KEYS_MAX = 100_000  # addresses and users tracked at once (a bounded table)


class LoginsBusy(OciError):
    """503: too many password checks are waiting already; try again in a moment."""

    code = "UNAVAILABLE"
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class FailureLimits:
    """Failed password checks per source address and per user, over a sliding window."""

    def __init__(self, limits: LoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._failures: TTLCache[str, deque[float]] = TTLCache(
            maxsize=_KEYS_MAX, ttl=limits.window, timer=clock)
        self._pending: Counter[str] = Counter()

    def _keys(self, address: str, user: str) -> tuple[tuple[str, int], tuple[str, int]]:
        return (f"address:{address}", self.limits.per_address), (f"user:{user}",
                                                                  self.limits.per_user)

    def admit(self, address: str, user: str) -> None:
        """Reserve a check for ``user`` from ``address``; call :meth:`done` after it.

        Raises:
            TooManyRequests: the address or the user is at its limit of failures.
        """
        now = self.clock()
        for key, limit in self._keys(address, user):
            recent = self._recent(key, now)
            if len(recent) + self._pending[key] >= limit:
                scope = key.partition(":")[0]
                metrics.child(metrics.AUTH_FAILURES, "throttled").inc()
                wait = recent[0] + self.limits.window - now if recent else 1.0
                raise TooManyRequests(f"too many failed logins from this {scope}; "
                                      f"try again in {max(1, round(wait))}s", retry_after=wait)
        for key, _ in self._keys(address, user):
            self._pending[key] += 1

    def done(self, address: str, user: str, *, failed: bool) -> None:
        """End a check begun with :meth:`admit`; count it if the password was wrong."""
        now = self.clock()
        for key, limit in self._keys(address, user):
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]
            if not failed:
                continue
            recent = self._recent(key, now)
            recent.append(now)
            self._failures[key] = recent  # renews the entry's time to live
            if len(recent) == limit:
                scope, _, name = key.partition(":")
                log.warning("login_limit_reached", scope=scope, name=name[:200],
                            failures=limit, window_s=self.limits.window)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key) or deque()
        while times and times[0] <= now - self.limits.window:
            times.popleft()
        return times


class BcryptQueue:
    """Runs blocking checks in threads, ``slots`` at a time, with a bounded wait line."""

    def __init__(self, slots: int, queue: int) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._queue = queue
        self._waiting = 0

    async def run(self, check: Callable[[], T]) -> T:
        """``check()`` in a thread once a slot is free.

        Raises:
            LoginsBusy: ``queue`` checks are waiting already.
        """
        if self._waiting >= self._queue:
            metrics.child(metrics.AUTH_FAILURES, "busy").inc()
            raise LoginsBusy("too many logins are being checked; try again in a second")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await _in_thread(check)
        finally:
            self._slots.release()


def _in_thread(check: Callable[[], T]) -> Awaitable[T]:
    return asyncio.to_thread(check)
