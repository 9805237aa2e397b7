"""Manifests: by digest forever, by tag with a TTL, stale when upstream fails.

A manifest is kept as the exact bytes upstream sent, with its media type,
verified against its digest. Tag lookups inside the TTL never leave the node;
after it, one HEAD upstream (coalesced across every request for that tag)
confirms or moves the tag. When upstream fails, the last known digest is
served for up to ``stale_if_error``, and upstream is not asked about that tag
again until its Retry-After (at least a second, at most the TTL) has passed.
Content negotiation is redone locally for every request, so one stored
mapping serves every client's Accept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from cachetools import LRUCache, TTLCache

from mirror import metrics
from mirror.cache.shared import SharedTier
from mirror.cache.tags import TagRecord, TagStore, tag_key
from mirror.config import CacheSettings
from mirror.errors import (
    ManifestInvalid,
    ManifestUnknown,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.fetch import DISK_FULL_ERRNOS, SingleFlight
from mirror.oci import (
    DOCKER_LIST,
    MANIFEST_MAX_BYTES,
    UPSTREAM_ACCEPT,
    Digest,
    client_accepts,
    manifest_media_type,
    parse_manifest,
    pick_platform,
)
from mirror.storage.filesystem import FilesystemStore

log = structlog.get_logger(__name__)

REVALIDATE_HOLD_MIN = 1.0
"""Seconds a tag whose revalidation failed is answered stale without asking again."""


class RegistryClient(Protocol):
    """What the cache needs of an upstream client (see mirror.upstream)."""

    @property
    def name(self) -> str: ...

    def request(self, method: str, repository: str, suffix: str, *,
                headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None,
                retry: bool = True) -> AbstractAsyncContextManager[aiohttp.ClientResponse]: ...


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


class ManifestCache:
    """Answers manifest requests from memory, disk, the shared tier, or upstream, in that order."""

    def __init__(self, store: FilesystemStore, tags: TagStore, settings: CacheSettings, *,
                 on_fetched: Callable[[dict[str, Any]], None] | None = None,
                 shared: SharedTier | None = None,
                 on_hit: Callable[[str, str], None] = lambda _k, _d: None) -> None:
        self._on_fetched = on_fetched
        self._shared = shared
        self._on_hit = on_hit
        self._store = store
        self._tags = tags
        self._settings = settings
        self._memory: LRUCache[Digest, Manifest] = LRUCache(
            maxsize=max(settings.memory_max_bytes // 4, 1 << 20), getsizeof=lambda m: len(m.data)
        )
        self._missing: TTLCache[str, bool] = TTLCache(
            maxsize=10_000, ttl=max(settings.negative_ttl, 0.001)
        )
        # tag key -> (monotonic time until which not to revalidate, stale reason)
        self._held: LRUCache[str, tuple[float, str]] = LRUCache(maxsize=100_000)
        # Work no request waits for any more is cancelled: it would only hold a connection.
        self._by_digest: SingleFlight[Digest, Manifest] = SingleFlight(cancel_abandoned=True)
        self._by_tag: SingleFlight[str, tuple[Manifest, str]] = SingleFlight(
            cancel_abandoned=True)

    def forget(self, digest: Digest) -> None:
        """Drop the in-memory copy of a manifest (it was evicted from disk)."""
        self._memory.pop(digest, None)

    def clear_memory(self) -> None:
        """Forget every manifest held in memory (content was removed elsewhere)."""
        self._memory.clear()

    async def close(self) -> None:
        """Stop work under way (at shutdown)."""
        await self._by_digest.close()
        await self._by_tag.close()

    async def by_digest(self, client: RegistryClient, repository: str, digest: Digest,
                        accepted: frozenset[str] | None) -> Resolved:
        """A manifest by digest: never revalidated, fetched once if missing.

        Raises:
            ManifestUnknown: upstream does not have it, or the client does not
                accept its media type.
        """
        manifest, cache = await self._get_digest(client, repository, digest)
        if not client_accepts(accepted, manifest.media_type):
            raise ManifestUnknown(f"manifest {digest} is {manifest.media_type}, which the "
                                  "request's Accept header does not include")
        return Resolved(manifest, cache)

    async def by_tag(self, client: RegistryClient, repository: str, tag: str,
                     accepted: frozenset[str] | None) -> Resolved:
        """A manifest by tag, negotiated against the client's Accept set.

        Raises:
            ManifestUnknown: the tag does not exist, or no representation the
                client accepts exists.
            UpstreamUnavailable, TooManyRequests: upstream failed and nothing
                usable is cached.
        """
        key = tag_key(client.name, repository, tag)
        record = await self._tags.get(key)
        if record is not None and record.age() < self._settings.tag_ttl:
            digest = Digest.parse(record.digest)
            manifest, cache = await self._get_digest(client, repository, digest)
        else:
            (manifest, cache), joined = await self._by_tag.run(
                key, lambda: self._refresh_tag(client, repository, tag, key, record))
            cache = "joined" if joined and cache == "miss" else cache
        return Resolved(await self._negotiate(client, repository, manifest, accepted), cache)

    async def _negotiate(self, client: RegistryClient, repository: str, manifest: Manifest,
                         accepted: frozenset[str] | None) -> Manifest:
        if client_accepts(accepted, manifest.media_type):
            return manifest
        if manifest.media_type == DOCKER_LIST:
            # What the reference registry does for old clients: the linux/amd64 child.
            child = pick_platform(parse_manifest(manifest.data))
            if child is not None:
                found, _ = await self._get_digest(client, repository, Digest.parse(child))
                if client_accepts(accepted, found.media_type):
                    return found
        raise ManifestUnknown(f"the tag points to {manifest.media_type}, which the request's "
                              "Accept header does not include")

    async def _refresh_tag(self, client: RegistryClient, repository: str, tag: str, key: str,
                           record: TagRecord | None) -> tuple[Manifest, str]:
        held = self._held.get(key)
        if record is not None and held is not None and held[0] > time.monotonic() \
                and record.age() <= self._settings.stale_if_error:
            # Upstream just failed for this tag: one request per window asks, not each one.
            metrics.STALE_SERVED.labels(client.name, held[1]).inc()
            manifest, _ = await self._get_digest(client, repository, Digest.parse(record.digest))
            return manifest, "stale"
        try:
            if record is None:
                manifest = await self._fetch(client, repository, tag, None)
                await self._remember(key, manifest)
                return manifest, "miss"
            return await self._revalidate(client, repository, tag, key, record)
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if record is None or record.age() > self._settings.stale_if_error:
                raise
            reason = "rate_limited" if isinstance(exc, TooManyRequests) else "unavailable"
            hold = min(self._settings.tag_ttl, max(REVALIDATE_HOLD_MIN, exc.retry_after or 0.0))
            self._held[key] = (time.monotonic() + hold, reason)
            metrics.STALE_SERVED.labels(client.name, reason).inc()
            log.warning("tag_served_stale", registry=client.name, repository=repository, tag=tag,
                        digest=record.digest, age=round(record.age()), reason=str(exc))
            manifest, _ = await self._get_digest(client, repository, Digest.parse(record.digest))
            return manifest, "stale"

    async def _revalidate(self, client: RegistryClient, repository: str, tag: str, key: str,
                          record: TagRecord) -> tuple[Manifest, str]:
        """One HEAD upstream: free on Docker Hub, unlike a GET."""
        headers = {"Accept": UPSTREAM_ACCEPT}
        async with client.request("HEAD", repository, f"manifests/{tag}", headers=headers) as resp:
            if resp.status == 404:
                await self._tags.delete(key)
                raise ManifestUnknown(f"tag {tag!r} is no longer upstream")
            _check_status(resp, client.name)
            header = resp.headers.get("Docker-Content-Digest")
        if header is None:
            manifest = await self._fetch(client, repository, tag, None)
        elif header == record.digest:
            manifest, _ = await self._get_digest(client, repository, Digest.parse(header))
        else:
            manifest, _ = await self._get_digest(client, repository, _upstream_digest(header))
        await self._remember(key, manifest)
        return manifest, "hit" if str(manifest.digest) == record.digest else "miss"

    async def _remember(self, key: str, manifest: Manifest) -> None:
        record = TagRecord(str(manifest.digest), manifest.media_type, len(manifest.data),
                           time.time())
        await self._tags.put(key, record)

    async def _get_digest(self, client: RegistryClient, repository: str,
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
        missing_key = f"{client.name}/{repository}@{digest}"
        if missing_key in self._missing:
            raise ManifestUnknown(f"manifest {digest} is unknown upstream")
        manifest, joined = await self._by_digest.run(
            digest, lambda: self._fetch_digest(client, repository, digest))
        return manifest, "joined" if joined else "miss"

    async def _fetch_digest(self, client: RegistryClient, repository: str,
                            digest: Digest) -> Manifest:
        """A manifest missing locally: from the shared tier if it has it, else upstream."""
        if self._shared is not None:
            found = await self._shared.get_manifest(digest)
            if found is not None:
                return await self._keep(Manifest(digest, *found))
        return await self._fetch(client, repository, str(digest), digest)

    async def _fetch(self, client: RegistryClient, repository: str, reference: str,
                     digest: Digest | None) -> Manifest:
        """GET a manifest upstream, verify it, store it."""
        headers = {"Accept": UPSTREAM_ACCEPT}
        async with client.request("GET", repository, f"manifests/{reference}",
                                  headers=headers) as resp:
            if resp.status == 404:
                self._missing[f"{client.name}/{repository}@{reference}"] = True
                raise ManifestUnknown(f"manifest {reference!r} is unknown upstream")
            _check_status(resp, client.name)
            data = await _read_limited(resp)
            content_type = resp.headers.get("Content-Type")
            header = resp.headers.get("Docker-Content-Digest")
        actual = _verify_manifest(data, digest, header, client.name)
        manifest = await self._keep(Manifest(actual, data, manifest_media_type(data, content_type)))
        if self._shared is not None:
            self._shared.upload_manifest_later(actual, data, manifest.media_type)
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


def _check_status(resp: aiohttp.ClientResponse, registry: str) -> None:
    if resp.status != 200:
        metrics.UPSTREAM_ERRORS.labels(registry, "bad_content").inc()
        raise UpstreamUnavailable(f"upstream {registry} answered {resp.status} for a manifest",
                                  status=502)


def _upstream_digest(header: str) -> Digest:
    try:
        return Digest.parse(header)
    except Exception:
        raise UpstreamUnavailable(f"upstream sent an invalid digest header {header[:80]!r}",
                                  status=502) from None


def _verify_manifest(data: bytes, digest: Digest | None, header: str | None,
                     registry: str) -> Digest:
    """The digest of manifest bytes, checked against what was asked and announced."""
    expected = digest or (_upstream_digest(header) if header else None)
    algorithm = expected.algorithm if expected else "sha256"
    actual = Digest.of(data, algorithm)
    if expected is not None and actual != expected:
        metrics.UPSTREAM_ERRORS.labels(registry, "digest_mismatch").inc()
        raise ManifestInvalid(f"upstream sent a manifest whose digest is {actual}, not {expected}")
    return actual


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body of a manifest response, refusing anything over the limit."""
    if resp.content_length is not None and resp.content_length > MANIFEST_MAX_BYTES:
        raise ManifestInvalid(f"upstream manifest is {resp.content_length} bytes, over the "
                              f"{MANIFEST_MAX_BYTES} byte limit")
    parts: list[bytes] = []
    total = 0
    try:
        while chunk := await resp.content.read(65536):
            total += len(chunk)
            if total > MANIFEST_MAX_BYTES:
                raise ManifestInvalid(f"upstream manifest exceeds the {MANIFEST_MAX_BYTES} "
                                      "byte limit")
            parts.append(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"manifest download broke off: {type(exc).__name__}",
                                  status=502) from exc
    data = b"".join(parts)
    if resp.content_length is not None and len(data) != resp.content_length:
        raise UpstreamUnavailable("upstream manifest was truncated", status=502)
    return data
