"""The audit trail: one JSON line per manifest decision and per admin action, chained.

Every line carries ``prev``, the SHA-256 of the line before it (of its bytes, without the
newline; 64 zeros for the first line a process ever wrote there), so that a line changed,
removed or inserted later breaks the chain at the next line: ``mirror audit verify FILE``
finds where (:func:`verify`).

With worker processes, each worker writes its own file (``audit.jsonl`` ->
``audit.w0.jsonl``, ``audit.w1.jsonl``, ...): no lock between processes on the hot
path, and each file is one chain. With ``file: "-"`` the lines of every worker go to
standard output, each worker's lines a chain of their own (:func:`verify` follows them
by their ``worker`` field). Beyond ``max_size`` a file is renamed to ``<file>.1``
(replacing the one before) and the chain goes on in the new file: its first line's
``prev`` is the hash of the last line of ``<file>.1``.

Writes are one ``os.write`` of one line on a file opened with ``O_APPEND``: small, into
the page cache, never split between two lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import metrics
from mirror.config import AuditSettings

GENESIS = "0" * 64
#: Bytes read back from the end of an existing file to continue its chain.
_TAIL = 64 * 1024


def worker_path(path: Path, index: int, count: int) -> Path:
    """The file a worker writes: ``path`` alone, ``<stem>.w<index><suffix>`` with workers."""
    if count <= 1:
        return path
    return path.with_name(f"{path.stem}.w{index}{path.suffix}")


class AuditTrail:
    """The audit lines of one process; :meth:`record` is the one way to write one."""

    def __init__(self, settings: AuditSettings, *, node: str, worker: int = 0,
                 workers: int = 1) -> None:
        self._node, self._worker = node, worker
        self._max = settings.max_size
        self._path = worker_path(settings.file, worker, workers) if settings.file else None
        self._fd = -1 if self._path is None else self._open(self._path)
        self._size = os.fstat(self._fd).st_size if self._fd >= 0 else 0
        self._prev = _last_hash(self._path) if self._path is not None else GENESIS

    @property
    def path(self) -> Path | None:
        """The file written (``None``: standard output)."""
        return self._path

    def record(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Write one line: ``kind`` (``manifest`` or ``admin``), the fields, the chain."""
        entry = {"time": _now(), "kind": kind, "node": self._node, "worker": self._worker,
                 **{k: v for k, v in fields.items() if v is not None}, "prev": self._prev}
        line = json.dumps(entry, separators=(",", ":"), default=str).encode()
        self._prev = hashlib.sha256(line).hexdigest()
        data = line + b"\n"
        if self._fd < 0:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            if self._size + len(data) > self._max and self._size:
                self._rotate()
            os.write(self._fd, data)
            self._size += len(data)
        metrics.child(metrics.AUDIT_LINES, kind).inc()

    def close(self) -> None:
        """Close the file (standard output is left open)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        assert self._path is not None
        os.close(self._fd)
        os.replace(self._path, self._path.with_name(self._path.name + ".1"))
        self._fd = self._open(self._path)
        self._size = 0

    @staticmethod
    def _open(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


_stamp: list[Any] = [-1, ""]  # the second last rendered, and its text


def _now() -> str:
    """UTC time with microseconds; the part up to the second rendered once per second."""
    now = time.time()
    second = int(now)
    if second != _stamp[0]:
        _stamp[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_stamp[1]}.{int((now - second) * 1e6):06d}Z"


def _last_hash(path: Path) -> str:
    """The hash of the last whole line of an existing file (the chain goes on from it)."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _TAIL))
            tail = file.read()
    except FileNotFoundError:
        return GENESIS
    lines = [line for line in tail.split(b"\n") if line]
    return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS


@dataclass(frozen=True)
class Verified:
    """What :func:`verify` found: ``ok``, and one line that says it."""

    ok: bool
    message: str


def verify(path: Path) -> Verified:
    """Check the chain of an audit file (each worker's lines a chain of their own).

    The first line of each chain may continue a rotated file (its ``prev`` is not checked);
    every later line's ``prev`` must be the hash of the line before it of the same worker.
    """
    previous: dict[object, tuple[int, str]] = {}
    count = 0
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, 1):
                line = raw.rstrip(b"\n")
                if not line:
                    continue
                problem = _check_line(line, number, previous)
                if problem:
                    return Verified(False, f"{path}: chain breaks at line {number}: {problem}")
                count += 1
    except OSError as exc:
        return Verified(False, f"{path}: cannot be read: {exc.strerror or exc}")
    chains = len(previous)
    return Verified(True, f"{path}: {count} lines, {chains} chain{'s' * (chains != 1)}, "
                          "intact")


def _check_line(line: bytes, number: int, previous: dict[object, tuple[int, str]]) -> str:
    try:
        entry = json.loads(line)
    except ValueError:
        return "not a JSON line"
    if not isinstance(entry, dict) or not isinstance(entry.get("prev"), str):
        return "no prev hash"
    worker = entry.get("worker")
    before = previous.get(worker)
    if before is not None and entry["prev"] != before[1]:
        return (f"its prev hash is not the hash of line {before[0]} (a line was changed, "
                "removed or inserted)")
    previous[worker] = (number, hashlib.sha256(line).hexdigest())
    return ""
