"""The policy gate: the verdict on a manifest being served, from signatures read where the
tools put them, through a reader the pull service gives (so they are cached, revalidated
with the tag TTL, carried by peers and bundles like any other content).

::

    judge(reader, registry, repository, digest, manifest, tag)
      signature artifact?  -> None (not judged: clients pull signatures to verify them)
      sig  = reader.manifest("sha256-<hex>.sig")        cosign's legacy layout
      refs = reader.referrers(digest)                   sigstore bundles (API or fallback tag)
      att  = reader.manifest("sha256-<hex>.att")        vulnerability reports, only when the
                                                        image's rule has a vulnerabilities bar
      verdict cache[(image, policy, sig digest, refs digest, indexes)] -> Verdict
      miss: payloads and bundles read through the reader, bounded, then evaluate()

A platform manifest also passes through a signed index that lists it: the gate remembers
(bounded) the indexes it judged and the platform manifests they list.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mirror.policy.evaluate import Policy, VerdictCache, matching_rule
from mirror.policy.model import (
    MAX_BUNDLE_BYTES,
    MAX_PAYLOAD_BYTES,
    Signature,
    Unreadable,
    Verdict,
)
from mirror.policy.parse import (
    bundle_layer,
    bundle_manifests,
    is_signature_artifact,
    legacy_signature,
    parse_bundle,
    sig_tag,
    signature_layers,
)
from mirror.policy.vuln import att_tag, read_attestations

#: Index digests remembered per platform manifest (for "passes through its index").
MAX_REMEMBERED_INDEXES = 10_000
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True, slots=True)
class Found:
    """A manifest the reader found: its digest and exact bytes."""

    digest: str
    data: bytes


class SignatureReader(Protocol):
    """How the gate reads what a registry holds, for one repository (the pull service)."""

    async def manifest(self, reference: str) -> Found | None:
        """A manifest by tag or digest, ``None`` when there is none."""

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        """A small blob's bytes (``size`` as its descriptor says; none above ``limit``)."""

    async def referrers(self, digest: str) -> Found | None:
        """The referrers index of ``digest`` (bundles), ``None`` when there is none."""


class Gate:
    """Judges manifests with one compiled policy; keeps verdicts (per worker process)."""

    def __init__(self, policy: Policy, verdicts: VerdictCache | None = None) -> None:
        self.policy = policy
        self.verdicts = verdicts if verdicts is not None else VerdictCache()
        self._parents: OrderedDict[str, str] = OrderedDict()  # platform digest -> index
        self._artifacts: OrderedDict[str, bool] = OrderedDict()  # digest -> a signature?
        self._reports = any(r.vulnerabilities for r in policy.settings.rules)

    async def judge(self, reader: SignatureReader, registry: str, repository: str,
                    digest: str, *, manifest: bytes, media_type: str,
                    tag: str | None = None) -> Verdict | None:
        """The verdict on one manifest served, or ``None``: a signature is not judged."""
        if self._is_signature(digest, tag, manifest):
            return None
        if media_type in _INDEX_TYPES:
            self._remember_children(digest, manifest)
        sig, refs = await self._signature_manifests(reader, digest)
        att = await reader.manifest(att_tag(digest)) \
            if self._wants_reports(registry, repository, digest) else None
        indexes = await self._indexes(reader, digest)
        name = f"{sig.digest if sig else '-'} {refs.digest if refs else '-'}"
        if att is not None:
            name += f" {att.digest}"

        kept = self.verdicts.kept(self.policy, registry, repository, digest,
                                  signature_set=name, indexes=indexes)
        if kept is not None:
            return kept
        signatures = await read_signatures(reader, sig, refs)
        if att is not None:
            signatures += await read_attestations(reader, att.data)
        return self.verdicts.verdict(self.policy, registry, repository, digest, signatures,
                                     signature_set=name, indexes=indexes)

    def _wants_reports(self, registry: str, repository: str, digest: str) -> bool:
        """Whether the image's rule has a vulnerabilities bar (then its ``.att`` is read)."""
        if not self._reports:
            return False
        found = matching_rule(self.policy, registry, repository, digest)
        return found is not None and found[1].vulnerabilities is not None

    def _is_signature(self, digest: str, tag: str | None, manifest: bytes) -> bool:
        """:func:`is_signature_artifact`, its answer on the bytes kept per digest (the
        bytes of a digest never change; parsing them is most of a kept verdict's cost)."""
        if tag is not None and tag.startswith("sha256-") and is_signature_artifact(tag, b"{}"):
            return True  # cosign's attached tags
        known = self._artifacts.get(digest)
        if known is None:
            known = self._artifacts[digest] = is_signature_artifact(None, manifest)
            if len(self._artifacts) > MAX_REMEMBERED_INDEXES:
                self._artifacts.popitem(last=False)
        return known

    async def _signature_manifests(self, reader: SignatureReader,
                                   digest: str) -> tuple[Found | None, Found | None]:
        return await reader.manifest(sig_tag(digest)), await reader.referrers(digest)

    async def _indexes(self, reader: SignatureReader,
                       digest: str) -> list[tuple[str, Sequence[Signature]]]:
        parent = self._parents.get(digest)
        if parent is None:
            return []
        sig, refs = await self._signature_manifests(reader, parent)
        return [(parent, await read_signatures(reader, sig, refs))]

    def _remember_children(self, digest: str, manifest: bytes) -> None:
        try:
            doc = json.loads(manifest)
        except ValueError:
            return
        children = doc.get("manifests") if isinstance(doc, dict) else None
        for child in (children if isinstance(children, list) else [])[:256]:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                self._parents[child["digest"]] = digest
                self._parents.move_to_end(child["digest"])
        while len(self._parents) > MAX_REMEMBERED_INDEXES:
            self._parents.popitem(last=False)


async def read_signatures(reader: SignatureReader, sig: Found | None,
                          refs: Found | None) -> list[Signature]:
    """Every signature of an image: the ``.sig`` manifest's payloads, then the bundles the
    referrers index lists (each bounded by :mod:`mirror.policy.model`'s limits)."""
    found: list[Signature] = []
    if sig is not None:
        layers = signature_layers(sig.data)
        if isinstance(layers, Unreadable):
            found.append(layers)
        else:
            for layer in layers:
                payload = await reader.blob(layer.digest, layer.size, MAX_PAYLOAD_BYTES)
                found.append(legacy_signature(layer, payload) if payload is not None
                             else Unreadable("the signature payload cannot be read"))
    if refs is not None:
        listed = bundle_manifests(refs.data)
        if isinstance(listed, Unreadable):
            found.append(listed)
            return found
        for entry in listed:
            found.append(await _bundle(reader, entry.digest))
    return found


async def _bundle(reader: SignatureReader, digest: str) -> Signature:
    manifest = await reader.manifest(digest)
    if manifest is None:
        return Unreadable(f"the bundle manifest {digest} cannot be read")
    layer = bundle_layer(manifest.data)
    if isinstance(layer, Unreadable):
        return layer
    data = await reader.blob(layer.digest, layer.size, MAX_BUNDLE_BYTES)
    if data is None or "sha256:" + hashlib.sha256(data).hexdigest() != layer.digest:
        return Unreadable("the bundle does not match its descriptor")
    return parse_bundle(data)
