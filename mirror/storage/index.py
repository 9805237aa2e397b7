"""The index of the local cache: what is stored, its size, its last use, its pins.

One SQLite database in WAL mode beside the data (``<root>/index.db``), so that
``mirror cache`` commands read and change it while a server runs: WAL lets
one writer and many readers share it across processes, and every statement
waits up to ``BUSY_TIMEOUT`` for a lock instead of failing.

::

    entries(kind, digest, size, last_use, verified)   one row per stored blob or manifest
    reservations(pid, bytes)                           bytes each process of the node is
                                                       downloading (reserved, not yet stored)
    pins(digest, source, pinned_at)                    a digest is pinned while it has a row;
                                                       source is what the operator named
                                                       (an image reference or the digest),
                                                       or ``warm-until:<epoch>:<ref>`` for
                                                       content the sync loop warmed: such a
                                                       pin is swept once <epoch> has passed

``verified`` is 0 for files adopted at start-up without an entry (a crash
between the rename and the insert): they are hashed before they are served.
The totals (bytes, entries) are kept in memory and refreshed from the
database, so the request path never queries it. Every method blocks: callers
on the event loop run them with :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mirror.oci import MANIFEST_MAX_BYTES
from mirror.worker import alive

BUSY_TIMEOUT = 30.0
#: The index's file name in the storage folder.
INDEX_NAME = "index.db"
#: The file beside the index holding the time of the last removal (bump_generation).
REMOVED_AT = "removed-at"
#: Source prefix of the pins warming makes: ``warm-until:<epoch>:<ref>``.
WARM_PIN = "warm-until:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_use REAL NOT NULL,
    verified INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (kind, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_last_use ON entries (last_use);
CREATE TABLE IF NOT EXISTS reservations (
    pid INTEGER PRIMARY KEY,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    digest TEXT NOT NULL,
    source TEXT NOT NULL,
    pinned_at REAL NOT NULL,
    PRIMARY KEY (digest, source)
) WITHOUT ROWID;
"""

#: (kind, digest) of an entry: kind is ``blob`` or ``manifest``.
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored blob or manifest."""

    kind: str
    digest: str
    size: int
    last_use: float
    verified: bool = True

    @property
    def key(self) -> Key:
        return (self.kind, self.digest)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What start-up changed to make the index agree with the disk."""

    adopted: int  # files without an entry, now indexed (unverified)
    dropped: int  # entries without a file, removed
    mismatched: list[Key]  # files whose size cannot be right: the caller deletes them
    entries: int
    bytes: int


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (a setting kept in the file: set once, then only read).

    Changing the journal mode needs the database to itself, and SQLite answers "database
    is locked" at once, without its busy timeout, when another process opens it
    meanwhile: several workers starting on a fresh storage folder did.
    """
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.execute("PRAGMA journal_mode=WAL")


def _retry_locked(step: Callable[[], object], timeout: float = BUSY_TIMEOUT) -> None:
    """Run ``step``; while SQLite says the database is locked or busy, again, for up to
    ``timeout`` seconds (for the statements its busy handler does not wait on)."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class Index:
    """The cache index in SQLite; thread-safe, blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.total_entries = 0

    # --- lifetime ------------------------------------------------------------------
    def open(self) -> None:
        """Open (and create) the database, then load the totals."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        try:
            _retry_locked(lambda: _use_wal(conn))
            # NORMAL is durable across process crashes in WAL mode; a power cut may lose the
            # last commits, which start-up reconciliation repairs.
            conn.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: conn.executescript(_SCHEMA))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.refresh_totals()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the cache index is not open")
            if not write:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def refresh_totals(self) -> tuple[int, int]:
        """Re-read bytes and entries (another process may have changed them)."""
        with self._db() as db:  # totals change under the lock, with the rows
            count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
                                     ).fetchone()
            self.total_entries, self.total_bytes = int(count), int(size)
            return self.total_bytes, self.total_entries

    # --- entries ---------------------------------------------------------------------
    def add(self, kind: str, digest: str, size: int, *, verified: bool = True,
            last_use: float | None = None) -> None:
        """Record stored content (or replace its entry)."""
        now = time.time() if last_use is None else last_use
        with self._db(write=True) as db:
            old = db.execute("SELECT size FROM entries WHERE kind=? AND digest=?",
                             (kind, digest)).fetchone()
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                       (kind, digest, size, now, int(verified)))
            self.total_bytes += size - (old[0] if old else 0)
            self.total_entries += 0 if old else 1

    def get(self, kind: str, digest: str) -> Entry | None:
        """The entry of one blob or manifest."""
        with self._db() as db:
            row = db.execute("SELECT kind, digest, size, last_use, verified FROM entries "
                             "WHERE kind=? AND digest=?", (kind, digest)).fetchone()
        return _entry(row) if row else None

    def find(self, digest: str) -> list[Entry]:
        """Every entry with this digest (a blob, a manifest, or both)."""
        with self._db() as db:
            rows = db.execute("SELECT kind, digest, size, last_use, verified FROM entries "
                              "WHERE digest=?", (digest,)).fetchall()
        return [_entry(r) for r in rows]

    def remove(self, keys: Iterable[Key]) -> int:
        """Drop entries; returns the bytes they held."""
        freed = removed = 0
        with self._db(write=True) as db:
            for kind, digest in keys:
                row = db.execute("DELETE FROM entries WHERE kind=? AND digest=? RETURNING size",
                                 (kind, digest)).fetchone()
                if row:
                    freed += row[0]
                    removed += 1
            self.total_bytes -= freed
            self.total_entries -= removed
        return freed

    def set_verified(self, kind: str, digest: str) -> None:
        """Mark content as hashed and found correct."""
        with self._db(write=True) as db:
            db.execute("UPDATE entries SET verified=1 WHERE kind=? AND digest=?", (kind, digest))

    def touch(self, uses: Iterable[tuple[str, str, float]]) -> None:
        """Renew the last use of entries: ``(kind, digest, time)`` each (batched)."""
        with self._db(write=True) as db:
            db.executemany("UPDATE entries SET last_use=MAX(last_use, ?) "
                           "WHERE kind=? AND digest=?", ((t, k, d) for k, d, t in uses))

    def least_recent(self, limit: int, skip: int = 0) -> list[Entry]:
        """Unpinned entries, least recently used first."""
        with self._db() as db:
            rows = db.execute(
                "SELECT kind, digest, size, last_use, verified FROM entries "
                "WHERE digest NOT IN (SELECT digest FROM pins) "
                "ORDER BY last_use LIMIT ? OFFSET ?", (limit, skip)).fetchall()
        return [_entry(r) for r in rows]

    def all(self) -> list[Entry]:
        """Every entry, most recently used first."""
        with self._db() as db:
            rows = db.execute("SELECT kind, digest, size, last_use, verified FROM entries "
                              "ORDER BY last_use DESC").fetchall()
        return [_entry(r) for r in rows]

    def generation(self) -> int:
        """A counter another process bumps when it removes content (``mirror cache evict``)."""
        with self._db() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    def bump_generation(self) -> None:
        """Tell running servers that content went away behind their back, and when (a
        server stores again what it answered from memory after that, see
        :meth:`removed_at`)."""
        with self._db(write=True) as db:
            current = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version = {(current + 1) % 2**31}")
        marker = Path(self.path).with_name(REMOVED_AT)
        temp = marker.with_name(f".{REMOVED_AT}.{os.getpid()}.{threading.get_ident()}")
        try:
            temp.write_text(f"{time.time():.6f}")
            os.replace(temp, marker)
        except OSError:  # a full disk: no marker, so servers keep nothing (see removed_at)
            temp.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)

    def removed_at(self) -> float:
        """When content was last removed behind the servers' back (seconds since the epoch;
        infinity when unknown: then nothing counts as used after it)."""
        try:
            return float(Path(self.path).with_name(REMOVED_AT).read_text())
        except (OSError, ValueError):
            return float("inf")

    # --- the node's byte budget ----------------------------------------------------------
    def budget(self, pid: int, reserved: int) -> tuple[int, int]:
        """Record that process ``pid`` reserves ``reserved`` bytes; read the node's usage.

        Every process of the node (worker, ``mirror`` command) keeps one row; rows of
        processes that are gone are dropped here.

        Returns:
            Bytes stored (the entries) and bytes reserved by the node's live processes.
        """
        with self._db(write=True) as db:
            db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?)", (pid, reserved))
            rows = db.execute("SELECT pid, bytes FROM reservations WHERE pid != ?",
                              (pid,)).fetchall()
            dead = [(other,) for other, _ in rows if not alive(other)]
            db.executemany("DELETE FROM reservations WHERE pid=?", dead)
            count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
                                     ).fetchone()
            self.total_entries, self.total_bytes = int(count), int(size)
        gone = {other for (other,) in dead}
        others = sum(int(b) for other, b in rows if other not in gone)
        return self.total_bytes, reserved + others

    def drop_reservation(self, pid: int) -> None:
        """Forget a process's reservations (it stops)."""
        with self._db(write=True) as db:
            db.execute("DELETE FROM reservations WHERE pid=?", (pid,))

    # --- pins --------------------------------------------------------------------------
    def pin(self, digests: Iterable[str], source: str) -> None:
        """Pin digests in the name of ``source`` (an image reference or a digest)."""
        now = time.time()
        with self._db(write=True) as db:
            db.executemany("INSERT OR REPLACE INTO pins VALUES (?, ?, ?)",
                           ((d, source, now) for d in digests))

    def unpin(self, source: str) -> int:
        """Drop the pins made in the name of ``source``; returns how many.

        A digest that no pin names as its source loses every pin it has
        (``unpin sha256:...`` of a layer pinned through its image).
        """
        with self._db(write=True) as db:
            count = int(db.execute("DELETE FROM pins WHERE source=?", (source,)).rowcount)
            if count == 0:
                count = int(db.execute("DELETE FROM pins WHERE digest=?", (source,)).rowcount)
            return count

    def pin_until(self, digests: Iterable[str], ref: str, until: float) -> None:
        """Pin digests for warming until ``until`` (seconds since the epoch); see
        :meth:`sweep_expired`. Pinning the same ref again replaces its pins."""
        with self._db(write=True) as db:
            db.execute("DELETE FROM pins WHERE source LIKE ? ESCAPE '\\'",
                       (f"{WARM_PIN}%:{_like(ref)}",))
            db.executemany("INSERT OR REPLACE INTO pins VALUES (?, ?, ?)",
                           ((d, f"{WARM_PIN}{int(until)}:{ref}", time.time()) for d in digests))

    def sweep_expired(self, now: float) -> int:
        """Drop warming pins whose time has passed; returns how many."""
        with self._db(write=True) as db:
            rows = db.execute("SELECT DISTINCT source FROM pins WHERE source LIKE ?",
                              (f"{WARM_PIN}%",)).fetchall()
            expired = [source for (source,) in rows if _warm_expiry(source) < now]
            removed = 0
            for source in expired:
                removed += int(db.execute("DELETE FROM pins WHERE source=?",
                                          (source,)).rowcount)
            return removed

    def pins(self) -> dict[str, list[str]]:
        """Pinned digests and the sources that pin each."""
        with self._db() as db:
            rows = db.execute("SELECT digest, source FROM pins ORDER BY source").fetchall()
        found: dict[str, list[str]] = {}
        for digest, source in rows:
            found.setdefault(digest, []).append(source)
        return found

    def pinned_bytes(self) -> int:
        """Bytes of stored content that is pinned."""
        with self._db() as db:
            row = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries "
                             "WHERE digest IN (SELECT digest FROM pins)").fetchone()
        return int(row[0])

    # --- start-up --------------------------------------------------------------------
    def sizes(self) -> dict[Key, int]:
        """``(kind, digest) -> size`` of every entry (one query, for start-up)."""
        with self._db() as db:
            return {(k, d): s for k, d, s in db.execute("SELECT kind, digest, size FROM entries")}

    def reconcile(self, known: dict[Key, int], present: set[Key],
                  unknown: dict[Key, tuple[int, float]]) -> Reconciled:
        """Make the index agree with the files found on disk.

        Args:
            known: :meth:`sizes`, read before the disk was scanned.
            present: every stored file's key.
            unknown: ``(size, mtime)`` of stored files that have no entry.

        Returns:
            What changed. ``mismatched`` lists files adopted with a size that
            cannot be right (a manifest over the size limit): the caller deletes them.
        """
        dropped = [key for key in known if key not in present]
        mismatched = [key for key, (size, _) in unknown.items()
                      if key[0] == "manifest" and size > MANIFEST_MAX_BYTES]
        adopted = [(k, d, size, mtime, 0) for (k, d), (size, mtime) in unknown.items()
                   if (k, d) not in mismatched]
        with self._db(write=True) as db:
            db.executemany("DELETE FROM entries WHERE kind=? AND digest=?", dropped)
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", adopted)
        self.total_bytes = sum(known.values()) - sum(known[k] for k in dropped) \
            + sum(row[2] for row in adopted)
        self.total_entries = len(known) - len(dropped) + len(adopted)
        return Reconciled(len(adopted), len(dropped), mismatched, self.total_entries,
                          self.total_bytes)


def _warm_expiry(source: str) -> float:
    stamp = source[len(WARM_PIN):].partition(":")[0]
    return float(stamp) if stamp.isdigit() else 0.0


def _like(text: str) -> str:
    """``text`` as a literal in a LIKE pattern (``\\`` escapes)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _entry(row: tuple[str, str, int, float, int]) -> Entry:
    return Entry(row[0], row[1], int(row[2]), float(row[3]), bool(row[4]))
