"""``mirror import``: an OCI layout tar (ours or another tool's) into the cache, verified.

::

    stage    read the tar in order, zstd in bounded steps; every blob not already cached
             goes to a temp file through the one blob writer (hashed as written, checked
             against its name, fsync'ed); small files (oci-layout, index.json, bundle.json,
             .sig) in memory, size-capped, as raw bytes
    check    the signature (--verify-key, or import.trusted_keys) over bundle.json's raw
             bytes before they are parsed and before the first blob is staged; every JSON
             document depth- and size-checked before parsing; bundle.json's sha256 of every
             small file and its list of blobs; the layout version; every manifest reachable
             from index.json, and every blob they need, is in the bundle or in the cache,
             else fail listing the missing digests
    apply    blobs some manifest of the bundle references published by rename (others are
             dropped), then manifests (children before parents), pins, and last the tag
             records: a tag a signer's newer bundle set is left alone (rollback)
    policy   with the site's ``policy:`` (a gate), before apply: every named image judged
             offline with the signatures the bundle carries (:mod:`policycheck`); in
             enforce mode a refused image's tags are not recorded and what only it (and its
             signatures) reach is not published; warn mode imports it with a warning

Nothing is published before everything is checked, so a bad bundle changes nothing. A
``kill -9`` leaves temp files (removed by the next import or server start) and, during
apply, only complete verified content: the next run skips it and finishes the job.
Runs in the CLI process, beside a server if one runs (the index is SQLite in WAL mode,
tag records are diskcache): it blocks, and is not for an event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diskcache
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mirror.bundle import layout
from mirror.bundle.manifest import BundleManifest, verify
from mirror.bundle.parts import WRITEBACK_EVERY, Input, start_writeback
from mirror.bundle.policycheck import excluded, judge_images, refused_labels
from mirror.bundle.provenance import Provenance, Stamp
from mirror.bundle.walk import Walk, check_reference, parse_digest
from mirror.bundle.walk import tree as walk_tree
from mirror.cache.membership import FILE_NAME as MEMBERSHIP_FILE
from mirror.cache.membership import Membership
from mirror.cache.tags import TagRecord, tag_key
from mirror.errors import BundleError, DigestMismatch, OciError
from mirror.oci import (
    Digest,
)
from mirror.policy.gate import Gate
from mirror.routing import Router
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.writer import TempWriter

TEMP_PREFIX = "import-"
TAG_STATES = ("fresh", "stale")


@dataclass
class Report:
    """What one bundle's import did."""

    bundle_id: str | None = None
    sequence: int | None = None
    key_id: str | None = None
    signed: bool = False
    blobs_new: int = 0
    bytes_new: int = 0
    skipped: int = 0
    manifests_new: int = 0
    tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pinned: int = 0
    unreferenced: int = 0  # blobs of the bundle no manifest references: not published
    kept: list[str] = field(default_factory=list)  # tags left alone: a newer bundle set them
    refused: list[str] = field(default_factory=list)  # images the policy refused, one line each
    warned: list[str] = field(default_factory=list)  # images a warn rule let in, one line each
    withheld: int = 0  # blobs and manifests not published: only refused images reach them


@dataclass
class _Read:
    """What the stage pass found."""

    small: dict[str, bytes] = field(default_factory=dict)
    staged: dict[str, tuple[Path, int]] = field(default_factory=dict)  # digest -> temp, size
    cached: set[str] = field(default_factory=set)  # blobs of the layout already here
    bundle: BundleManifest | None = None
    key_id: str | None = None
    checked: bool = False  # signature checked and bundle.json parsed (before any blob)


class Importer:
    """Imports bundles into one storage folder.

    Args:
        store: the storage, opened with :meth:`FilesystemStore.open_shared`.
        router: resolves the registries and repositories the bundle names.
        verify_key: refuse a bundle not signed by this key.
        trusted_keys: refuse a bundle not signed by one of these (``import.trusted_keys``;
            ``verify_key``, when given, is the one accepted).
        allow_rollback: move a tag even when a newer bundle of the same signer set it.
        pin: pin every imported image (never evicted).
        tag_state: ``fresh``: tags answered without upstream for ``tag_ttl`` after the
            import; ``stale``: revalidated upstream at their first pull when it is
            reachable. Either way served while upstream is unreachable (``stale_if_error``).
        repository: ``REGISTRY/REPO`` for layouts whose ref names are bare tags.
        gate: the site's signature policy: every named image is judged with the
            signatures the bundle carries, before anything is published.
    """

    def __init__(self, store: FilesystemStore, router: Router, *,
                 verify_key: Ed25519PublicKey | None = None,
                 trusted_keys: Sequence[Ed25519PublicKey] = (), allow_rollback: bool = False,
                 pin: bool = False,
                 tag_state: str = "fresh", tag_ttl: float = 300.0,
                 repository: str | None = None, gate: Gate | None = None,
                 progress: Callable[[int, int], None] = lambda _d, _t: None,
                 clock: Callable[[], float] = time.time) -> None:
        if tag_state not in TAG_STATES:
            raise BundleError(f"tag state {tag_state!r}: expected fresh or stale")
        self._store = store
        self._router = router
        self._keys = (verify_key,) if verify_key is not None else tuple(trusted_keys)
        self._allow_rollback = allow_rollback
        self._pin = pin
        self._tag_state = tag_state
        self._tag_ttl = tag_ttl
        self._repository = repository
        self._gate = gate
        self.progress = progress
        self._clock = clock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One import at a time per cache; temp files of a killed import are removed.

        Raises:
            BundleError: another import holds the lock.
        """
        with (self._store.root / "import.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BundleError("another mirror import is running on this cache") from None
            for stale in self._store.tmp.glob(f"{TEMP_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            yield

    def run(self, files: list[Path]) -> Report:
        """Import one bundle (one file, or its parts in order).

        Raises:
            BundleError: the bundle is bad or incomplete; nothing was published.
        """
        read = _Read()
        try:
            self._stage(files, read)
            report = Report(signed=layout.SIGNATURE in read.small, key_id=read.key_id)
            self._apply(read, self._check(read), report)
        finally:
            for temp, _ in read.staged.values():
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        return report

    # --- stage -----------------------------------------------------------------------------
    def _stage(self, files: list[Path], read: _Read) -> None:
        stream = Input(files)
        try:
            tar, source = layout.open_stream(stream)
            for name, member in layout.entries(tar):
                if name in layout.SMALL_MAX:
                    # Raw bytes only: bundle.json is parsed once its signature verified.
                    read.small[name] = layout.read_small(tar, name, member)
                    continue
                match = layout.BLOB_NAME.fullmatch(name)
                if match is None:
                    continue  # not part of a layout (oras's ingest/ leftovers): never used
                self._before_blobs(read)
                digest = parse_digest(f"{match.group(1)}:{match.group(2)}", name)
                self._entry(tar, member, digest, read)
                self.progress(stream.read_bytes, stream.total)
            layout.drain(source)
            self._before_blobs(read)
            self.progress(stream.total, stream.total)
        finally:
            stream.close()

    def _before_blobs(self, read: _Read) -> None:
        """The signature is checked before any blob is staged, over bundle.json's raw
        bytes, and only then are they parsed."""
        if read.checked:
            return
        if self._keys:
            read.key_id = verify(read.small.get(layout.BUNDLE), read.small.get(layout.SIGNATURE),
                                 self._keys)
        if layout.BUNDLE in read.small:
            read.bundle = BundleManifest.parse(read.small[layout.BUNDLE])
        read.checked = True

    def _entry(self, tar: Any, member: Any, digest: Digest, read: _Read) -> None:
        text = str(digest)
        if read.bundle is not None:
            listed = read.bundle.blobs.get(text)
            if listed is None:
                raise BundleError(f"blobs/{digest.algorithm}/{digest.hex} is not listed in "
                                  "bundle.json")
            if listed != member.size:
                raise BundleError(f"{text} is {member.size} bytes; bundle.json says {listed}")
        if self._store.blob_size(digest) is not None or \
                self._store.manifest_path(digest).is_file():
            read.cached.add(text)
            return
        read.staged[text] = (self._write(tar, member, digest), member.size)

    def _write(self, tar: Any, member: Any, digest: Digest) -> Path:
        fd, name = tempfile.mkstemp(dir=self._store.tmp, prefix=TEMP_PREFIX)
        os.close(fd)
        writer = TempWriter(Path(name), digest)
        kick = os.open(name, os.O_RDONLY)
        try:
            handle = tar.extractfile(member)
            flushed = 0
            while chunk := handle.read(layout.CHUNK):
                writer.write(chunk)
                if writer.size - flushed >= WRITEBACK_EVERY:
                    start_writeback(kick, flushed, writer.size - flushed)
                    flushed = writer.size
            # Synced in apply, just before its rename: the disk writes meanwhile.
            writer.verify_and_close(None, member.size, sync=False)
        except DigestMismatch:
            writer.discard()
            raise BundleError(f"blob {digest} does not hash to its name (tampered or "
                              "damaged)") from None
        except (tarfile.TarError, EOFError) as exc:
            writer.discard()
            raise BundleError(f"the bundle is truncated or corrupt: {exc}") from None
        except BaseException:
            writer.discard()
            raise
        finally:
            os.close(kick)
        return Path(name)

    # --- check -----------------------------------------------------------------------------
    def _check(self, read: _Read) -> Walk:
        bundle = read.bundle
        if bundle is not None:  # the raw bytes first: parsed only when they are the signed ones
            for name in (layout.OCI_LAYOUT, layout.INDEX):
                if name in read.small:  # a missing one is named just below
                    bundle.check_file(name, read.small[name])
        layout.check_layout(read.small.get(layout.OCI_LAYOUT))
        descriptors = layout.parse_index(read.small.get(layout.INDEX))
        if bundle is not None:
            unlisted = [d for d in [*read.staged, *read.cached] if d not in bundle.blobs]
            if unlisted:  # bundle.json came after them: checked here instead
                raise BundleError(f"{unlisted[0]} is in the archive but not listed in "
                                  "bundle.json")
            absent = [d for d in bundle.blobs if d not in read.staged and d not in read.cached]
            if absent:
                raise BundleError(f"the bundle is truncated: bundle.json lists {len(absent)} "
                                  f"blob(s) the archive does not hold: {', '.join(absent)}")
        listed = bundle.blobs.keys() | bundle.omitted.keys() if bundle is not None else set()
        walk = Walk(self._store, read.staged, set(listed))
        for descriptor in descriptors:
            walk.visit(descriptor, required=True)
        if bundle is not None:
            for digest in bundle.omitted:
                if not walk.have(digest):
                    walk.missing.add(digest)
        if walk.missing:
            raise BundleError(f"{len(walk.missing)} item(s) this bundle needs are neither in "
                              "it nor in the cache (import the bundles it is based on first): "
                              + ", ".join(sorted(walk.missing)))
        for ref in bundle.references if bundle is not None else []:
            check_reference(ref, walk.manifests)
        return walk

    # --- apply -----------------------------------------------------------------------------
    def _apply(self, read: _Read, walk: Walk, report: Report) -> None:
        manifests, order = walk.manifests, walk.order
        if read.bundle is not None:
            report.bundle_id, report.sequence = read.bundle.id, read.bundle.sequence
        report.skipped = len(read.cached)
        refs = self._references(read, manifests, report)
        gone, skipped = self._judge(read, refs, manifests, report)
        refs = [ref for ref in refs if ref[0] not in skipped]
        for digest, (temp, size) in list(read.staged.items()):
            if digest in gone:
                report.withheld += 1  # only refused images reach it
            elif digest not in manifests and digest not in walk.referenced:
                report.unreferenced += 1  # junk riding along: never published
            elif digest not in manifests:
                _fsync(temp)
                self._store.publish_blob(temp, Digest.parse(digest))
                report.blobs_new += 1
                report.bytes_new += size
        for digest in order:
            if digest in gone:
                continue
            if not self._store.manifest_path(Digest.parse(digest)).is_file():
                data, media_type = manifests[digest]
                self._store.write_manifest(Digest.parse(digest), data, media_type)
                report.manifests_new += 1
                report.bytes_new += len(data)
        if self._pin:
            for label, digest in refs:
                tree = walk_tree(digest, manifests)
                self._store.index.pin(sorted(tree), label)
                report.pinned += 1
        self._record_tags(refs, manifests, report, self._stamp(read))
        self._record_members(refs, manifests)
        if report.unreferenced:
            report.notes.append(f"{report.unreferenced} blob(s) of the bundle that no manifest "
                                "references were not imported")

    def _judge(self, read: _Read, refs: list[tuple[str, str]],
               manifests: dict[str, tuple[bytes, str]],
               report: Report) -> tuple[set[str], set[str]]:
        """The policy's verdict on every named image: the digests not to publish, and the
        labels not to record (refused images and their signatures' tags)."""
        if self._gate is None or not refs:
            return set(), set()
        judged = judge_images(self._gate, refs, manifests,
                              lambda digest, limit: self._small_blob(read, digest, limit))
        report.refused = [r.line() for r in judged.refused]
        report.warned = [r.line() for r in judged.warned]
        roots = [d["digest"] for d in layout.parse_index(read.small.get(layout.INDEX))]
        gone = excluded(refs, judged.refused, manifests, roots)
        return gone, refused_labels(refs, judged.refused, gone)

    def _small_blob(self, read: _Read, digest: str, limit: int) -> bytes | None:
        """A blob of the bundle (staged, hashed on the way) or of the cache, up to ``limit``
        bytes (``None``: absent or larger)."""
        staged = read.staged.get(digest)
        try:
            path = staged[0] if staged is not None else \
                self._store.blob_path(Digest.parse(digest))
            with path.open("rb") as file:
                data = file.read(limit + 1)
        except (OSError, OciError):
            return None
        return data if len(data) <= limit else None

    @staticmethod
    def _stamp(read: _Read) -> tuple[str, Stamp] | None:
        """The signer and stamp of a verified bundle, for rollback protection."""
        if read.key_id is None or read.bundle is None:
            return None
        bundle = read.bundle
        return read.key_id, Stamp(bundle.created, bundle.sequence, bundle.id)

    def _references(self, read: _Read, manifests: dict[str, tuple[bytes, str]],
                    report: Report) -> list[tuple[str, str]]:
        """``(registry/repository:tag or @digest, digest)`` of every named image."""
        found: list[tuple[str, str]] = []
        if read.bundle is not None:
            for ref in read.bundle.references:
                upstream = self._router.lookup(ref["registry"])
                if upstream is None:
                    report.notes.append(f"{ref['name']}: registry {ref['registry']!r} is not "
                                        "configured here; its content is imported, its tag "
                                        "is not recorded")
                    continue
                sep, what = (":", ref["tag"]) if ref.get("tag") else ("@", ref["digest"])
                found.append((f"{upstream.name}/{ref['repository']}{sep}{what}",
                              ref["digest"]))
            return found
        for descriptor in layout.parse_index(read.small.get(layout.INDEX)):
            annotations = descriptor.get("annotations") or {}
            name = annotations.get(layout.CONTAINERD_NAME) or annotations.get(layout.REF_NAME)
            if isinstance(name, str) and descriptor["digest"] in manifests:
                label = self._foreign_name(name, report)
                if label is not None:
                    found.append((label, descriptor["digest"]))
        return found

    def _foreign_name(self, name: str, report: Report) -> str | None:
        if "/" not in name and ":" not in name and "@" not in name:
            if self._repository is None:
                report.notes.append(f"ref name {name!r} is only a tag: pass --repository "
                                    "REGISTRY/REPO to record it")
                return None
            name = f"{self._repository}:{name}"
        try:
            target = self._router.image(name)
        except OciError as exc:
            report.notes.append(f"ref name {name!r}: {exc.message}; content imported, tag "
                                "not recorded")
            return None
        assert target.upstream is not None
        sep = "@" if target.digest is not None else ":"
        return f"{target.upstream.name}/{target.repository}{sep}{target.reference}"

    def _record_tags(self, refs: list[tuple[str, str]],
                     manifests: dict[str, tuple[bytes, str]], report: Report,
                     signed: tuple[str, Stamp] | None) -> None:
        now = self._clock()
        fetched_at = now if self._tag_state == "fresh" else now - self._tag_ttl - 1
        provenance = Provenance(self._store.root)
        cache = diskcache.Cache(str(self._store.tags))
        try:
            for label, digest in refs:
                if "@" in label:
                    continue
                if signed is not None:
                    if not self._may_move(provenance, label, signed, report):
                        continue
                    provenance.record(label, *signed, digest)
                data, media_type = manifests[digest]
                name, _, tag = label.rpartition(":")
                registry, _, repository = name.partition("/")
                record = TagRecord(digest, media_type, len(data), fetched_at)
                cache.set(tag_key(registry, repository, tag), asdict(record))
                report.tags.append(label)
        finally:
            cache.close()
        if signed is not None:
            provenance.save()

    def _may_move(self, provenance: Provenance, label: str, signed: tuple[str, Stamp],
                  report: Report) -> bool:
        """Whether this signed bundle may set ``label``: not older than the last bundle of
        the same signer that set it, unless rollback is allowed."""
        key, stamp = signed
        newer = provenance.newer(label, key, stamp)
        if newer is None or self._allow_rollback:
            return True
        report.kept.append(label)
        report.notes.append(f"{label}: left alone: this bundle (created {stamp.created}, seq "
                            f"{stamp.sequence}) is older than bundle {newer.bundle} (created "
                            f"{newer.created}, seq {newer.sequence}) of the same signer that "
                            "set it (--allow-rollback moves it back)")
        return False

    def _record_members(self, refs: list[tuple[str, str]],
                        manifests: dict[str, tuple[bytes, str]]) -> None:
        """The registry and repository of each named image hold all it reaches (isolation
        by registry: what is served where), so an offline node serves it by digest too."""
        members = Membership(self._store.root / MEMBERSHIP_FILE)
        members.open()
        try:
            for label, digest in refs:
                name = label.partition("@")[0] if "@" in label else label.rpartition(":")[0]
                registry, _, repository = name.partition("/")
                members.record_now(registry, repository, sorted(walk_tree(digest, manifests)))
        finally:
            members.close()


def read_bundle_json(files: list[Path]) -> bytes:
    """The ``bundle.json`` of a bundle (read from its start; the rest is not read).

    Raises:
        BundleError: not a bundle, or one without bundle.json before its blobs.
    """
    stream = Input(files)
    try:
        tar, _ = layout.open_stream(stream)
        for name, member in layout.entries(tar):
            if name == layout.BUNDLE:
                return layout.read_small(tar, name, member)
            if name.startswith("blobs/"):
                break
    finally:
        stream.close()
    raise BundleError(f"{files[0]}: no bundle.json (not made by mirror export)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
