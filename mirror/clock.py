"""Time, injected: every TTL, hold-off and schedule reads a :class:`Clock`.

The node builds one :data:`SYSTEM` clock and hands it down; tests hand a
:class:`ManualClock` instead and move time forward without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Two readings of time: monotonic for intervals, wall for records that outlive us."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, TTLs in memory)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (timestamps stored on disk)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self._now += seconds


SYSTEM = SystemClock()
