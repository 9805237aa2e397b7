"""``mirror export``: images through the pull service into an OCI layout tar.

::

    plan()    references -> manifests (exact bytes, by tag or digest, every child of the
              selected platforms), blobs (digest, size), referrers and their cosign tags;
              minus what the base bundle (--since) already shipped
    write()   oci-layout, bundle.json (+ .sig), index.json, manifests, blobs: each blob
              streamed from its cache file; one not cached is fetched first (background
              budget, a few at once ahead of the writer)

Index and manifest bytes are never rewritten, so their digests, and the signatures made
over them, stay valid; children of platforms not selected are left out of the layout,
which the image-layout spec allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mirror.bundle import layout
from mirror.bundle.manifest import BundleManifest, sign
from mirror.bundle.parts import Output
from mirror.cache.blobs import CachedBlob
from mirror.errors import BundleError, MirrorError, OciError, PolicyDenied
from mirror.oci import OCI_INDEX, Digest, is_attestation, is_platform_image, parse_manifest
from mirror.pull import PullService, Repo
from mirror.routing import Router

#: Blobs fetched upstream at once, ahead of the writer.
PREFETCH = 4
_PLATFORM = re.compile(r"[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?")


@dataclass
class Plan:
    """What a bundle will hold."""

    references: list[dict[str, Any]] = field(default_factory=list)
    descriptors: list[dict[str, Any]] = field(default_factory=list)  # of index.json
    manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> exact bytes
    blobs: dict[str, tuple[int, Repo]] = field(default_factory=dict)  # digest -> size, repo
    omitted: dict[str, int] = field(default_factory=dict)  # digest -> size, in the base

    def included(self) -> int:
        """Bytes of content the bundle carries."""
        return sum(len(d) for k, d in self.manifests.items() if k not in self.omitted) + \
            sum(s for k, (s, _) in self.blobs.items() if k not in self.omitted)


def parse_platform(text: str) -> tuple[str, ...]:
    """``linux/arm64/v8`` -> ``("linux", "arm64", "v8")``.

    Raises:
        BundleError: not ``os/arch[/variant]``.
    """
    if _PLATFORM.fullmatch(text) is None:
        raise BundleError(f"--platform {text!r}: expected os/arch or os/arch/variant")
    return tuple(text.split("/"))


class Planner:
    """Resolves references through the pull service into a :class:`Plan`."""

    def __init__(self, pull: PullService, router: Router, platforms: Iterable[str] = (),
                 referrers: bool = False) -> None:
        self._pull = pull
        self._router = router
        self._platforms = [parse_platform(p) for p in platforms]
        self._referrers = referrers
        self.plan = Plan()
        self._seen_refs: set[str] = set()

    async def add(self, text: str) -> None:
        """Add one image reference (any form Docker accepts).

        Raises:
            BundleError: not a reference to a configured registry, or not found.
        """
        try:
            target = self._router.image(text)
        except OciError as exc:
            raise BundleError(f"{text!r} is not an image reference this mirror serves: "
                              f"{exc.message}") from None
        assert target.upstream is not None
        repo = Repo(target.upstream.name, target.repository)
        tag = None if target.digest is not None else target.reference
        before = set(self.plan.manifests)
        digest = await self._reference(repo, tag, target.reference, text)
        if self._referrers:
            tree = [d for d in self.plan.manifests if d not in before and d != digest]
            await self._add_referrers(repo, [digest, *tree])

    async def _reference(self, repo: Repo, tag: str | None, reference: str,
                         text: str) -> str:
        try:
            resolved = await self._pull.manifest(repo, reference, background=True)
        except PolicyDenied:
            raise  # the caller says what was refused, and exports the rest
        except MirrorError as exc:
            raise BundleError(f"{text}: {_why(exc)}") from None
        manifest = resolved.manifest
        digest = str(manifest.digest)
        name = f"{repo}:{tag}" if tag else f"{repo}@{digest}"
        if name not in self._seen_refs:
            self._seen_refs.add(name)
            self.plan.references.append({
                "name": name, "registry": repo.registry, "repository": repo.repository,
                "tag": tag, "digest": digest, "mediaType": manifest.media_type,
                "size": len(manifest.data)})
            self.plan.descriptors.append({
                "mediaType": manifest.media_type, "digest": digest, "size": len(manifest.data),
                "annotations": {layout.REF_NAME: name}})
        await self._walk(repo, digest, manifest.data)
        return digest

    async def _walk(self, repo: Repo, digest: str, data: bytes | None = None) -> None:
        if digest in self.plan.manifests:
            return
        if data is None:
            try:
                data = (await self._pull.manifest(repo, digest, background=True)).manifest.data
            except PolicyDenied:
                raise
            except MirrorError as exc:
                raise BundleError(f"{repo}@{digest}: {_why(exc)}") from None
        self.plan.manifests[digest] = data
        document = parse_manifest(data)
        children = [m for m in document.get("manifests") or [] if isinstance(m, dict)]
        selected = {m.get("digest") for m in children if self._wanted(m)}
        for child in children:
            if child.get("digest") in selected or _attests(child, selected) or (
                    not is_platform_image(child) and not is_attestation(child)):
                await self._walk(repo, str(child["digest"]))
        config = document.get("config")
        for blob in ([config] if isinstance(config, dict) else []) + \
                [b for b in document.get("layers") or [] if isinstance(b, dict)]:
            if isinstance(blob.get("digest"), str) and isinstance(blob.get("size"), int):
                self.plan.blobs.setdefault(blob["digest"], (blob["size"], repo))

    def _wanted(self, descriptor: dict[str, Any]) -> bool:
        platform = descriptor.get("platform")
        if not self._platforms or not isinstance(platform, dict):
            return True
        have = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
        return any(want[0] == have[0] and want[1] == have[1]
                   and (len(want) < 3 or want[2] == have[2]) for want in self._platforms)

    async def _add_referrers(self, repo: Repo, subjects: list[str]) -> None:
        """Signatures, SBOMs, attestations of an image and its children: the referrers
        API (or its tag schema) and cosign's ``sha256-<hex>.sig|.att|.sbom`` tags."""
        try:
            for subject in subjects:
                found = await self._pull.referrers(repo, Digest.parse(subject), background=True)
                for descriptor in parse_manifest(found.body).get("manifests") or []:
                    if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"),
                                                                   str):
                        await self._referrer(repo, descriptor)
            _, tags = await self._pull.all_tags(repo, background=True)
        except MirrorError as exc:
            raise BundleError(f"{repo}: cannot list referrers: {_why(exc)}") from None
        wanted = {s.replace(":", "-", 1) for s in subjects}
        for tag in tags:
            stem = re.sub(r"\.(sig|att|sbom)$", "", tag)
            if stem in wanted:
                with contextlib.suppress(PolicyDenied):  # left out, as above
                    await self._reference(repo, tag, tag, f"{repo}:{tag}")

    async def _referrer(self, repo: Repo, descriptor: dict[str, Any]) -> None:
        digest = str(descriptor["digest"])
        if digest in self.plan.manifests:
            return
        try:
            await self._walk(repo, digest)
        except PolicyDenied:
            return  # a referrer the policy refuses (an unsigned SBOM) is left out
        self.plan.descriptors.append({k: v for k, v in descriptor.items()
                                      if k in ("mediaType", "digest", "size", "artifactType",
                                               "annotations")})

    def since(self, base: BundleManifest) -> None:
        """Leave out what the base bundle (or the bundles before it) shipped."""
        shipped = {**base.omitted, **base.blobs}
        for digest, data in self.plan.manifests.items():
            if digest in shipped:
                self.plan.omitted[digest] = len(data)
        for digest, (size, _) in self.plan.blobs.items():
            if digest in shipped:
                self.plan.omitted[digest] = size


def _attests(descriptor: dict[str, Any], selected: set[Any]) -> bool:
    """A BuildKit attestation manifest of a selected platform's image."""
    annotations = descriptor.get("annotations") or {}
    return isinstance(annotations, dict) and \
        annotations.get("vnd.docker.reference.type") == "attestation-manifest" and \
        annotations.get("vnd.docker.reference.digest") in selected


def _why(exc: MirrorError) -> str:
    return exc.message if isinstance(exc, OciError) else str(exc) or type(exc).__name__


def tool_version() -> str:
    """This mirror's version, for bundle.json."""
    try:
        return importlib.metadata.version("mirror")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover (run from a checkout)
        return "unknown"


def bundle_manifest(plan: Plan, platforms: list[str], base: BundleManifest | None,
                    index: bytes) -> BundleManifest:
    """The bundle.json of a plan."""
    manifest = BundleManifest(tool_version=tool_version(), platforms=platforms,
                              references=plan.references)
    if base is not None:
        manifest.base, manifest.sequence = base.id, base.sequence + 1
    for name, data in ((layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.INDEX, index)):
        manifest.files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for digest, data in plan.manifests.items():
        if digest not in plan.omitted:
            manifest.blobs[digest] = len(data)
    for digest, (size, _) in plan.blobs.items():
        if digest not in plan.omitted:
            manifest.blobs[digest] = size
    manifest.omitted = dict(plan.omitted)
    return manifest


def index_bytes(plan: Plan) -> bytes:
    """The bundle's ``index.json``."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": plan.descriptors}, indent=1).encode()


async def write(pull: PullService, plan: Plan, out: Path, *, platforms: list[str],
                base: BundleManifest | None = None, max_part_size: int | None = None,
                key: Ed25519PrivateKey | None = None,
                progress: Callable[[int, int], None] = lambda _d, _t: None) -> list[Path]:
    """Write the bundle of ``plan`` to ``out`` (``.zst``: compressed); nothing on failure.

    Returns:
        The files written (parts and their checksum list, or one file).

    Raises:
        BundleError: a blob cannot be had, or the output cannot be written.
    """
    index = index_bytes(plan)
    manifest = bundle_manifest(plan, platforms, base, index)
    data = manifest.to_bytes()
    sink = Output(out, max_part_size)
    writer = layout.LayoutWriter(sink, compress=out.name.endswith(".zst"))
    total = sum(manifest.blobs.values())
    try:
        small = [(layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.BUNDLE, data)]
        if key is not None:
            small.append((layout.SIGNATURE, sign(data, key)))
        small.append((layout.INDEX, index))
        for name, content in small:
            await asyncio.to_thread(writer.add_bytes, name, content)
        done = 0
        for digest, content in plan.manifests.items():
            if digest not in plan.omitted:
                await asyncio.to_thread(writer.add_bytes, layout.blob_name(digest), content)
                done += len(content)
                progress(done, total)
        done = await _write_blobs(pull, plan, writer, done=done, total=total,
                                  progress=progress)
        await asyncio.to_thread(writer.close)
        return await asyncio.to_thread(sink.commit)
    except BaseException:
        await asyncio.to_thread(sink.abort)
        raise


async def _write_blobs(pull: PullService, plan: Plan, writer: layout.LayoutWriter, *,
                       done: int, total: int, progress: Callable[[int, int], None]) -> int:
    wanted = [(d, s, r) for d, (s, r) in plan.blobs.items()
              if d not in plan.omitted and d not in plan.manifests]
    gate = asyncio.Semaphore(PREFETCH)

    async def ready(digest: str, repo: Repo) -> None:
        async with gate:
            await _fetch(pull, repo, digest)

    fetches = [asyncio.ensure_future(ready(d, r)) for d, _, r in wanted]
    try:
        for (digest, size, repo), fetched in zip(wanted, fetches, strict=True):
            await fetched
            await _copy_blob(pull, writer, repo, digest, size)
            done += size
            progress(done, total)
    finally:
        for task in fetches:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*fetches, return_exceptions=True)
    return done


async def _fetch(pull: PullService, repo: Repo, digest: str) -> CachedBlob:
    try:
        blob = await pull.fetch_blob(repo, Digest.parse(digest), background=True)
    except MirrorError as exc:
        raise BundleError(f"{repo}@{digest}: {_why(exc)}") from None
    if blob is None:
        raise BundleError(f"{repo}@{digest}: verified but not kept in the cache (full? "
                          "raise storage.max_size or free space)")
    return blob


async def _copy_blob(pull: PullService, writer: layout.LayoutWriter, repo: Repo, digest: str,
                     size: int) -> None:
    name = layout.blob_name(digest)
    for _ in range(2):
        blob = await _fetch(pull, repo, digest)
        if blob.size != size:
            raise BundleError(f"{repo}@{digest}: {blob.size} bytes cached, the manifest "
                              f"says {size}")
        if blob.data is not None:
            await asyncio.to_thread(writer.add_bytes, name, blob.data)
            return
        file = await pull.open_cached(blob)
        if file is None:
            continue  # evicted since it was fetched: fetch it again
        try:
            await asyncio.to_thread(writer.add_file, name, file, size)
            return
        finally:
            file.close()
            pull.closed(blob.digest)
    raise BundleError(f"{repo}@{digest}: evicted from the cache while exporting")
