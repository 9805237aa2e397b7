"""Popularity: what clients pull here, per registry, repository, tag and platform.

Each pull adds 1 to a score that decays exponentially: a pull ``age`` seconds old
weighs ``exp(-age / window)``, so a score is about the pulls of the last window
and old traffic fades without a sweep. Only the decayed score and the time it was
last updated are kept per key, so an update is a dict lookup and two float
operations: the request path calls :meth:`Popularity.tag_pulled` and
:meth:`Popularity.manifest_pulled` and nothing else.

Platforms: a client that pulls an index by tag then asks for the manifest of its
own platform by digest. The children of an index (digest -> platform) are read
once per index digest when the tag is answered, so the later pull of a child by
digest counts for its platform.

Bounded: at most ``max_entries`` tags and as many platforms are kept; above that
the weakest scores are dropped (by :meth:`prune`, which the persisting loop
calls, and at once when a flood doubles the bound).

Persisted: a JSON snapshot at ``<storage>/sync/popularity.json``, written by the
node's background loop (temp file + rename: a reader never sees half a file) and
read at start. A plain file rather than the index database or a diskcache: it is
one small document written every few seconds at most, that ``mirror sync status``
and other tools read whole, and it holds nothing that must not be lost (a crash
forgets the last seconds of counts).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from mirror.cache.manifests import Manifest
from mirror.clock import SYSTEM, Clock
from mirror.errors import ManifestInvalid
from mirror.oci import INDEX_TYPES, parse_manifest
from mirror.sync.rules import Platform

SNAPSHOT_VERSION = 1
#: Children of this many index digests are remembered to learn platforms.
CHILDREN_MAX = 20_000

Key = tuple[str, str, str]  # (registry, repository, tag or platform)


@dataclass(frozen=True, slots=True)
class Popular:
    """One tag and its decayed pull count."""

    registry: str
    repository: str
    tag: str
    score: float

    def as_json(self) -> dict[str, Any]:
        return {"registry": self.registry, "repository": self.repository, "tag": self.tag,
                "score": round(self.score, 3)}


class _Scores:
    """Decaying scores per key: ``[score at t, t]``."""

    def __init__(self, window: float, max_entries: int) -> None:
        self.window = window
        self.max_entries = max_entries
        self.items: dict[Key, list[float]] = {}

    def add(self, key: Key, now: float, amount: float = 1.0) -> None:
        item = self.items.get(key)
        if item is None:
            self.items[key] = [amount, now]
            if len(self.items) > 2 * self.max_entries:
                self.prune(now)
            return
        item[0] = item[0] * math.exp(-max(0.0, now - item[1]) / self.window) + amount
        item[1] = now

    def score(self, key: Key, now: float) -> float:
        item = self.items.get(key)
        return 0.0 if item is None else self.value(item, now)

    def value(self, item: list[float], now: float) -> float:
        return item[0] * math.exp(-max(0.0, now - item[1]) / self.window)

    def ranked(self, now: float) -> list[tuple[Key, float]]:
        scored = [(key, self.value(item, now)) for key, item in self.items.items()]
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored

    def prune(self, now: float) -> None:
        """Keep the ``max_entries`` strongest; drop what has faded to nothing."""
        ranked = [(k, s) for k, s in self.ranked(now) if s >= 1e-3]
        keep = dict(ranked[:self.max_entries])
        self.items = {k: v for k, v in self.items.items() if k in keep}


class Popularity:
    """Decaying pull counts, bounded in memory, saved to and loaded from a file."""

    def __init__(self, path: Path | None, *, window: float = 86400.0,
                 max_entries: int = 10_000, clock: Clock = SYSTEM) -> None:
        self.path = path
        self._clock = clock
        self._tags = _Scores(window, max_entries)
        self._platforms = _Scores(window, max_entries)
        self._children: LRUCache[str, tuple[str, str, str] | None] = LRUCache(CHILDREN_MAX)
        self.dirty = False

    # --- the request path ---------------------------------------------------------------
    def tag_pulled(self, registry: str, repository: str, tag: str, manifest: Manifest) -> None:
        """A client asked for a tag (GET or HEAD); learn the platforms of its index once."""
        self._tags.add((registry, repository, tag), self._clock.time())
        self.dirty = True
        digest = str(manifest.digest)
        if manifest.media_type in INDEX_TYPES and digest not in self._children:
            self._children[digest] = None
            try:
                entries = parse_manifest(manifest.data).get("manifests") or []
            except ManifestInvalid:  # counting never fails a pull
                return
            for entry in entries if isinstance(entries, list) else []:
                platform = Platform.of(entry) if isinstance(entry, dict) else None
                child = entry.get("digest") if isinstance(entry, dict) else None
                if platform is not None and platform.os != "unknown" and isinstance(child, str):
                    self._children[child] = (registry, repository, str(platform))

    def record(self, image: str) -> None:
        """Count one pull of ``registry/repository:tag`` (the lean path's kept answers);
        platforms are not learnt this way."""
        name, _, tag = image.rpartition(":")
        registry, _, repository = name.partition("/")
        if registry and repository and tag:
            self._tags.add((registry, repository, tag), self._clock.time())
            self.dirty = True

    def manifest_pulled(self, digest: str) -> None:
        """A client fetched a manifest by digest: count its platform if it is an index's
        child we know."""
        known = self._children.get(digest)
        if known is not None:
            self._platforms.add(known, self._clock.time())
            self.dirty = True

    # --- readers ------------------------------------------------------------------------
    def top(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` most pulled images as ``(registry/repository:tag, pulls)``, pulls
        rounded (the status page's interface)."""
        return [(f"{p.registry}/{p.repository}:{p.tag}", round(p.score))
                for p in self.top_tags(count)]

    def top_tags(self, n: int, registry: str | None = None) -> list[Popular]:
        """The ``n`` most-pulled tags (of one registry, or of all)."""
        now = self._clock.time()
        ranked = [(k, s) for k, s in self._tags.ranked(now) if registry in (None, k[0])]
        return [Popular(*key, score) for key, score in ranked[:n]]

    def platforms(self, registry: str, repository: str, limit: int = 4) -> list[str]:
        """The platforms pulled from a repository, most pulled first."""
        now = self._clock.time()
        found = [(k[2], s) for k, s in self._platforms.ranked(now)
                 if k[0] == registry and k[1] == repository]
        return [platform for platform, _ in found[:limit]]

    def repositories(self, registry: str) -> set[str]:
        """Every repository of a registry pulled here within the kept counts."""
        return {k[1] for k in self._tags.items if k[0] == registry}

    def as_json(self, top: int = 100) -> dict[str, Any]:
        """The most-pulled tags and the platforms pulled per repository (admin API)."""
        now = self._clock.time()
        platforms: dict[str, dict[str, float]] = {}
        for (registry, repository, platform), score in self._platforms.ranked(now):
            platforms.setdefault(f"{registry}/{repository}", {})[platform] = round(score, 3)
        return {"window_seconds": self._tags.window, "tracked_tags": len(self._tags.items),
                "top": [p.as_json() for p in self.top_tags(top)], "platforms": platforms}

    # --- persistence (blocking: run in a thread) --------------------------------------------
    def prune(self) -> None:
        """Drop the weakest scores above the bound."""
        now = self._clock.time()
        self._tags.prune(now)
        self._platforms.prune(now)

    def snapshot(self) -> dict[str, Any]:
        """The counts as a JSON document (taken on the event loop: a consistent copy)."""
        self.dirty = False
        return {"version": SNAPSHOT_VERSION, "saved_at": self._clock.time(),
                "window": self._tags.window,
                "tags": [[*k, *v] for k, v in self._tags.items.items()],
                "platforms": [[*k, *v] for k, v in self._platforms.items.items()]}

    def save(self, document: dict[str, Any]) -> None:
        """Write a snapshot atomically (temp file + rename)."""
        if self.path is None:
            return
        write_json(self.path, document)

    def load(self) -> None:
        """Read the saved counts; a missing or unreadable file starts from nothing."""
        document = read_json(self.path) if self.path is not None else None
        if not isinstance(document, dict) or document.get("version") != SNAPSHOT_VERSION:
            return
        for name, scores in (("tags", self._tags), ("platforms", self._platforms)):
            for row in document.get(name) or []:
                if isinstance(row, list) and len(row) == 5 and all(
                        isinstance(x, str) for x in row[:3]) and all(
                        isinstance(x, int | float) for x in row[3:]):
                    scores.items[(row[0], row[1], row[2])] = [float(row[3]), float(row[4])]
        self.prune()


def write_json(path: Path, document: Any) -> None:
    """Write JSON atomically: a temp file beside ``path``, fsynced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """A JSON file's document, or ``None`` when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
