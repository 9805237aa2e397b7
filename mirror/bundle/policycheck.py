"""``mirror import``'s policy check: every image of a bundle judged offline by the site's
:class:`~mirror.policy.gate.Gate`, with the signatures the bundle itself carries.

::

    judge_images(gate, refs, manifests, read_blob) -> Judged (refused, warned)
      per repository, a SignatureReader over the bundle's staged content: tags from the
      bundle's references (cosign's sha256-<hex>.sig, the referrers fallback tag), manifests
      from the walk, blobs from the staged temp files or the cache; referrers from the
      subjects of the bundle's manifests. No network.
    excluded(refs, refused, manifests, roots) -> digests not to publish: the trees of the
      refused images and of their signatures, minus what an imported image reaches

Runs before anything is published, so a refused image leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mirror.bundle.walk import tree
from mirror.oci import parse_manifest
from mirror.policy.gate import Found, Gate
from mirror.policy.model import BUNDLE_TYPES, MAX_INDEX_BYTES, Verdict

#: Reads a blob of the bundle or the cache: ``(digest, limit) -> bytes`` (``None``: absent
#: or larger than ``limit``).
BlobReader = Callable[[str, int], "bytes | None"]

_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ATTACHED = re.compile(r"sha256-([0-9a-f]{64})(?:\.(?:sig|att|sbom))?")


@dataclass(frozen=True)
class Refusal:
    """One image the policy refused (or warned about): its label, digest and the reason."""

    label: str
    digest: str
    reason: str

    def line(self) -> str:
        """``LABEL (DIGEST): policy: rule N: REASON`` in one line."""
        return f"{self.label} ({self.digest[:19]}...): policy: {self.reason}"


@dataclass
class Judged:
    """The verdicts on a bundle's images."""

    refused: list[Refusal] = field(default_factory=list)
    warned: list[Refusal] = field(default_factory=list)


class BundleSignatures:
    """The gate's reader over one repository of a bundle (what export carried)."""

    def __init__(self, tags: Mapping[str, str], manifests: Mapping[str, tuple[bytes, str]],
                 subjects: Mapping[str, list[dict[str, object]]], read_blob: BlobReader) -> None:
        self._tags = tags
        self._manifests = manifests
        self._subjects = subjects
        self._read_blob = read_blob

    async def manifest(self, reference: str) -> Found | None:
        digest = reference if reference.startswith("sha256:") else self._tags.get(reference)
        if digest is None or digest not in self._manifests:
            return None
        return Found(digest, self._manifests[digest][0])

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        if size > limit:
            return None
        data = self._read_blob(digest, limit)
        if data is None or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return None
        return data

    async def referrers(self, digest: str) -> Found | None:
        listed = self._subjects.get(digest)
        if listed:
            body = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
            return Found("sha256:" + hashlib.sha256(body).hexdigest(), body)
        fallback = self._tags.get(digest.replace(":", "-", 1))  # cosign's fallback index tag
        if fallback is None or fallback not in self._manifests:
            return None
        data = self._manifests[fallback][0]
        return Found(fallback, data) if len(data) <= MAX_INDEX_BYTES else None


def subjects(manifests: Mapping[str, tuple[bytes, str]],
             artifact_types: tuple[str, ...] | None = BUNDLE_TYPES,
             ) -> dict[str, list[dict[str, object]]]:
    """Referrers among the bundle's manifests (sigstore bundles; every kind with ``None``),
    by subject digest (what the referrers API would list), as index descriptors."""
    found: dict[str, list[dict[str, object]]] = {}
    for digest, (data, media_type) in manifests.items():
        if b'"subject"' not in data:
            continue
        doc = parse_manifest(data)
        subject, config = doc.get("subject"), doc.get("config")
        artifact = doc.get("artifactType") or (config.get("mediaType")
                                               if isinstance(config, dict) else None)
        if isinstance(subject, dict) and isinstance(subject.get("digest"), str) \
                and (artifact_types is None or artifact in artifact_types):
            found.setdefault(subject["digest"], []).append(
                {"mediaType": media_type, "digest": digest, "size": len(data),
                 "artifactType": artifact})
    return found


def split_label(label: str) -> tuple[str, str, str | None]:
    """``registry/repo:tag`` or ``registry/repo@digest`` -> registry, repository, tag."""
    if "@" in label:
        name, tag = label.partition("@")[0], None
    else:
        name, _, tag = label.rpartition(":")
    registry, _, repository = name.partition("/")
    return registry, repository, tag


def judge_images(gate: Gate, refs: list[tuple[str, str]],
                 manifests: Mapping[str, tuple[bytes, str]], read_blob: BlobReader) -> Judged:
    """The gate's verdict on every named image of a bundle (blocks: runs its own loop)."""
    return asyncio.run(_judge(gate, refs, manifests, read_blob))


async def _judge(gate: Gate, refs: list[tuple[str, str]],
                 manifests: Mapping[str, tuple[bytes, str]], read_blob: BlobReader) -> Judged:
    tags: dict[tuple[str, str], dict[str, str]] = {}
    for label, digest in refs:
        registry, repository, tag = split_label(label)
        if tag is not None:
            tags.setdefault((registry, repository), {})[tag] = digest
    referrers = subjects(manifests)
    judged = Judged()
    # Indexes first: a platform manifest named by digest passes through its signed index.
    ordered = sorted(refs, key=lambda ref: manifests[ref[1]][1] not in _INDEX_TYPES)
    for label, digest in ordered:
        registry, repository, tag = split_label(label)
        reader = BundleSignatures(tags.get((registry, repository), {}), manifests, referrers,
                                  read_blob)
        data, media_type = manifests[digest]
        verdict = await gate.judge(reader, registry, repository, digest, manifest=data,
                                   media_type=media_type, tag=tag)
        if verdict is not None and (not verdict.allowed or verdict.warning):
            refusal = Refusal(label, digest, _why(verdict))
            (judged.refused if not verdict.allowed else judged.warned).append(refusal)
    return judged


def _why(verdict: Verdict) -> str:
    where = f"rule {verdict.rule}" if verdict.rule is not None else "the default"
    return f"{where}: {verdict.reason}"


def excluded(refs: list[tuple[str, str]], refused: Iterable[Refusal],
             manifests: Mapping[str, tuple[bytes, str]], roots: Iterable[str]) -> set[str]:
    """Digests not to publish: what the refused images and their signatures reach, less
    what any other image of the bundle (``roots``: index.json's descriptors) reaches."""
    refused_labels = {r.label for r in refused}
    kept_digests = {d for label, d in refs if label not in refused_labels}
    dropped = {r.digest for r in refused} - kept_digests
    if not dropped:
        return set()
    hexes = {d.partition(":")[2] for d in dropped}
    attached = {d for label, d in refs if (m := _ATTACHED.fullmatch(split_label(label)[2] or ""))
                and m.group(1) in hexes}
    by_subject = {str(x["digest"]) for s, listed in subjects(manifests, None).items()
                  if s in dropped for x in listed}
    drop_roots = dropped | attached | by_subject
    everything = dict(manifests)
    gone: set[str] = set().union(*(tree(d, everything) for d in drop_roots))
    kept: set[str] = set().union(*(tree(d, everything) for d in set(roots) - drop_roots
                                   if d in everything))
    return gone - kept


def refused_labels(refs: list[tuple[str, str]], refused: Iterable[Refusal],
                   gone: set[str]) -> set[str]:
    """Labels not to record: the refused images', and their signatures' tags."""
    labels = {r.label for r in refused}
    return labels | {label for label, digest in refs if digest in gone}
