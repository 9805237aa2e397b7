"""Worker processes: ``server.workers: N`` processes on one port, sharing one storage folder.

::

    mirror serve (supervisor: no event loop, no storage of its own)
      empties storage/tmp, makes a private PROMETHEUS_MULTIPROC_DIR
      per worker: a listening socket with SO_REUSEPORT on the same address (and one on
        admin.listen), passed to ``python -m mirror serve ...`` with MIRROR_WORKER=i
      a worker that exits unexpectedly is restarted (new sockets, same index i), its dead
        process's live gauges dropped; its own tmp/w<i>/ is emptied when it starts again
      SIGTERM/SIGINT: passed on to every worker, then waited for; SIGHUP: passed on

The kernel spreads new connections over the workers' sockets. Each worker runs a whole
node on the same storage folder (the SQLite index is in WAL mode with a busy timeout);
worker 0 alone runs the eviction loop; one download per digest per node is held by a
claim on the digest (:mod:`mirror.fetch.claim`); /metrics of any worker sums every worker
(prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import multiprocess

from mirror.config import Settings, checks
from mirror.worker import ENV_COUNT, ENV_FDS, ENV_INDEX

log = structlog.get_logger(__name__)

ENV_METRICS = "PROMETHEUS_MULTIPROC_DIR"
#: A worker that dies this soon after its start is restarted after a growing pause.
QUICK_DEATH = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    quick_deaths: int = 0


class Supervisor:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, settings: Settings, argv: Sequence[str],
                 bind: Callable[..., socket.socket] = checks.bind) -> None:
        """Args:
            settings: the validated settings (their ``server.workers`` is the count).
            argv: the ``mirror`` arguments a worker is started with (``serve --config ...``).
            bind: ``bind(host, port, reuse_port=True)`` makes a listening socket.
        """
        self.settings = settings
        self.argv = list(argv)
        self.count = settings.server.workers
        self.children: dict[int, _Child] = {}
        self.metrics_dir = ""
        self._bind = bind
        self._stopping = False
        self._addresses = [(settings.listen_host, settings.listen_port)]
        admin = settings.admin.listen if settings.admin is not None else None
        if admin is not None:
            self._addresses.append(admin)
        self._first: list[socket.socket] | None = None

    def bind_first(self) -> None:
        """Bind the first worker's sockets now: a port in use is an error before start."""
        self._first = self._sockets()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit status."""
        self._prepare_storage()
        self.metrics_dir = tempfile.mkdtemp(prefix="mirror-metrics-")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        try:
            for index in range(self.count):
                self._spawn(index)
            log.info("workers_started", workers=self.count, pids=self.pids(),
                     listen=f"{self.settings.listen_host}:{self.settings.listen_port}")
            while not self._stopping:
                self._reap()
                time.sleep(0.2)
            return self._shutdown()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The worker processes' ids, by index."""
        return [self.children[i].process.pid for i in sorted(self.children)]

    def _prepare_storage(self) -> None:
        """Empty ``tmp/`` once for the node: writes left by a crash of every process."""
        tmp = Path(self.settings.storage.path) / "tmp"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)

    def _sockets(self) -> list[socket.socket]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        sockets = []
        for index, (host, port) in enumerate(self._addresses):
            sock = self._bind(host, port, reuse_port=True)
            if port == 0:  # every worker on the port the first one got
                self._addresses[index] = (host, sock.getsockname()[1])
            sockets.append(sock)
        return sockets

    def _spawn(self, index: int, quick_deaths: int = 0) -> None:
        sockets = self._sockets()
        fds = [s.fileno() for s in sockets]
        env = {**os.environ, ENV_INDEX: str(index), ENV_COUNT: str(self.count),
               ENV_FDS: ",".join(map(str, fds)), ENV_METRICS: self.metrics_dir}
        try:
            process = subprocess.Popen([sys.executable, "-m", "mirror", *self.argv], env=env,
                                       pass_fds=fds,
                                       # the supervisor runs no threads: preexec_fn is safe
                                       preexec_fn=_die_with_parent)  # noqa: PLW1509
        finally:
            for sock in sockets:
                sock.close()  # the worker holds them now
        self.children[index] = _Child(index, process, time.monotonic(), quick_deaths)

    def _reap(self) -> None:
        for index, child in list(self.children.items()):
            code = child.process.poll()
            if code is None or self._stopping:
                continue
            _mark_dead(child.process.pid, self.metrics_dir)
            quick = time.monotonic() - child.started < QUICK_DEATH
            deaths = child.quick_deaths + 1 if quick else 0
            log.warning("worker_died", worker=index, pid=child.process.pid, exit_code=code,
                        restarts_soon=deaths)
            if deaths:
                time.sleep(min(0.25 * 2 ** deaths, 10.0))  # a worker that cannot start
            if not self._stopping:
                self._spawn(index, deaths)
                log.info("worker_restarted", worker=index, pid=self.children[index].process.pid)

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
        deadline = time.monotonic() + self.settings.server.shutdown_grace + 15
        for child in self.children.values():
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        log.info("workers_stopped", workers=self.count)
        return 0


def _die_with_parent() -> None:
    """In the child before exec: a SIGTERM when the supervisor dies (no orphan workers)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _mark_dead(pid: int, folder: str) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums)."""
    with contextlib.suppress(Exception):
        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
