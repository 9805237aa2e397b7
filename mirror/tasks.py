"""One owner for background work: named tasks, loops restarted with backoff, one shutdown.

Every background task of a node (fills, uploads, reconcile, eviction, and the
loops that come later: sync, peer health) is started through a
:class:`TaskGroup`, so shutdown has one policy: stop accepting work, give what
runs a deadline, cancel the rest, and await everything. A loop that raises is
restarted with growing backoff and counted (``mirror_task_restarts_total``),
never silently gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from mirror import metrics

log = structlog.get_logger(__name__)

T = TypeVar("T")
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0


class TaskGroup:
    """Owns tasks: requests and callers only ever wait on them, never cancel them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, T], name: str = "") -> asyncio.Task[T]:
        """Run ``work`` as a task of this group."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        if name:
            task.set_name(f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def loop(self, name: str, body: Callable[[], Awaitable[None]],
             backoff_max: float = BACKOFF_MAX) -> asyncio.Task[None]:
        """Run ``body`` until it returns; restart it with backoff when it raises."""
        return self.spawn(self._supervise(name, body, backoff_max), name)

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]],
                         backoff_max: float) -> None:
        delay = BACKOFF_FIRST
        while not self._closing:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.TASK_RESTARTS.labels(name).inc()
                log.error("task_failed", task=name, error=f"{type(exc).__name__}: {exc}"[:300],
                          restart_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, backoff_max)

    async def wait(self) -> None:
        """Wait for the tasks running now (their errors are theirs: not raised here)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, grace: float = 0.0) -> None:
        """Give running tasks ``grace`` seconds, then cancel what is left and await it."""
        self._closing = True
        tasks = list(self._tasks)
        if not tasks:
            return
        pending: set[asyncio.Task[Any]] = set(tasks)
        if grace > 0:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
