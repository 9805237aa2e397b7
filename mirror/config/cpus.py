"""How many CPUs this process may use: what ``server.workers: auto`` starts.

Not the host's cores (``os.cpu_count``): a container limited to 2 CPUs on a 64-core node
must not start 64 workers. The count is the smallest of

- the CPUs the scheduler lets this process run on (``os.sched_getaffinity``: cpusets,
  ``taskset``, Kubernetes' static CPU manager);
- the cgroup's CPU quota, rounded up: cgroup v2 ``cpu.max`` (``"200000 100000"`` is 2
  CPUs, ``"max 100000"`` no limit), or cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us`` (a quota of -1 is no limit);

and at least 1. The cgroup is the one ``/proc/self/cgroup`` names (its v2 line ``0::/path``
or its v1 ``cpu`` controller), looked up under ``/sys/fs/cgroup``; a missing or
unreadable file is no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The CPUs this process may use (at least 1).

    Args:
        root: where the cgroup filesystems are mounted (a fake tree in tests).
        self_cgroup: this process's cgroup list (``/proc/self/cgroup``).
    """
    count = _affinity()
    quota = cgroup_quota(root, self_cgroup)
    if quota is not None:
        count = min(count, max(math.ceil(quota), 1))
    return max(count, 1)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (``1.5`` for 150 ms per 100 ms), or None: no limit.

    Every cgroup from this process's own up to the root is read: a parent's limit holds
    for its children too, and a container often sees only its own as the root.
    """
    v2, v1 = _cgroup_paths(self_cgroup)
    limits: list[float] = []
    if v2 is not None:
        for folder in _up_to(root, v2):
            limits += _v2_quota(folder / "cpu.max")
    if v1 is not None:
        for base in (root / "cpu,cpuacct", root / "cpu"):
            for folder in _up_to(base, v1):
                limits += _v1_quota(folder)
    return min(limits) if limits else None


def _cgroup_paths(self_cgroup: Path) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 ``cpu`` controller's path) of this process, if any."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return "/", None  # no /proc: the root's own limit, if one is mounted
    v2 = v1 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _up_to(base: Path, path: str) -> list[Path]:
    """``base/path`` and each of its parents up to ``base``."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> list[float]:
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return []
    if len(fields) != 2 or fields[0] == "max":
        return []
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _v1_quota(folder: Path) -> list[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []
