"""Single flight: one task per key, its result shared by every caller."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mirror.tasks import TaskGroup

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Runs one task per key; concurrent callers share its result.

    The task belongs to this object: a caller that is cancelled stops waiting
    but never cancels the work others wait on. With ``cancel_abandoned``, the
    work is cancelled when its last caller stops waiting (a client that left a
    manifest request must not keep an upstream connection busy); without it
    the work runs to its end (a fill others may join later).
    """

    def __init__(self, name: str = "flight", *, cancel_abandoned: bool = False) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self._group = TaskGroup(name)
        self._waiting: Counter[K] = Counter()
        self._cancel_abandoned = cancel_abandoned

    def in_flight(self, key: K) -> bool:
        """Whether work for ``key`` is under way."""
        return key in self._tasks

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Run ``work`` for ``key`` or join the run under way.

        Returns:
            The result, and whether this call joined another's run.
        """
        task = self._tasks.get(key)
        joined = task is not None
        if task is None:
            task = self._group.spawn(_call(work))
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        self._waiting[key] += 1
        try:
            return await asyncio.shield(task), joined
        finally:
            self._waiting[key] -= 1
            if self._waiting[key] <= 0:
                del self._waiting[key]
                if self._cancel_abandoned and not task.done():
                    self._done(key, task)  # a new caller starts afresh, never joins a cancel
                    task.cancel()

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    async def close(self) -> None:
        """Cancel and await everything under way (at shutdown)."""
        await self._group.close()


async def _call(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
