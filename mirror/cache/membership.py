"""Which registry and repository hold which digest: keeps private content private.

The cache stores content once per digest, for every registry and repository. A
client that may pull ``docker.io/library/small-01`` could otherwise read a layer
of ``quay.io/team/app`` by asking for its digest under ``library/small-01``. So
the mirror remembers, per (registry, repository), the digests it knows that
repository holds: those fetched or confirmed for it, and everything a manifest
served from it references. A digest is served under a registry only when that
registry is known to hold it:

- under a registry reached **with credentials** (where private content can
  exist), the very repository named must be known to hold it;
- under a registry reached **without credentials** (public content only), any
  repository of that registry knowing it is enough;
- otherwise upstream is asked first, with one ``HEAD`` under the repository
  named (with that registry's credentials and scope). If upstream says no, the
  client gets ``BLOB_UNKNOWN`` / ``MANIFEST_UNKNOWN`` even though the bytes are
  cached; if it says yes, the fact is kept and the one copy on disk is served.

The facts persist in ``<storage>/membership.db`` (SQLite, WAL), shared by the
worker processes of a node and kept across restarts; a bounded memory set of
facts already seen answers the request path. They are facts about upstream,
not about the cache: eviction leaves them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import structlog
from cachetools import LRUCache, TTLCache

from mirror import metrics
from mirror.config import UpstreamSettings
from mirror.errors import BlobUnknown, ManifestUnknown, OciError
from mirror.oci import Digest, parse_manifest, referenced_digests
from mirror.sources.upstream import UpstreamSource

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (registry, repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_digest ON members (digest, registry);
"""
FILE_NAME = "membership.db"
Triple = tuple[str, str, str]
#: The repository part of a memory fact meaning "some repository of the registry".
ANY_REPOSITORY = ""


def holds_private(upstream: UpstreamSettings | None) -> bool:
    """Whether the mirror reaches ``upstream`` with credentials (so content may be private)."""
    return upstream is not None and (bool(upstream.credentials)
                                     or upstream.password is not None)


class Membership:
    """The persisted (registry, repository, digest) facts, with a memory in front.

    Args:
        path: the SQLite file (created).
        memory: how many facts the memory set holds.
        refused_ttl: seconds a refusal upstream gave is answered again without asking
            (``cache.negative_ttl``): repeating a digest under the wrong name costs
            upstream one ``HEAD`` per window, not one per request.
    """

    def __init__(self, path: Path, memory: int = 200_000, refused_ttl: float = 15.0) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._memory: LRUCache[Triple, bool] = LRUCache(maxsize=memory)
        # (registry, repository, digest, kind) -> refused upstream, for ``refused_ttl``
        self.refused: TTLCache[tuple[str, str, str, str], bool] = TTLCache(
            maxsize=10_000, ttl=max(refused_ttl, 0.001))

    def open(self) -> None:
        """Open (and create) the database; blocking."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def close(self) -> None:
        """Close the database; blocking."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- the API the pull path uses --------------------------------------------------
    async def known(self, registry: str, repository: str, digest: str) -> bool:
        """Whether ``repository`` of ``registry`` is known to hold ``digest``."""
        triple = (registry, repository, digest)
        if triple in self._memory:
            return True
        found = await asyncio.to_thread(self._select, triple)
        if found:
            self._memory[triple] = True
        return found

    async def known_in(self, registry: str, digest: str) -> bool:
        """Whether some repository of ``registry`` is known to hold ``digest``."""
        pair = (registry, ANY_REPOSITORY, digest)
        if pair in self._memory:
            return True
        found = await asyncio.to_thread(self._select_any, registry, digest)
        if found:
            self._memory[pair] = True
        return found

    async def record(self, registry: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that ``repository`` holds ``digests``."""
        new = [t for t in ((registry, repository, d) for d in digests) if t not in self._memory]
        if not new:
            return
        await asyncio.to_thread(self._insert, new)
        for triple in new:
            self._memory[triple] = True
            self._memory[(registry, ANY_REPOSITORY, triple[2])] = True

    def record_now(self, registry: str, repository: str, digests: Iterable[str]) -> None:
        """:meth:`record`, blocking (for ``mirror import``, which runs in no event loop)."""
        self._insert([(registry, repository, d) for d in digests])

    async def record_manifest(self, registry: str, repository: str, digest: Digest,
                              data: bytes) -> None:
        """Remember a manifest served for ``repository`` and all it references."""
        if (registry, repository, str(digest)) in self._memory:
            return  # its references were recorded with it
        try:
            referenced = [d for _kind, d, _size in referenced_digests(parse_manifest(data))]
        except (OciError, ValueError, TypeError, AttributeError):
            referenced = []
        # The manifest last: its presence in memory says the references are in too.
        await self.record(registry, repository, [*referenced, str(digest)])

    # --- blocking ------------------------------------------------------------------------
    # A failing database (disk full, corrupt) never fails a pull: an unknown fact only
    # costs one upstream HEAD, and a fact not written is learnt again.
    def _select(self, triple: Triple) -> bool:
        return self._exists(
            "SELECT 1 FROM members WHERE registry=? AND repository=? AND digest=?", triple)

    def _select_any(self, registry: str, digest: str) -> bool:
        return self._exists("SELECT 1 FROM members WHERE digest=? AND registry=? LIMIT 1",
                            (digest, registry))

    def _exists(self, query: str, params: tuple[str, ...]) -> bool:
        """Whether ``query`` finds a row; ``False`` when the database is closed or fails."""
        with self._lock:
            if self._conn is None:
                return False
            try:
                row = self._conn.execute(query, params).fetchone()
            except sqlite3.Error as exc:
                log.warning("membership_read_failed", error=str(exc))
                return False
        return row is not None

    def _insert(self, triples: list[Triple]) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany("INSERT OR IGNORE INTO members VALUES (?, ?, ?)",
                                           triples)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                log.warning("membership_write_failed", error=str(exc), facts=len(triples))

    def bytes_by_registry(self, index_db: Path, configured: Iterable[str]) -> dict[str, int]:
        """Cached bytes per configured registry, and ``other`` for content known under none.

        Content known under several registries counts under each. Blocking: one
        query joining the cache index (attached for its duration).
        """
        names = list(configured)
        totals = dict.fromkeys([*names, "other"], 0)
        with self._lock:
            if self._conn is None or not index_db.is_file():
                return totals
            self._conn.execute("ATTACH DATABASE ? AS idx", (str(index_db),))
            try:
                rows = self._conn.execute(
                    "SELECT m.registry, SUM(e.size) FROM (SELECT DISTINCT digest, registry "
                    "FROM members) m JOIN idx.entries e ON e.digest = m.digest "
                    "GROUP BY m.registry").fetchall()
                other = self._conn.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM idx.entries WHERE digest NOT IN "
                    "(SELECT digest FROM members)").fetchone()[0]
            finally:
                self._conn.execute("DETACH DATABASE idx")
        for registry, size in rows:
            if registry in totals and registry != "other":
                totals[registry] = int(size)
        totals["other"] = int(other)
        return totals

    def registries_of(self) -> dict[str, set[str]]:
        """digest -> the registries it is known under; blocking (for ``mirror cache``)."""
        found: dict[str, set[str]] = {}
        with self._lock:
            if self._conn is None:
                return found
            for digest, registry in self._conn.execute(
                    "SELECT DISTINCT digest, registry FROM members"):
                found.setdefault(digest, set()).add(registry)
        return found


async def ensure_member(membership: Membership, upstream: UpstreamSource, repository: str,
                        digest: Digest, *, kind: str, private: bool) -> None:
    """Refuse a digest the registry of ``upstream`` is not known to hold, unless upstream
    confirms it under ``repository`` (one ``HEAD``, on the budget ``upstream`` spends).

    Args:
        private: the registry is reached with credentials (:func:`holds_private`): the
            repository itself must be known to hold the digest, not just the registry.

    Raises:
        BlobUnknown, ManifestUnknown: upstream does not have it under ``repository``
            (404, 401 or 403).
        UpstreamUnavailable, TooManyRequests: upstream cannot say now.
    """
    registry = upstream.name
    if await may_serve(membership, registry, repository, str(digest), private=private):
        return
    asked = (registry, repository, str(digest), kind)
    if asked in membership.refused or not await _upstream_has(upstream, repository, digest,
                                                               kind):
        metrics.child(metrics.AUTH_FAILURES, "not_member").inc()
        log.info("membership_refused", registry=registry, repository=repository,
                 digest=str(digest), kind=kind)
        membership.refused[asked] = True
        error = BlobUnknown if kind == "blob" else ManifestUnknown
        raise error(f"{kind} {digest} is unknown in {repository}")
    await membership.record(registry, repository, [str(digest)])


async def may_serve(membership: Membership, registry: str, repository: str, digest: str, *,
                    private: bool) -> bool:
    """Whether the facts alone allow serving ``digest`` under ``registry/repository``
    (``False``: upstream must confirm first)."""
    if private:
        return await membership.known(registry, repository, digest)
    return await membership.known_in(registry, digest)


async def _upstream_has(upstream: UpstreamSource, repository: str, digest: Digest,
                        kind: str) -> bool:
    if kind == "blob":
        return await upstream.has_blob(repository, digest)
    return await upstream.has_manifest(repository, digest)


def registries_json(registries: dict[str, set[str]], digest: str) -> list[str]:
    """The sorted registries of a digest, for JSON output."""
    return sorted(registries.get(digest, ()))
