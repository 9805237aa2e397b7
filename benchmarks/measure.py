"""What the benchmark reads beside the clients: memory from /proc, upstream traffic
from the upstream's access log, and medians and percentiles."""

from __future__ import annotations

import math
import re
import statistics
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.support.registry import AccessEntry, Registry

_KB = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx workers, for instance)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = dict(_KB.findall(text))
    return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


class RssSampler:
    """Samples VmRSS (summed over a process tree) and VmHWM every ``interval`` s.

    Use as a context manager around the work to watch; ``peak_mib`` is the
    highest summed RSS seen, ``hwm_mib`` the highest per-process high-water
    mark, summed over the tree at the end.
    """

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        if self.pid is None:
            return
        total = 0
        for pid in process_tree(self.pid):
            rss, hwm = _memory_kib(pid)
            total += rss
            self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), hwm)
        self.peak_kib = max(self.peak_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    @property
    def peak_mib(self) -> float:
        """Highest summed VmRSS seen, MiB."""
        return self.peak_kib / 1024

    @property
    def process_max_mib(self) -> float:
        """The largest VmHWM of one process of the tree, MiB (one worker's peak)."""
        return max(self.hwm_kib.values(), default=0) / 1024

    @property
    def hwm_mib(self) -> float:
        """Sum of the processes' VmHWM, MiB (the kernel's own peak, between samples too)."""
        return sum(self.hwm_kib.values()) / 1024


@dataclass(frozen=True)
class UpstreamTraffic:
    """Requests and body bytes the upstream served in a window."""

    requests: int
    blob_requests: int
    manifest_requests: int
    bytes: int

    @classmethod
    def of(cls, entries: Iterable[AccessEntry]) -> UpstreamTraffic:
        """Sum access-log entries (token-less 401s included: they are requests)."""
        items = [e for e in entries if e.path.startswith("/v2/") and e.path != "/v2/"]
        return cls(len(items), sum("/blobs/" in e.path for e in items),
                   sum("/manifests/" in e.path for e in items),
                   sum(e.bytes for e in items if e.method == "GET"))


class UpstreamMeter:
    """Counts what the upstream served between ``__enter__`` and ``__exit__``."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.traffic = UpstreamTraffic(0, 0, 0, 0)
        self._mark = 0

    def __enter__(self) -> UpstreamMeter:
        self._mark = self.registry.clear_log_mark()
        return self

    def __exit__(self, *exc: object) -> None:
        self.traffic = UpstreamTraffic.of(self.registry.requests_since(self._mark))


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Iterable[float]) -> float:
    """The median, NaN for no values."""
    items = [v for v in values if not math.isnan(v)]
    return statistics.median(items) if items else float("nan")
