"""Worker processes: ``server.workers: N`` processes on one port, sharing one storage folder.

::

    mirror serve (the launcher, mirror.launch: checks, locks the storage folder, binds)
      empties storage/tmp, creates the index once (WAL mode) before any worker opens it,
        writes the pid file, then execs ``python -m mirror.server.workers`` (same pid)
      supervisor: no event loop, no storage of its own, only the standard library (about
        15 MiB resident; its few log lines are written here in structlog's formats);
        makes a private PROMETHEUS_MULTIPROC_DIR
      one listening socket on ``listen`` (and one on admin.listen), bound once, without
        SO_REUSEPORT, and passed to every ``python -m mirror serve ...`` (MIRROR_WORKER=i)
      a worker that exits unexpectedly is restarted (the same sockets, same index i), its
        dead process's live gauges dropped; its own tmp/w<i>/ is emptied when it starts
      SIGTERM/SIGINT: passed on to every worker, then waited for; SIGHUP: passed on

Every worker accepts on the same socket: a connection waits in the one kernel queue until
a live worker takes it, so a worker's death costs only the requests it was serving, and a
second mirror on the port fails to bind ("port in use", exit 2). Each worker runs a
whole node on the same storage folder (the SQLite index is in WAL mode with a busy
timeout); worker 0 alone runs the eviction loop; one download per digest per node is
held by a claim on the digest (:mod:`mirror.fetch.claim`); /metrics of any worker sums
every worker (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from mirror.worker import ENV_COUNT, ENV_FDS, ENV_INDEX

ENV_METRICS = "PROMETHEUS_MULTIPROC_DIR"
#: The supervisor's plan, as JSON, in the environment of ``python -m mirror.server.workers``.
ENV_PLAN = "MIRROR_SUPERVISOR_PLAN"
#: libuv (uvloop) accepts one connection per wake-up and yields, so that every worker
#: sharing the socket gets its share, not the first one woken (it would take all queued).
UV_SINGLE_ACCEPT = "UV_TCP_SINGLE_ACCEPT"
#: A worker that dies this soon after its start is restarted after a growing pause.
QUICK_DEATH = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass
class Plan:
    """What the supervisor needs, decided by the launcher from the settings."""

    count: int  # worker processes
    argv: list[str]  # the ``mirror`` arguments of a worker (``serve --config ...``)
    fds: list[int]  # listening sockets: ``listen``, then ``admin.listen``
    keep_fds: list[int] = field(default_factory=list)  # held by every worker (the lock)
    listen: str = ""
    shutdown_grace: float = 10.0
    log_level: str = "info"
    log_json: bool = True
    pid_file: str = ""  # removed at a clean stop


def exec_supervisor(plan: Plan) -> None:
    """Replace this process (same pid: the pid file stays true) with the supervisor."""
    for fd in (*plan.fds, *plan.keep_fds):
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, ENV_PLAN: json.dumps(asdict(plan))}
    os.execve(sys.executable, [sys.executable, "-m", "mirror.server.workers"], env)


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    quick_deaths: int = 0


class Supervisor:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.count = plan.count
        self.children: dict[int, _Child] = {}
        self.metrics_dir = ""
        self._stopping = False
        self._log = _Log(plan.log_level, plan.log_json)

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit status."""
        self.metrics_dir = tempfile.mkdtemp(prefix="mirror-metrics-")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        try:
            for index in range(self.count):
                self._spawn(index)
            self._log.info("workers_started", workers=self.count, pids=self.pids(),
                           supervisor=os.getpid(), listen=self.plan.listen)
            while not self._stopping:
                self._reap()
                time.sleep(0.2)
            return self._shutdown()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The worker processes' ids, by index."""
        return [self.children[i].process.pid for i in sorted(self.children)]

    def _spawn(self, index: int, quick_deaths: int = 0) -> None:
        env = {UV_SINGLE_ACCEPT: "1", **os.environ, ENV_INDEX: str(index),
               ENV_COUNT: str(self.count), ENV_FDS: ",".join(map(str, self.plan.fds)),
               ENV_METRICS: self.metrics_dir}
        env.pop(ENV_PLAN, None)
        process = subprocess.Popen([sys.executable, "-m", "mirror", *self.plan.argv], env=env,
                                   pass_fds=[*self.plan.fds, *self.plan.keep_fds],
                                   # the supervisor runs no threads: preexec_fn is safe
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.children[index] = _Child(index, process, time.monotonic(), quick_deaths)

    def _reap(self) -> None:
        for index, child in list(self.children.items()):
            code = child.process.poll()
            if code is None or self._stopping:
                continue
            _mark_dead(child.process.pid, self.metrics_dir)
            quick = time.monotonic() - child.started < QUICK_DEATH
            deaths = child.quick_deaths + 1 if quick else 0
            self._log.warning("worker_died", worker=index, pid=child.process.pid,
                              exit_code=code, restarts_soon=deaths)
            if deaths:
                time.sleep(min(0.25 * 2 ** deaths, 10.0))  # a worker that cannot start
            if not self._stopping:
                self._spawn(index, deaths)
                self._log.info("worker_restarted", worker=index,
                               pid=self.children[index].process.pid)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signum)

    def _shutdown(self) -> int:
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.plan.shutdown_grace + 15
        for child in self.children.values():
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self._log.info("workers_stopped", workers=self.count)
        return 0


class _Log:
    """The supervisor's few log lines, in the formats :mod:`mirror.log` configures
    structlog with (JSON lines, or its console rendering): structlog itself would import
    asyncio and double the supervisor's resident size."""

    _LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

    def __init__(self, level: str, as_json: bool) -> None:
        self.level = self._LEVELS.get(level, 20)
        self.as_json = as_json

    def info(self, event: str, **values: object) -> None:
        self._write("info", event, values)

    def warning(self, event: str, **values: object) -> None:
        self._write("warning", event, values)

    def _write(self, level: str, event: str, values: dict[str, object]) -> None:
        if self._LEVELS[level] < self.level:
            return
        now = datetime.now(UTC)
        if self.as_json:
            stamp = now.isoformat().replace("+00:00", "Z")
            line = json.dumps({**values, "event": event, "level": level,
                               "timestamp": stamp}, separators=(",", ":"), default=str)
        else:
            pairs = " ".join(f"{k}={v}" for k, v in sorted(values.items()))
            line = f"{now:%Y-%m-%d %H:%M:%S} [{level:<9}] {event:<30} {pairs}"
        os.write(sys.stderr.fileno(), (line + "\n").encode())  # one write: workers share it


def _die_with_parent() -> None:
    """In the child before exec: a SIGTERM when the supervisor dies (no orphan workers)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _mark_dead(pid: int, folder: str) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums): what
    prometheus-client's ``multiprocess.mark_process_dead`` does, without importing it."""
    for path in Path(folder).glob(f"gauge_live*_{pid}.db"):
        with contextlib.suppress(OSError):
            path.unlink()


def main() -> int:
    """``python -m mirror.server.workers``: the supervisor, exec'd by the launcher."""
    plan = Plan(**json.loads(os.environ[ENV_PLAN]))
    try:
        return Supervisor(plan).run()
    finally:
        if plan.pid_file:
            with contextlib.suppress(OSError):
                if Path(plan.pid_file).read_text().strip() == str(os.getpid()):
                    Path(plan.pid_file).unlink()


if __name__ == "__main__":
    sys.exit(main())
