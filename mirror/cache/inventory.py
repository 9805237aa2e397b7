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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import diskcache

from mirror.cache.membership import FILE_NAME as MEMBERSHIP_FILE
from mirror.cache.membership import Membership
from mirror.cache.tags import tag_key
from mirror.config import StorageSettings, resolve_max_size
from mirror.errors import CacheCommandError, OciError
from mirror.oci import (
    HASH_HEX_LENGTH,
    Digest,
    is_digest_reference,
    parse_manifest,
    referenced_digests,
)
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


@dataclass
class Evicted:
    """What ``mirror cache evict`` did."""

    resolved: Resolved
    freed: int  # bytes
    kept_pinned: int  # entries kept because pinned
    kept_shared: int  # entries kept because other cached images use them


@dataclass(frozen=True)
class ImageRow:
    """One cached image (a tag record) as ``mirror cache ls`` lists it."""

    reference: str
    digest: str
    size: int  # bytes of its content still stored
    pins: tuple[str, ...]  # the sources of the pins on its manifest (``warm-until:...`` too)
    state: str  # "complete", "partial" (some blobs gone) or "evicted" (its manifest gone)
    missing_blobs: int = 0
    platforms: tuple[int, int] | None = None  # (held, listed) for a multi-platform index

    @property
    def pinned(self) -> bool:
        """Whether anything pins it (by hand, by ``mirror warm`` or a sync rule)."""
        return bool(self.pins)


#: Parses an image reference into (registry, repository, tag or digest).
RefParser = Callable[[str], tuple[str, str, str]]


class Inventory:
    """The cache of one storage folder, for an operator.

    A context manager: ``with Inventory(...) as inventory:`` closes the index (and the
    membership records, if read) at the end.

    Args:
        settings: the storage settings (its path and limits).
        parse_ref: turns an image reference into (registry, repository,
            reference) the way the server routes it; raises ``CacheCommandError``.
        registries: the configured registry names, for the breakdowns by registry.
    """

    def __init__(self, settings: StorageSettings, parse_ref: RefParser,
                 registries: Sequence[str] = ()) -> None:
        self.settings = settings
        self.store = FilesystemStore(settings.path)
        if not (settings.path / "index.db").is_file():
            raise CacheCommandError(f"no cache at {settings.path} (wrong --storage or --config?)")
        self.store.index.open()
        self._parse_ref = parse_ref
        self._registries = tuple(registries)
        self._membership: Membership | None = None

    def close(self) -> None:
        """Close the index and the membership records."""
        self.store.index.close()
        if self._membership is not None:
            self._membership.close()
            self._membership = None

    def __enter__(self) -> Inventory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _members(self) -> Membership | None:
        """The registries' membership records, or ``None`` when none were written yet."""
        path = self.settings.path / MEMBERSHIP_FILE
        if self._membership is None and path.is_file():
            self._membership = Membership(path)
            self._membership.open()
        return self._membership

    # --- reading -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tags(self) -> Iterator[Any]:
        cache = diskcache.Cache(str(self.store.tags))
        try:
            yield cache
        finally:
            cache.close()

    def images(self) -> list[ImageRow]:
        """Every tag record with what is left of its image and what pins it."""
        pins = self.store.index.pins()
        found = []
        with self._tags() as tags:
            records = [(str(key), tags.get(key)) for key in sorted(tags.iterkeys())]
        for key, record in records:
            if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
                continue
            found.append(self._row(key, record["digest"], pins))
        return found

    def _row(self, reference: str, root: str, pins: dict[str, list[str]]) -> ImageRow:
        keys, missing = self._tree(root)
        size = sum(e.size for e in self._entries(keys))
        sources = tuple(sorted(set(pins.get(root, [])) | {
            s for s in _sources(pins) if s == reference or s.endswith(f":{reference}")}))
        if ("manifest", root) not in keys:
            return ImageRow(reference, root, size, sources, "evicted")
        children = self._children(root)
        missing_blobs = len(missing - set(children))
        platforms = None
        if children:
            held = sum(1 for c in children if ("manifest", c) in keys)
            platforms = (held, len(children))
        whole = missing_blobs == 0 and (platforms is None or platforms[0] > 0)
        return ImageRow(reference, root, size, sources, "complete" if whole else "partial",
                        missing_blobs, platforms)

    def _children(self, root: str) -> list[str]:
        """The platform manifests an index lists (none for an image manifest)."""
        stored = self.store.read_manifest(_digest(root))
        if stored is None:
            return []
        try:
            document = parse_manifest(stored[0])
        except OciError:
            return []
        return [child for kind, child, _size in referenced_digests(document)
                if kind == "manifest"]

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

    def by_registry(self) -> dict[str, int]:
        """Bytes of content each configured registry (and ``other``) uses; content of
        several registries counts under each."""
        members = self._members()
        if members is None:
            return dict.fromkeys([*self._registries, "other"], 0)
        return members.bytes_by_registry(self.settings.path / "index.db", self._registries)

    def listing(self) -> dict[str, Any]:
        """What ``cache ls --json`` prints: images by registry, content with its
        registries and pins."""
        pins = self.pinned()
        members = self._members()
        owners = members.registries_of() if members is not None else {}
        by_registry: dict[str, list[dict[str, Any]]] = {}
        for row in self.images():
            registry = row.reference.split("/", 1)[0]
            by_registry.setdefault(registry, []).append(
                {"reference": row.reference, "digest": row.digest, "bytes": row.size,
                 "pinned": row.pinned, "pins": list(row.pins), "state": row.state,
                 "missing_blobs": row.missing_blobs,
                 "platforms": list(row.platforms) if row.platforms else None})
        content = [{"kind": e.kind, "digest": e.digest, "bytes": e.size,
                    "last_use": e.last_use, "pinned": e.digest in pins,
                    "registries": sorted(owners.get(e.digest, ()))}
                   for e in self.entries()]
        return {"images": by_registry, "content": content}

    def disk_usage(self) -> dict[str, Any]:
        """What ``cache du --json`` prints: :meth:`usage`, the folder, the limit ``serve``
        would choose now (``max_size_from``: config, auto or none) and the bytes by
        registry."""
        usage = self.usage()
        total = usage["blob_bytes"] + usage["manifest_bytes"]
        storage = resolve_max_size(self.settings, total)  # as `serve` would choose
        origin = ("auto" if storage.max_size_auto else "config") if storage.max_size \
            else "none"
        return {**usage, "path": str(storage.path), "max_size": storage.max_size,
                "max_size_from": origin, "by_registry": self.by_registry()}

    def label(self, text: str) -> tuple[str, tuple[str, str, str] | None]:
        """What ``text`` names, normalised once for every command: a digest, or the
        canonical ``registry/repository:tag`` (``@digest``) and its parts.

        Every form Docker accepts names the same image: ``nginx:1.27``,
        ``library/nginx:1.27``, ``docker.io/nginx:1.27``,
        ``docker.io/library/nginx:1.27``, ``nginx@sha256:...``; a bare
        ``sha256:...`` is a digest.

        Raises:
            CacheCommandError: neither a digest nor an image this mirror serves.
        """
        text = text.strip()
        if "/" not in text and "@" not in text and text.partition(":")[0] in HASH_HEX_LENGTH:
            return str(_digest(text)), None
        registry, repository, reference = self._parse_ref(text)
        sep = "@" if is_digest_reference(reference) else ":"
        return f"{registry}/{repository}{sep}{reference}", (registry, repository, reference)

    def resolve(self, text: str) -> Resolved:
        """The stored tree an image reference or a digest names.

        Raises:
            CacheCommandError: the reference is invalid, or names nothing cached.
        """
        label, ref = self.label(text)
        if ref is None:
            keys, missing = self._tree(label)
            keys |= {e.key for e in self.store.index.find(label)}
            if not keys:
                raise CacheCommandError(f"{label} is not cached")
            return Resolved(label, label, keys, missing)
        registry, repository, reference = ref
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

    def unpin(self, text: str) -> tuple[str, int]:
        """Drop the pins ``text`` made (in any form that names the same image).

        Returns:
            The normalised label, and how many pins went.
        """
        label, _ = self.label(text)
        return label, self.store.index.unpin(label)

    def evict(self, text: str, *, shared: bool = False) -> Evicted:
        """Delete what ``text`` names, except pinned content and, unless ``shared``,
        content that other cached images use too (a base layer, a config).

        Returns:
            What was named, bytes freed, and what was kept and why.
        """
        resolved = self.resolve(text)
        pins = self.store.index.pins()
        entries = self._entries(resolved.keys)
        others = set() if shared else self._used_elsewhere(resolved)
        victims = [e for e in entries if e.digest not in pins and e.key not in others]
        freed = self.store.evict(victims)
        self.store.index.bump_generation()
        if resolved.tag is not None and ("manifest", resolved.root) not in {
                e.key for e in entries if e.digest in pins}:
            with self._tags() as tags:
                tags.delete(resolved.tag)
        pinned = sum(1 for e in entries if e.digest in pins)
        return Evicted(resolved, freed, pinned, len(entries) - len(victims) - pinned)

    def _used_elsewhere(self, resolved: Resolved) -> set[Key]:
        """The part of ``resolved`` that other cached images reach too: from the tag
        records of other digests, and from stored manifests outside its tree."""
        roots = {m.digest for m in self.store.index.all()
                 if m.kind == "manifest" and m.key not in resolved.keys}
        with self._tags() as tags:
            for key in tags.iterkeys():
                record = tags.get(key)
                # Another tag of the same digest is the same image, not another one.
                if isinstance(record, dict) and record.get("digest") not in (None, resolved.root):
                    roots.add(record["digest"])
        used: set[Key] = set()
        for root in roots:
            with contextlib.suppress(CacheCommandError):
                used |= self._tree(root)[0] & resolved.keys
        return used

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
