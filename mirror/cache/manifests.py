"""Manifests: by digest forever, by tag with a TTL, stale when upstream fails.

A manifest is kept as the exact bytes upstream sent, with its media type,
verified against its digest. Tag lookups inside the TTL never leave the node;
after it, one HEAD upstream (coalesced across every request for that tag)
confirms or moves the tag. A tag upstream does not have is remembered missing for
``negative_ttl`` (node-wide), so a client retrying it costs upstream one request per
window, not one per request. When upstream fails, the last known digest is
served for up to ``stale_if_error``, and upstream is not asked about that tag
again until its Retry-After (at least a second, at most the TTL) has passed.
Content negotiation is redone locally for every request, so one stored
mapping serves every client's Accept.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cachetools import LRUCache, TTLCache

from mirror import metrics
from mirror.cache.tags import TagRecord, TagStore, tag_key
from mirror.clock import SYSTEM, Clock
from mirror.config import CacheSettings
from mirror.errors import (
    ManifestInvalid,
    ManifestUnknown,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.fetch import DISK_FULL_ERRNOS, Coalescer, LocalCoalescer, SingleFlight
from mirror.oci import (
    DOCKER_LIST,
    Digest,
    client_accepts,
    manifest_media_type,
    parse_manifest,
    pick_platform,
)
from mirror.policy import Verdict
from mirror.sources import ContentRef, SourceChain
from mirror.storage.filesystem import FilesystemStore

log = structlog.get_logger(__name__)

REVALIDATE_HOLD_MIN = 1.0
"""Seconds a tag whose revalidation failed is answered stale without asking again."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """Verified manifest bytes as upstream sent them."""

    digest: Digest
    data: bytes
    media_type: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """A manifest chosen for one request, and how the cache answered."""

    manifest: Manifest
    cache: str  # hit | miss | joined | stale
    verdict: Verdict | None = None  # the policy's, when one judged it (pull service)


class ManifestCache:
    """Answers manifest requests from memory, disk, then the registry's chain of sources.

    Tags are resolved against the upstream registry only (the chain's upstream); content
    by digest comes from the first source of the chain that has it.
    """

    def __init__(self, store: FilesystemStore, tags: TagStore, settings: CacheSettings, *,
                 on_fetched: Callable[[dict[str, Any]], None] | None = None,
                 on_hit: Callable[[str, str], None] = lambda _k, _d: None,
                 clock: Clock = SYSTEM, coalescer: Coalescer | None = None) -> None:
        """Args:
            coalescer: who asks upstream for a manifest or a tag that several processes
                want (default: this process): with worker processes sharing the cache, one
                worker asks and the others find its answer on disk.
        """
        self._on_fetched = on_fetched
        self._on_hit = on_hit
        self._clock = clock
        self._store = store
        self._tags = tags
        self._settings = settings
        self._memory: LRUCache[Digest, Manifest] = LRUCache(
            maxsize=max(settings.memory_max_bytes // 4, 1 << 20), getsizeof=lambda m: len(m.data)
        )
        self._missing: TTLCache[str, bool] = TTLCache(
            maxsize=10_000, ttl=max(settings.negative_ttl, 0.001), timer=clock.monotonic
        )
        # tag key -> (monotonic time until which not to revalidate, stale reason)
        self._held: LRUCache[str, tuple[float, str]] = LRUCache(maxsize=100_000)
        # Work no request waits for any more is cancelled: it would only hold a connection.
        self._by_digest: SingleFlight[Digest, Manifest] = SingleFlight(cancel_abandoned=True)
        self._by_tag: SingleFlight[str, tuple[Manifest, str]] = SingleFlight(
            cancel_abandoned=True)
        self._coalescer: Coalescer = coalescer or LocalCoalescer()

    def forget(self, digest: Digest) -> None:
        """Drop the in-memory copy of a manifest (it was evicted from disk)."""
        self._memory.pop(digest, None)

    def take_memory(self) -> dict[Digest, Manifest]:
        """Forget every manifest held in memory (content was removed elsewhere) and return
        them, for :meth:`keep`."""
        held = dict(self._memory)
        self._memory.clear()
        return held

    async def keep(self, held: dict[Digest, Manifest], digests: set[str]) -> int:
        """Store again the manifests of ``digests`` in ``held`` (what memory held) that are
        no longer on disk (removed by another process while this one answered them).
        Returns how many."""
        wanted = [m for d, m in held.items() if str(d) in digests]

        def restore() -> int:
            restored = 0
            for manifest in wanted:
                if self._store.read_manifest(manifest.digest) is None:
                    self._store.write_manifest(manifest.digest, manifest.data,
                                               manifest.media_type)
                    restored += 1
            return restored

        return await asyncio.to_thread(restore)

    async def close(self) -> None:
        """Stop work under way (at shutdown)."""
        await self._by_digest.close()
        await self._by_tag.close()

    async def by_digest(self, origin: SourceChain, repository: str, digest: Digest,
                        accepted: frozenset[str] | None) -> Resolved:
        """A manifest by digest: never revalidated, fetched once if missing.

        Raises:
            ManifestUnknown: upstream does not have it, or the client does not
                accept its media type.
        """
        manifest, cache = await self._get_digest(origin, repository, digest)
        if not client_accepts(accepted, manifest.media_type):
            raise ManifestUnknown(f"manifest {digest} is {manifest.media_type}, which the "
                                  "request's Accept header does not include")
        return Resolved(manifest, cache)

    async def put(self, manifest: Manifest) -> None:
        """Keep a manifest made here (the mirror's countersigned ``.sig``), written once."""
        if await asyncio.to_thread(self._store.read_manifest, manifest.digest) is None:
            await self._keep(manifest)
        self._memory[manifest.digest] = manifest

    async def fresh_for(self, registry: str, repository: str, tag: str) -> float:
        """Seconds the tag's record stays fresh (inside the tag TTL, when :meth:`by_tag`
        answers it without asking upstream); zero or less: not fresh, or not known."""
        record = await self._tags.get(tag_key(registry, repository, tag))
        if record is None:
            return 0.0
        return self._settings.tag_ttl - record.age(self._clock.time())

    async def by_tag(self, origin: SourceChain, repository: str, tag: str,
                     accepted: frozenset[str] | None, max_age: float | None = None) -> Resolved:
        """A manifest by tag, negotiated against the client's Accept set.

        Args:
            max_age: revalidate upstream when the record is older than this (default: the
                tag TTL); a check under way for the same tag is joined, not repeated.

        Raises:
            ManifestUnknown: the tag does not exist, or no representation the
                client accepts exists.
            UpstreamUnavailable, TooManyRequests: upstream failed and nothing
                usable is cached.
        """
        key = tag_key(origin.name, repository, tag)
        record = await self._tags.get(key)
        ttl = self._settings.tag_ttl if max_age is None else max_age
        if record is not None and record.age(self._clock.time()) < ttl:
            digest = Digest.parse(record.digest)
            manifest, cache = await self._get_digest(origin, repository, digest)
        else:
            if key in self._missing:  # upstream just said it has no such tag
                raise ManifestUnknown(f"manifest {tag!r} is unknown upstream")
            (manifest, cache), joined = await self._by_tag.run(
                key, lambda: self._refresh_tag(origin, repository, tag, key, record))
            cache = "joined" if joined and cache == "miss" else cache
        return Resolved(await self._negotiate(origin, repository, manifest, accepted), cache)

    async def _negotiate(self, origin: SourceChain, repository: str, manifest: Manifest,
                         accepted: frozenset[str] | None) -> Manifest:
        if client_accepts(accepted, manifest.media_type):
            return manifest
        if manifest.media_type == DOCKER_LIST:
            # What the reference registry does for old clients: the linux/amd64 child.
            child = pick_platform(parse_manifest(manifest.data))
            if child is not None:
                found, _ = await self._get_digest(origin, repository, Digest.parse(child))
                if client_accepts(accepted, found.media_type):
                    return found
        raise ManifestUnknown(f"the tag points to {manifest.media_type}, which the request's "
                              "Accept header does not include")

    async def _refresh_tag(self, origin: SourceChain, repository: str, tag: str, key: str,
                           record: TagRecord | None) -> tuple[Manifest, str]:
        async with self._coalescer.exclusive("tag-" + hashlib.sha256(key.encode()).hexdigest()):
            if not self._coalescer.shared:
                return await self._refresh_tag_here(origin, repository, tag, key, record)
            record = await self._tags.reload(key)  # another worker may have just renewed it
            if record is not None and record.age(self._clock.time()) < self._settings.tag_ttl:
                manifest, _ = await self._get_digest(origin, repository,
                                                     Digest.parse(record.digest))
                return manifest, "hit"
            if record is None and await self._tags.missing(key):  # another worker just asked
                self._missing[key] = True
                raise ManifestUnknown(f"manifest {tag!r} is unknown upstream")
            return await self._refresh_tag_here(origin, repository, tag, key, record)

    async def _refresh_tag_here(self, origin: SourceChain, repository: str, tag: str,
                                key: str, record: TagRecord | None) -> tuple[Manifest, str]:
        held = self._held.get(key)
        if record is not None and held is not None and held[0] > self._clock.monotonic() \
                and record.age(self._clock.time()) <= self._settings.stale_if_error:
            # Upstream just failed for this tag: one request per window asks, not each one.
            metrics.STALE_SERVED.labels(origin.name, held[1]).inc()
            manifest, _ = await self._get_digest(origin, repository, Digest.parse(record.digest))
            return manifest, "stale"
        try:
            if record is None:
                manifest = await self._fetch(origin, repository, tag)
                await self._remember(key, manifest)
                return manifest, "miss"
            return await self._revalidate(origin, repository, tag, key, record)
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if record is None or record.age(self._clock.time()) > self._settings.stale_if_error:
                raise
            reason = "rate_limited" if isinstance(exc, TooManyRequests) else "unavailable"
            hold = min(self._settings.tag_ttl, max(REVALIDATE_HOLD_MIN, exc.retry_after or 0.0))
            self._held[key] = (self._clock.monotonic() + hold, reason)
            metrics.STALE_SERVED.labels(origin.name, reason).inc()
            log.warning("tag_served_stale", registry=origin.name, repository=repository,
                        tag=tag, digest=record.digest, age=round(record.age(self._clock.time())),
                        reason=str(exc))
            manifest, _ = await self._get_digest(origin, repository, Digest.parse(record.digest))
            return manifest, "stale"

    async def _revalidate(self, origin: SourceChain, repository: str, tag: str, key: str,
                          record: TagRecord) -> tuple[Manifest, str]:
        """One HEAD upstream: free on Docker Hub, unlike a GET."""
        head = await origin.upstream.head_tag(repository, tag)
        if head is None:
            await self._tags.delete(key)
            await self._remember_missing(key)
            raise ManifestUnknown(f"tag {tag!r} is no longer upstream")
        header = head.digest
        if header is None:
            manifest = await self._fetch(origin, repository, tag)
        elif header == record.digest:
            manifest, _ = await self._get_digest(origin, repository, Digest.parse(header))
        else:
            manifest, _ = await self._get_digest(origin, repository, _upstream_digest(header))
        await self._remember(key, manifest)
        return manifest, "hit" if str(manifest.digest) == record.digest else "miss"

    async def _remember_missing(self, key: str) -> None:
        """Upstream has no such tag: answer ``MANIFEST_UNKNOWN`` without asking again for
        ``cache.negative_ttl``, in every worker of the node."""
        self._missing[key] = True
        await self._tags.put_missing(key, self._settings.negative_ttl)

    async def _remember(self, key: str, manifest: Manifest) -> None:
        record = TagRecord(str(manifest.digest), manifest.media_type, len(manifest.data),
                           self._clock.time())
        await self._tags.put(key, record)

    async def _get_digest(self, origin: SourceChain, repository: str,
                          digest: Digest) -> tuple[Manifest, str]:
        found = self._memory.get(digest)
        if found is not None:
            self._on_hit("manifest", str(digest))
            return found, "hit"
        stored = await asyncio.to_thread(self._store.read_manifest, digest)
        if stored is not None:
            found = Manifest(digest, *stored)
            self._memory[digest] = found
            self._on_hit("manifest", str(digest))
            return found, "hit"
        missing_key = f"{origin.name}/{repository}@{digest}"
        if missing_key in self._missing:
            raise ManifestUnknown(f"manifest {digest} is unknown upstream")
        manifest, joined = await self._by_digest.run(
            digest, lambda: self._fetch_digest(origin, repository, digest))
        return manifest, "joined" if joined else "miss"

    async def _fetch_digest(self, origin: SourceChain, repository: str,
                            digest: Digest) -> Manifest:
        """A manifest missing locally: from the first source of the chain that has it
        (asked by one worker of the node at a time)."""
        async with self._coalescer.exclusive(f"manifest-{digest.algorithm}-{digest.hex}"):
            if not self._coalescer.shared:
                return await self._fetch_digest_here(origin, repository, digest)
            stored = await asyncio.to_thread(self._store.read_manifest, digest)
            if stored is not None:  # another worker fetched it meanwhile
                found = Manifest(digest, *stored)
                self._memory[digest] = found
                return found
            return await self._fetch_digest_here(origin, repository, digest)

    async def _fetch_digest_here(self, origin: SourceChain, repository: str,
                                 digest: Digest) -> Manifest:
        ref = ContentRef(origin.name, repository, digest)
        found = await origin.manifest(ref)
        if found is None:
            self._missing[f"{origin.name}/{repository}@{digest}"] = True
            raise ManifestUnknown(f"manifest {digest} is unknown upstream")
        data, content_type, source = found
        manifest = await self._keep(Manifest(digest, data, manifest_media_type(data, content_type)))
        origin.offer_manifest(ref, data, manifest.media_type, source)
        return manifest

    async def _fetch(self, origin: SourceChain, repository: str, tag: str) -> Manifest:
        """GET a manifest by tag upstream, verify it against the digest header, store it."""
        fetched = await origin.upstream.manifest(repository, tag)
        if fetched is None:
            await self._remember_missing(tag_key(origin.name, repository, tag))
            raise ManifestUnknown(f"manifest {tag!r} is unknown upstream")
        actual = _verify_manifest(fetched.data, fetched.digest_header, origin.name)
        media_type = manifest_media_type(fetched.data, fetched.content_type)
        manifest = await self._keep(Manifest(actual, fetched.data, media_type))
        origin.offer_manifest(ContentRef(origin.name, repository, actual), fetched.data,
                              media_type, origin.upstream)
        return manifest

    async def _keep(self, manifest: Manifest) -> Manifest:
        """Learn from a verified manifest, store it on disk and in memory."""
        if self._on_fetched is not None:
            self._on_fetched(parse_manifest(manifest.data))
        try:
            await asyncio.to_thread(self._store.write_manifest, manifest.digest, manifest.data,
                                    manifest.media_type)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            # Served from memory all the same; the next pull after eviction stores it.
            metrics.DISK_FULL.labels("manifest").inc()
            log.warning("storage_full", kind="manifest", digest=str(manifest.digest),
                        action="served_from_memory_not_kept")
        self._memory[manifest.digest] = manifest
        return manifest


def _upstream_digest(header: str) -> Digest:
    try:
        return Digest.parse(header)
    except Exception:
        raise UpstreamUnavailable(f"upstream sent an invalid digest header {header[:80]!r}",
                                  status=502) from None


def _verify_manifest(data: bytes, header: str | None, registry: str) -> Digest:
    """The digest of manifest bytes fetched by tag, checked against what was announced."""
    expected = _upstream_digest(header) if header else None
    actual = Digest.of(data, expected.algorithm if expected else "sha256")
    if expected is not None and actual != expected:
        metrics.UPSTREAM_ERRORS.labels(registry, "digest_mismatch").inc()
        raise ManifestInvalid(f"upstream sent a manifest whose digest is {actual}, not {expected}")
    return actual
