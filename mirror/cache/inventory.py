"""What ``mirror cache`` shows and does: list, usage, pins, eviction, fsck.

These run in the CLI process, possibly while a server uses the same folder:
they touch only the index (SQLite in WAL mode, safe across processes), the
tag records (diskcache, also SQLite) and verified files, never ``tmp/``. A
running server notices their changes: a blob deleted here is fetched again
on its next request, and the server re-reads the totals every few seconds.
Everything here blocks; it is not for the event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import diskcache

from mirror.cache.tags import tag_key
from mirror.config import StorageSettings
from mirror.errors import CacheCommandError, OciError
from mirror.oci import Digest, is_digest_reference, parse_manifest, referenced_digests
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import Entry, Key


@dataclass
class Resolved:
    """What an image reference or a digest names in the cache."""

    label: str  # what the operator typed, normalised (the pin's source)
    root: str  # the digest it points to
    keys: set[Key] = field(default_factory=set)  # stored content in its tree
    missing: set[str] = field(default_factory=set)  # referenced but not stored
    tag: str | None = None  # the tag record key, for an image by tag


#: Parses an image reference into (registry, repository, tag or digest).
RefParser = Callable[[str], tuple[str, str, str]]


class Inventory:
    """The cache of one storage folder, for an operator.

    Args:
        settings: the storage settings (its path and limits).
        parse_ref: turns an image reference into (registry, repository,
            reference) the way the server routes it; raises ``CacheCommandError``.
    """

    def __init__(self, settings: StorageSettings, parse_ref: RefParser) -> None:
        self.settings = settings
        self.store = FilesystemStore(settings.path)
        if not (settings.path / "index.db").is_file():
            raise CacheCommandError(f"no cache at {settings.path} (wrong --storage or --config?)")
        self.store.index.open()
        self._parse_ref = parse_ref

    def close(self) -> None:
        """Close the index."""
        self.store.index.close()

    # --- reading -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tags(self) -> Iterator[Any]:
        cache = diskcache.Cache(str(self.store.tags))
        try:
            yield cache
        finally:
            cache.close()

    def images(self) -> list[tuple[str, str, int, bool]]:
        """``(reference, digest, cached bytes, pinned)`` of every tag record."""
        pins = self.store.index.pins()
        found = []
        with self._tags() as tags:
            for key in sorted(tags.iterkeys()):
                record = tags.get(key)
                if not isinstance(record, dict) or "digest" not in record:
                    continue
                keys, _ = self._tree(record["digest"])
                size = sum(e.size for e in self._entries(keys))
                found.append((str(key), record["digest"], size, key in _sources(pins)))
        return found

    def entries(self) -> list[Entry]:
        """Every stored blob and manifest, most recently used first."""
        return self.store.index.all()

    def pinned(self) -> dict[str, list[str]]:
        """Pinned digests and what pinned them."""
        return self.store.index.pins()

    def usage(self) -> dict[str, int]:
        """Bytes and entries by kind, pinned bytes, bytes of downloads in progress."""
        usage = {"blob_bytes": 0, "blobs": 0, "manifest_bytes": 0, "manifests": 0}
        for entry in self.store.index.all():
            usage[f"{entry.kind}_bytes"] += entry.size
            usage[f"{entry.kind}s"] += 1
        usage["pinned_bytes"] = self.store.index.pinned_bytes()
        usage["downloading_bytes"] = sum(p.stat().st_size for p in self.store.tmp.glob("*")
                                         if p.is_file()) if self.store.tmp.is_dir() else 0
        return usage

    def resolve(self, text: str) -> Resolved:
        """The stored tree an image reference or a digest names.

        Raises:
            CacheCommandError: the reference is invalid, or names nothing cached.
        """
        text = text.strip()
        if is_digest_reference(text) and "/" not in text and "@" not in text:
            digest = str(_digest(text))
            keys, missing = self._tree(digest)
            keys |= {e.key for e in self.store.index.find(digest)}
            if not keys:
                raise CacheCommandError(f"{digest} is not cached")
            return Resolved(digest, digest, keys, missing)
        registry, repository, reference = self._parse_ref(text)
        label = f"{registry}/{repository}{'@' if is_digest_reference(reference) else ':'}" \
                f"{reference}"
        tag = None
        if is_digest_reference(reference):
            root = reference
        else:
            tag = tag_key(registry, repository, reference)
            with self._tags() as tags:
                record = tags.get(tag)
            if not isinstance(record, dict) or "digest" not in record:
                raise CacheCommandError(f"{label} is not cached (no pull of it went through "
                                        "this mirror)")
            root = record["digest"]
        keys, missing = self._tree(root)
        if ("manifest", root) not in keys:
            raise CacheCommandError(f"{label} is not cached (its manifest {root} is not stored)")
        return Resolved(label, root, keys, missing, tag)

    def _tree(self, root: str) -> tuple[set[Key], set[str]]:
        """Stored content reachable from a manifest digest, and what is missing."""
        keys: set[Key] = set()
        missing: set[str] = set()
        pending = [root]
        while pending:
            text = pending.pop()
            digest = _digest(text)
            stored = self.store.read_manifest(digest)
            if stored is None:
                missing.add(text)
                continue
            keys.add(("manifest", text))
            try:
                document = parse_manifest(stored[0])
            except OciError:
                continue
            for kind, child, _size in referenced_digests(document):
                if kind == "manifest":
                    pending.append(child)
                elif self.store.index.get("blob", child) is not None:
                    keys.add(("blob", child))
                else:
                    missing.add(child)
        return keys, missing

    def _entries(self, keys: set[Key]) -> list[Entry]:
        found = (self.store.index.get(kind, digest) for kind, digest in keys)
        return [e for e in found if e is not None]

    # --- changing -------------------------------------------------------------------------
    def pin(self, text: str) -> tuple[Resolved, int]:
        """Pin what ``text`` names; returns it and the bytes now pinned by it."""
        resolved = self.resolve(text)
        digests = {d for _, d in resolved.keys} | {resolved.root}
        self.store.index.pin(sorted(digests), resolved.label)
        return resolved, sum(e.size for e in self._entries(resolved.keys))

    def unpin(self, text: str) -> int:
        """Drop the pins ``text`` made; returns how many pins went."""
        label = text.strip()
        count = self.store.index.unpin(label)
        if count == 0 and not is_digest_reference(label.split("/")[-1].split("@")[0]):
            with contextlib.suppress(CacheCommandError):
                registry, repository, reference = self._parse_ref(label)
                sep = "@" if is_digest_reference(reference) else ":"
                count = self.store.index.unpin(f"{registry}/{repository}{sep}{reference}")
        return count

    def evict(self, text: str) -> tuple[Resolved, int, int]:
        """Delete what ``text`` names, except pinned content.

        Returns:
            What was named, bytes freed, and how many entries were kept because pinned.
        """
        resolved = self.resolve(text)
        pins = self.store.index.pins()
        entries = self._entries(resolved.keys)
        victims = [e for e in entries if e.digest not in pins]
        freed = self.store.evict(victims)
        self.store.index.bump_generation()
        if resolved.tag is not None and ("manifest", resolved.root) not in {
                e.key for e in entries if e.digest in pins}:
            with self._tags() as tags:
                tags.delete(resolved.tag)
        return resolved, freed, len(entries) - len(victims)

    def fsck(self) -> dict[str, Any]:
        """Re-hash everything stored; remove what does not match; repair the index.

        Returns:
            Counts of what was checked, adopted, dropped and removed, and the
            digests removed.
        """
        report: dict[str, Any] = {"checked": 0, "bytes": 0, "removed": [], "dropped": 0,
                                  "adopted": 0}
        present, unknown = self.store.scan()
        known = {e.key: e for e in self.store.index.all()}
        report["dropped"] = len([k for k in known if k not in present])
        self.store.index.remove(k for k in known if k not in present)
        for kind, text in sorted(present):
            size = unknown[(kind, text)][0] if (kind, text) in unknown else known[(kind, text)].size
            if (kind, text) not in known:
                self.store.index.add(kind, text, size, verified=False,
                                     last_use=unknown[(kind, text)][1])
                report["adopted"] += 1
            ok = self.store.verify(kind, Digest.parse(text))
            if ok is None:
                continue
            report["checked"] += 1
            report["bytes"] += size
            if not ok:
                report["removed"].append(f"{kind} {text}")
        if report["removed"]:
            self.store.index.bump_generation()
        return report


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except OciError as exc:
        raise CacheCommandError(exc.message) from None


def _sources(pins: dict[str, list[str]]) -> set[str]:
    return {s for sources in pins.values() for s in sources}


def human_size(size: int) -> str:
    """``1.5 GiB`` and friends."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_time(when: float, now: float | None = None) -> str:
    """A timestamp as UTC ISO-8601 with its age, e.g. ``2026-01-02T03:04:05Z (5m ago)``."""
    age = max((time.time() if now is None else now) - when, 0)
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for seconds, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if age >= seconds:
            return f"{stamp} ({age // seconds:.0f}{unit} ago)"
    return f"{stamp} ({age:.0f}s ago)"
