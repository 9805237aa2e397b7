"""What the status page remembers: per-minute samples of the counters, and the last problems.

::

    every minute:  Totals (hits, requests, served, downloaded, upstream errors), read
                   through the page's one figure source -> a ring of 61 samples
    page render:   consecutive samples -> one Minute each (+ the minute under way)
    middleware:    an answer >= 400 (but 404) -> Incidents, a ring of the last 15
    every 2 s:     this worker's start and problems -> <storage>/status/w<i>.json, which
                   the page merges: whichever worker answers, it shows the node's

All of it is small and bounded; the files are written and read in a thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from mirror.worker import alive

#: Minutes of history the charts show.
MINUTES = 60
#: Problems the page lists.
INCIDENTS = 15


@dataclass(frozen=True)
class Totals:
    """Counter totals at one moment (they only grow, except across a restart)."""

    at: float
    hits: float
    requests: float
    served: float
    downloaded: float
    upstream_errors: float


@dataclass(frozen=True)
class Minute:
    """What happened between two samples."""

    at: float  # end of the interval
    hit_ratio: float | None  # None when no request came
    served: float
    downloaded: float
    upstream_errors: float


class History:
    """A ring buffer of per-minute :class:`Totals`.

    Args:
        read: returns the totals now (the page's figure source, so that node-wide
            figures give node-wide charts).
        minutes: how many intervals to keep.
        clock: wall-clock seconds.
    """

    def __init__(self, read: Callable[[float], Totals], minutes: int = MINUTES,
                 clock: Callable[[], float] = time.time) -> None:
        self._read = read
        self._clock = clock
        self._samples: deque[Totals] = deque(maxlen=minutes + 1)
        self.started = clock()

    def sample(self, at: float | None = None) -> None:
        """Take one sample (stamped ``at``, default now)."""
        self._samples.append(self._read(self._clock() if at is None else at))

    def minutes(self) -> list[Minute]:
        """One :class:`Minute` per pair of samples, oldest first, then the one under way."""
        points = list(self._samples)
        if points:
            points.append(self._read(self._clock()))
        return [_between(a, b) for a, b in itertools.pairwise(points)]

    async def run(self, every: float = 60.0) -> None:
        """Sample every ``every`` seconds until cancelled (the first one at once)."""
        while True:
            self.sample()
            await asyncio.sleep(every)


def _between(before: Totals, after: Totals) -> Minute:
    # A counter that went down was reset (a worker restarted): count from zero.
    def grew(name: str) -> float:
        old: float = getattr(before, name)
        new: float = getattr(after, name)
        return new - old if new >= old else new

    requests, hits = grew("requests"), grew("hits")
    return Minute(at=after.at, hit_ratio=min(hits / requests, 1.0) if requests else None,
                  served=grew("served"), downloaded=grew("downloaded"),
                  upstream_errors=grew("upstream_errors"))


@dataclass(frozen=True)
class Incident:
    """One answer that was an error or a refusal."""

    at: float
    status: int
    method: str
    path: str
    error: str
    client: str


class Incidents:
    """The last answers with a status of 400 or more, except 404 (clients probe for tags
    and signatures that do not exist; that is not a problem)."""

    def __init__(self, keep: int = INCIDENTS, clock: Callable[[], float] = time.time) -> None:
        self._items: deque[Incident] = deque(maxlen=keep)
        self._clock = clock
        self.changes = 0  # grows with every problem remembered (a cheap "dirty" mark)

    def record(self, status: int, method: str, path: str, error: str, client: str) -> None:
        """Remember one answer if it was a problem."""
        if status < 400 or status == 404:
            return
        self._items.append(Incident(self._clock(), status, method, path[:200], error[:300],
                                    client))
        self.changes += 1

    def latest(self) -> list[Incident]:
        """Newest first."""
        return list(reversed(self._items))


@dataclass(frozen=True)
class NodeView:
    """What every worker of the node wrote: when the oldest living one started, and the
    last problems of all of them (a restarted worker's included), newest first."""

    started: float
    incidents: list[Incident]


class SharedIncidents:
    """Each worker's start time and problems in ``<storage>/status/w<i>.json`` (temp file +
    rename), so that the page any worker answers shows the node's.

    Args:
        folder: the storage folder's ``status`` folder.
        index: this worker's index.
    """

    def __init__(self, folder: Path, index: int, started: float) -> None:
        self.folder = folder
        self.path = folder / f"w{index}.json"
        self.started = started

    def write(self, incidents: list[Incident]) -> None:
        """Save this worker's part (blocks: run it in a thread)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        document = {"pid": os.getpid(), "started": self.started,
                    "incidents": [asdict(i) for i in incidents]}
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(document))
        os.replace(temp, self.path)

    def read(self, own: list[Incident], keep: int = INCIDENTS) -> NodeView:
        """This worker's problems (``own``, fresh from memory) and every other worker's,
        merged (blocks: run it in a thread). A file that cannot be read is skipped: the
        page shows what it can."""
        started: list[float] = [self.started]
        found: list[Incident] = list(own)
        for path in sorted(self.folder.glob("w*.json")):
            if path == self.path:
                continue
            try:
                document = json.loads(path.read_text())
                if alive(int(document["pid"])):
                    started.append(float(document["started"]))
                found.extend(Incident(**item) for item in document["incidents"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        found.sort(key=lambda i: i.at, reverse=True)
        return NodeView(min(started, default=self.started), found[:keep])

    async def run(self, incidents: Incidents, every: float = 2.0) -> None:
        """Save at once, then whenever problems were added (checked every ``every`` s)."""
        seen = -1
        while True:
            if incidents.changes != seen:
                seen = incidents.changes
                try:
                    await asyncio.to_thread(self.write, incidents.latest())
                except OSError:  # a full disk: the page shows this worker's own meanwhile
                    seen = -1
            await asyncio.sleep(every)


#: The page's history and problem log, on the app (set by the status page's cleanup_ctx).
HISTORY = web.AppKey("history", History)
INCIDENT_LOG = web.AppKey("incidents", Incidents)
SHARED = web.AppKey("shared_incidents", SharedIncidents)
