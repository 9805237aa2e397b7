"""One mirror per storage folder: its lock, its pid file, and ``mirror reload``.

::

    <storage.path>/mirror.lock   flock'd by the serving mirror (supervisor and workers) for
                                 as long as any of its processes runs: a second ``mirror
                                 serve`` on the same folder exits 2, whatever its port
    server.pid_file              the supervisor's (or lone process's) pid, written at start
      (default <storage.path>/mirror.pid)   with temp file + rename, removed at a clean stop

Two mirrors on one storage folder are refused, not shared: each would empty ``tmp/`` (the
other's downloads) and reconcile and evict on its own. ``mirror reload`` reads the pid
file, checks that the lock is held (a pid file left by a crash names no mirror) and sends
SIGHUP.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from pathlib import Path

from mirror.config import Settings
from mirror.errors import ConfigError

LOCK_NAME = "mirror.lock"
PID_NAME = "mirror.pid"


class NotRunning(Exception):
    """``mirror reload`` found no running mirror (the message says why)."""


def pid_path(settings: Settings) -> Path:
    """``server.pid_file``, else ``mirror.pid`` in the storage folder."""
    return settings.server.pid_file or settings.storage.path / PID_NAME


def lock_storage(storage: Path) -> int:
    """Take the storage folder's lock for this mirror; returns the open lock file's fd
    (hold it open as long as the mirror serves; children it is passed to hold it too).

    Raises:
        ConfigError: (``storage.path``) another mirror serves this folder.
    """
    path = storage / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError("storage.path", f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = _read_pid(storage / PID_NAME)
        who = f" (pid {other})" if other else ""
        raise ConfigError("storage.path", f"{storage} is in use by another mirror{who}; "
                          "one mirror per storage folder") from None
    return fd


def is_locked(storage: Path) -> bool:
    """Whether a mirror holds the storage folder's lock now."""
    try:
        fd = os.open(storage / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_pid(path: Path, pid: int | None = None) -> None:
    """Write ``pid`` (this process's by default) to ``path``: a temp file, then rename.

    Raises:
        ConfigError: (``server.pid_file``) the file cannot be written.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(f"{pid or os.getpid()}\n")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise ConfigError("server.pid_file", f"cannot write {path}: {exc.strerror}") from None


def remove_pid(path: Path, pid: int | None = None) -> None:
    """Remove the pid file if it still names ``pid`` (this process by default)."""
    if _read_pid(path) == (pid or os.getpid()):
        with contextlib.suppress(OSError):
            path.unlink()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def signal_running(settings: Settings, signum: int = signal.SIGHUP) -> int:
    """Send ``signum`` to the mirror serving with ``settings``; returns its pid.

    Raises:
        NotRunning: no pid file, a pid file left by a mirror that is gone, or no process.
    """
    path = pid_path(settings)
    pid = _read_pid(path)
    if pid is None:
        why = "not a pid" if path.exists() else "no such file"
        raise NotRunning(f"no mirror to reload: {path}: {why} (is `mirror serve` running "
                         "with this config?)")
    if not is_locked(settings.storage.path):
        raise NotRunning(f"no mirror to reload: {path} names pid {pid}, but no mirror "
                         f"serves {settings.storage.path} (a stale pid file)")
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise NotRunning(f"no mirror to reload: pid {pid} (from {path}) is gone") from None
    except PermissionError:
        raise NotRunning(f"cannot signal pid {pid} (from {path}): not this user's "
                         "process") from None
    return pid
