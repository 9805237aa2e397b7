"""What warming may spend, so that client traffic comes first.

Every upstream request warming makes already goes through the registry's
*background* budget (``background=True``: it waits for tokens and never takes the
clients' overdraft). On top of that:

- ``concurrency`` images and ``blob_concurrency`` blob fetches at once;
- ``bandwidth``: bytes per second over every warming download: each chunk a fill
  started by warming reads waits for the bucket, until a client joins that fill
  (then it runs at full speed: a client waits for it);
- a pause per registry after a 429, until its Retry-After;
- a floor under Docker Hub's ``ratelimit-remaining`` (read from the guard, which
  reads every response's headers): below it, nothing is fetched, tags are still
  checked (HEADs are free on Docker Hub and refresh the figure);
- off-peak windows (UTC) outside which the scheduled loop does not run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.config import SyncSettings
from mirror.upstream import UpstreamClient

RATE_LIMITED, FLOOR = "rate_limited", "ratelimit_floor"


class Bandwidth:
    """A byte rate shared by every warming download (real time: it paces real transfers).

    A chunk waits until the bucket holds its size (or a second's worth, for a chunk
    bigger than that), then takes it, leaving the bucket in debt if need be.
    """

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._level = float(rate or 0)
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def spend(self, size: int) -> None:
        """Wait until ``size`` bytes may go."""
        if not self.rate:
            return
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                self._level = min(float(self.rate), self._level + (now - self._at) * self.rate)
                self._at = now
                if self._level >= min(size, self.rate):
                    self._level -= size
                    return
                await asyncio.sleep((min(size, self.rate) - self._level) / self.rate)


class WarmBudget:
    """Caps and pauses shared by every warm of this node."""

    def __init__(self, settings: SyncSettings, clients: Mapping[str, UpstreamClient], *,
                 clock: Clock = SYSTEM) -> None:
        self.settings = settings
        self._clients = clients
        self._clock = clock
        self.images = asyncio.Semaphore(settings.concurrency)
        self.blobs = asyncio.Semaphore(settings.blob_concurrency)
        self.bandwidth = Bandwidth(settings.bandwidth)
        self._paused_until: dict[str, float] = {}

    def rate_limited(self, registry: str, retry_after: float | None) -> None:
        """Upstream answered 429: nothing more for this registry until Retry-After."""
        wait = retry_after if retry_after else self.settings.retry_after
        self._paused_until[registry] = max(self._paused_until.get(registry, 0.0),
                                           self._clock.monotonic() + wait)
        metrics.SYNC_PAUSED.labels(registry, RATE_LIMITED).set(1)

    def paused(self, registry: str) -> float:
        """Seconds left of a 429 pause (0: not paused)."""
        left = self._paused_until.get(registry, 0.0) - self._clock.monotonic()
        if left <= 0 and registry in self._paused_until:
            del self._paused_until[registry]
            metrics.SYNC_PAUSED.labels(registry, RATE_LIMITED).set(0)
        return max(0.0, left)

    def remaining(self, registry: str) -> int | None:
        """Upstream's last ``ratelimit-remaining`` for the credential in use."""
        client = self._clients.get(registry)
        if client is None:
            return None
        return client.guard.ratelimit_remaining(client.credential or "anonymous")

    def below_floor(self, registry: str) -> bool:
        """Whether fetching must wait: fewer pulls left upstream than the floor."""
        remaining = self.remaining(registry)
        low = remaining is not None and remaining < self.settings.ratelimit_floor
        metrics.SYNC_PAUSED.labels(registry, FLOOR).set(int(low))
        return low

    def blocked(self, registry: str) -> str | None:
        """Why fetching from a registry must wait now, or ``None``."""
        if self.paused(registry) > 0:
            return RATE_LIMITED
        if self.below_floor(registry):
            return FLOOR
        return None

    def as_json(self) -> dict[str, object]:
        """Pauses and remaining pulls per registry (status)."""
        return {name: {"paused_seconds": round(self.paused(name), 1),
                       "ratelimit_remaining": self.remaining(name)}
                for name in self._clients}
