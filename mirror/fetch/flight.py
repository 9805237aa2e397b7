"""Single flight: one task per key, its result shared by every caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mirror.tasks import TaskGroup

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Runs one task per key; concurrent callers share its result.

    The task belongs to this object: a caller that is cancelled stops waiting
    but never cancels the work others wait on.
    """

    def __init__(self, name: str = "flight") -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self._group = TaskGroup(name)

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
            task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        return await asyncio.shield(task), joined

    async def close(self) -> None:
        """Cancel and await everything under way (at shutdown)."""
        await self._group.close()


async def _call(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
