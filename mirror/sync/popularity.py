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

Pulls, not requests (so that no one client steers the ``popular`` rule): a tag
counts when a client fetches its manifest (``GET`` by tag, or ``HEAD`` by tag
followed by a ``GET`` of the digest it answered, as containerd pulls); a ``HEAD``
alone is a revalidation and counts nothing. A client (its user, else its address)
counts once per image per window, and for at most ``per_client`` images per
window. What is remembered of clients is bounded (LRU).

Node-wide: each worker process counts the pulls it answers in a file of its own
(``popularity-w<i>.json``) and reads the others' files every few seconds
(:meth:`Popularity.read_others`, in a thread); every reader (status page, admin
API, the sync loop) sees the sum, so every worker gives the node's answer.

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
#: (client, image) pairs remembered to count a client once per image per window.
COUNTED_MAX = 100_000
#: Clients whose share of the window is remembered.
CLIENTS_MAX = 20_000
#: The files of every process of the node: ``popularity.json``, ``popularity-w<i>.json``.
FILES = "popularity*.json"

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
                 max_entries: int = 10_000, per_client: int = 20,
                 clock: Clock = SYSTEM) -> None:
        self.path = path
        self._clock = clock
        self._tags = _Scores(window, max_entries)
        self._platforms = _Scores(window, max_entries)
        self._children: LRUCache[str, tuple[str, str, str] | None] = LRUCache(CHILDREN_MAX)
        self._per_client = per_client
        #: (client, what) -> when it was last counted; what is a tag key or a digest.
        self._counted: LRUCache[tuple[str, Key], float] = LRUCache(COUNTED_MAX)
        #: client -> [images counted, start of its window].
        self._shares: LRUCache[str, list[float]] = LRUCache(CLIENTS_MAX)
        #: (client, manifest digest) -> the tag a HEAD resolved to it (a pull to come).
        self._resolved: LRUCache[tuple[str, str], Key] = LRUCache(COUNTED_MAX)
        #: The other processes' counts (their files), with each file's mtime.
        self._others: dict[Path, tuple[float, _Scores, _Scores]] = {}
        self.dirty = False

    # --- the request path ---------------------------------------------------------------
    def tag_pulled(self, registry: str, repository: str, tag: str, manifest: Manifest,
                   client: str = "", *, head: bool = False) -> None:
        """A client asked for a tag: a ``GET`` counts (once per client and window), a
        ``HEAD`` counts only if the client then fetches the digest it answered. Learn
        the platforms of an index once."""
        digest = str(manifest.digest)
        self._tag_asked((registry, repository, tag), digest, client, head)
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

    def record(self, image: str, client: str = "", *, digest: str | None = None,
               head: bool = False) -> None:
        """A tag request of ``registry/repository:tag`` answered by the lean path (as
        :meth:`tag_pulled`; platforms are not learnt this way)."""
        name, _, tag = image.rpartition(":")
        registry, _, repository = name.partition("/")
        if registry and repository and tag:
            self._tag_asked((registry, repository, tag), digest, client, head)

    def manifest_pulled(self, digest: str, client: str = "") -> None:
        """A client fetched a manifest by digest: the pull of the tag it resolved with a
        ``HEAD``, and the platform of an index's child we know."""
        resolved = self._resolved.pop((client, digest), None)
        if resolved is not None:
            self._count(self._tags, resolved, client, share=True)
        known = self._children.get(digest)
        if known is not None:
            self._count(self._platforms, known, client, share=False)

    def _tag_asked(self, key: Key, digest: str | None, client: str, head: bool) -> None:
        if not head:
            self._count(self._tags, key, client, share=True)
        elif digest is not None:
            self._resolved[(client, digest)] = key

    def _count(self, scores: _Scores, key: Key, client: str, *, share: bool) -> None:
        """Add one pull of ``key`` unless ``client`` counted it this window or has used
        its share of the window."""
        now = self._clock.time()
        window = scores.window
        last = self._counted.get((client, key))
        if last is not None and now - last < window:
            return
        if share:
            used = self._shares.get(client)
            if used is None or now - used[1] >= window:
                used = self._shares[client] = [0.0, now]
            if used[0] >= self._per_client:
                return
            used[0] += 1
        self._counted[(client, key)] = now
        scores.add(key, now)
        self.dirty = True

    # --- readers (the node's counts: this process's and the others' files) -------------
    def _ranked(self, which: str, now: float) -> list[tuple[Key, float]]:
        mine = self._tags if which == "tags" else self._platforms
        if not self._others:
            return mine.ranked(now)
        summed: dict[Key, float] = {}
        others = [tags if which == "tags" else platforms
                  for _mtime, tags, platforms in self._others.values()]
        for scores in (mine, *others):
            for key, item in scores.items.items():
                summed[key] = summed.get(key, 0.0) + scores.value(item, now)
        ranked = list(summed.items())
        ranked.sort(key=lambda pair: (-pair[1], pair[0]))
        return ranked

    def top(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` most pulled images as ``(registry/repository:tag, pulls)``, pulls
        rounded (the status page's interface)."""
        return [(f"{p.registry}/{p.repository}:{p.tag}", round(p.score))
                for p in self.top_tags(count)]

    def top_tags(self, n: int, registry: str | None = None) -> list[Popular]:
        """The ``n`` most-pulled tags (of one registry, or of all)."""
        now = self._clock.time()
        ranked = [(k, s) for k, s in self._ranked("tags", now) if registry in (None, k[0])]
        return [Popular(*key, score) for key, score in ranked[:n]]

    def platforms(self, registry: str, repository: str, limit: int = 4) -> list[str]:
        """The platforms pulled from a repository, most pulled first."""
        now = self._clock.time()
        found = [(k[2], s) for k, s in self._ranked("platforms", now)
                 if k[0] == registry and k[1] == repository]
        return [platform for platform, _ in found[:limit]]

    def repositories(self, registry: str) -> set[str]:
        """Every repository of a registry pulled here within the kept counts."""
        found = {k[1] for k in self._tags.items if k[0] == registry}
        for _mtime, tags, _platforms in self._others.values():
            found.update(k[1] for k in tags.items if k[0] == registry)
        return found

    def as_json(self, top: int = 100) -> dict[str, Any]:
        """The most-pulled tags and the platforms pulled per repository (admin API)."""
        now = self._clock.time()
        platforms: dict[str, dict[str, float]] = {}
        for (registry, repository, platform), score in self._ranked("platforms", now):
            platforms.setdefault(f"{registry}/{repository}", {})[platform] = round(score, 3)
        ranked = self._ranked("tags", now)
        return {"window_seconds": self._tags.window, "tracked_tags": len(ranked),
                "processes": 1 + len(self._others),
                "top": [Popular(*k, s).as_json() for k, s in ranked[:top]],
                "platforms": platforms}

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
        _fill(document, self._tags, self._platforms)
        self.prune()

    def read_others(self) -> None:
        """Read the counts the node's other processes saved beside ours (a file each,
        re-read when it changed). Blocking: run it in a thread."""
        if self.path is None:
            return
        found: dict[Path, tuple[float, _Scores, _Scores]] = {}
        for path in sorted(self.path.parent.glob(FILES)):
            if path == self.path:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            known = self._others.get(path)
            if known is not None and known[0] == mtime:
                found[path] = known
                continue
            tags = _Scores(self._tags.window, self._tags.max_entries)
            platforms = _Scores(self._tags.window, self._tags.max_entries)
            _fill(read_json(path), tags, platforms)
            found[path] = (mtime, tags, platforms)
        self._others = found  # one assignment: readers see the old or the new set


def _fill(document: Any, tags: _Scores, platforms: _Scores) -> None:
    """Scores from a saved snapshot, row by row (a file is never trusted whole)."""
    if not isinstance(document, dict) or document.get("version") != SNAPSHOT_VERSION:
        return
    for name, scores in (("tags", tags), ("platforms", platforms)):
        for row in document.get(name) or []:
            if isinstance(row, list) and len(row) == 5 and all(
                    isinstance(x, str) for x in row[:3]) and all(
                    isinstance(x, int | float) for x in row[3:]):
                scores.items[(row[0], row[1], row[2])] = [float(row[3]), float(row[4])]


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
