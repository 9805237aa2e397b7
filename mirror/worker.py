"""This process's place among the node's worker processes (``server.workers``).

The supervisor (:mod:`mirror.server.workers`) starts each worker with its index, the
worker count and its listening sockets in the environment; a lone process is worker 0
of 1. Lower layers read it here: the node (who evicts, which temp folder is its own)
and the fetcher (claims on digests matter only with more than one process).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

#: Environment of a worker: its index, the worker count, its listening socket fds.
ENV_INDEX = "MIRROR_WORKER"
ENV_COUNT = "MIRROR_WORKERS"
ENV_FDS = "MIRROR_LISTEN_FDS"


@dataclass(frozen=True, slots=True)
class Worker:
    """This process's place among the workers (index 0 of 1 when there are none)."""

    index: int = 0
    count: int = 1

    @property
    def evicts(self) -> bool:
        """Whether this process runs the eviction loop and reconciles (one per node)."""
        return self.index == 0

    @property
    def temp_folder(self) -> str | None:
        """This worker's own folder under ``tmp/`` (emptied when it starts), if a worker."""
        return f"w{self.index}" if self.count > 1 else None


def current() -> Worker:
    """This process's place, from the environment the supervisor set (else a lone process)."""
    index = os.environ.get(ENV_INDEX)
    if index is None:
        return Worker()
    return Worker(int(index), int(os.environ.get(ENV_COUNT, "1")))


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets the supervisor passed to this worker."""
    fds = os.environ.get(ENV_FDS, "")
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a worker's reservations and problems still
    count); one that runs as another user counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
