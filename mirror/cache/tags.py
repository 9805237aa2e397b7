"""Tag records: the only mutable thing the mirror keeps.

A record maps ``registry/repository:tag`` to the digest upstream gave for it
and when. Records live in diskcache (SQLite) under ``<storage>/tags`` so they
survive restarts; a bounded in-memory copy answers hot lookups without a
thread hop. SQLite calls run in a thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diskcache
import structlog
from cachetools import LRUCache

from mirror import metrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed to when it was last checked upstream."""

    digest: str
    media_type: str
    size: int
    fetched_at: float

    def age(self, now: float | None = None) -> float:
        """Seconds since the record was confirmed upstream."""
        return (time.time() if now is None else now) - self.fetched_at


#: Prefix of the keys of tags upstream said it does not have (never a registry name).
_MISSING = "missing:"


def tag_key(registry: str, repository: str, tag: str) -> str:
    """The key of a tag record."""
    return f"{registry}/{repository}:{tag}"


class TagStore:
    """Tag records on disk with a hot copy in memory."""

    def __init__(self, path: Path, memory_entries: int = 100_000) -> None:
        self._path = path
        self._disk: Any = None
        self._memory: LRUCache[str, TagRecord] = LRUCache(maxsize=memory_entries)

    async def open(self) -> None:
        """Open the on-disk index (in a thread: SQLite may block)."""
        self._disk = await asyncio.to_thread(diskcache.Cache, str(self._path))

    async def close(self) -> None:
        """Close the on-disk index."""
        if self._disk is not None:
            await asyncio.to_thread(self._disk.close)
            self._disk = None

    async def get(self, key: str) -> TagRecord | None:
        """The record for ``key``, from memory or disk."""
        record = self._memory.get(key)
        if record is not None or self._disk is None:
            return record
        raw = await asyncio.to_thread(self._disk.get, key)
        if not isinstance(raw, dict):
            return None
        try:
            record = TagRecord(**raw)
        except TypeError:
            return None
        self._memory[key] = record
        return record

    async def reload(self, key: str) -> TagRecord | None:
        """The record for ``key`` as on disk (another process may have renewed it)."""
        if self._disk is not None:
            self._memory.pop(key, None)
        return await self.get(key)

    async def put(self, key: str, record: TagRecord) -> None:
        """Store a record in memory and on disk."""
        self._memory[key] = record
        if self._disk is not None:
            try:
                await asyncio.to_thread(self._disk.set, key, asdict(record))
            except sqlite3.OperationalError as exc:  # disk full: memory answers meanwhile
                metrics.DISK_FULL.labels("index").inc()
                log.warning("tag_record_not_stored", key=key, error=str(exc))

    async def put_missing(self, key: str, ttl: float) -> None:
        """Remember for ``ttl`` seconds that upstream has no tag ``key`` (node-wide: every
        worker process reads the same disk)."""
        if self._disk is None or ttl <= 0:
            return
        try:
            await asyncio.to_thread(self._disk.set, _MISSING + key, True, expire=ttl)
        except sqlite3.OperationalError as exc:  # disk full: this process remembers it
            log.warning("missing_tag_not_stored", key=key, error=str(exc))

    async def missing(self, key: str) -> bool:
        """Whether upstream said, within its ``ttl``, that it has no tag ``key``."""
        if self._disk is None:
            return False
        return bool(await asyncio.to_thread(self._disk.get, _MISSING + key, False))

    def take_memory(self) -> dict[str, TagRecord]:
        """Forget the copies in memory (records were removed elsewhere) and return them,
        for :meth:`keep_pointing_to`."""
        held = dict(self._memory)
        self._memory.clear()
        return held

    async def keep_pointing_to(self, held: dict[str, TagRecord], digests: set[str]) -> int:
        """Write back the records of ``held`` (what memory held) that point to ``digests``
        and are no longer on disk (``mirror cache evict`` removed them while this process
        kept answering them). Returns how many."""
        if self._disk is None or not digests:
            return 0
        wanted = {key: record for key, record in held.items() if record.digest in digests}

        def restore() -> int:
            restored = 0
            for key, record in wanted.items():
                if self._disk.get(key) is None:
                    self._disk.set(key, asdict(record))
                    restored += 1
            return restored

        return await asyncio.to_thread(restore)

    async def delete(self, key: str) -> None:
        """Forget a tag (upstream says it no longer exists)."""
        self._memory.pop(key, None)
        if self._disk is not None:
            await asyncio.to_thread(self._disk.delete, key)
