"""The pull service: the one way in for every caller, with no HTTP in it.

HTTP handlers, warming, peers and bundle export all pull through here, so
single flight, verification, budgets and metrics hold for every one of them.

::

    manifest(repo, tag | digest, accepted)  -> Resolved (bytes, media type, cache result)
    blob(repo, digest)                      -> CachedBlob  a verified file (or bytes) here
                                             | BlobFlight  a growing fill to follow
                                             | BlobRedirect a presigned URL (S3 tier)
                                             | BlobSize    HEAD of a blob not here yet
    fetch_blob(repo, digest)                -> CachedBlob, waiting for the whole fill
    tags(repo, n, last)                     -> TagPage, paginated here when upstream won't
    referrers(repo, digest, artifact_type)  -> Referrers, from the API or the tag schema
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from cachetools import TTLCache

from mirror.cache.blobs import BlobCache, CachedBlob
from mirror.cache.manifests import ManifestCache, Resolved
from mirror.cache.membership import Membership as RepoMembership
from mirror.cache.membership import ensure_member
from mirror.clock import SYSTEM, Clock
from mirror.errors import (
    FillError,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
)
from mirror.fetch import Fill, RangeOpener
from mirror.oci import OCI_INDEX, Digest, is_digest_reference, parse_manifest
from mirror.sources import ContentRef, SourceChain

if TYPE_CHECKING:  # botocore is imported only by a node with an S3 tier
    from mirror.sources.s3 import S3Source

#: Pages of an upstream tag list followed to paginate it here, at most.
TAG_PAGES_MAX = 20


@dataclass(frozen=True, slots=True)
class Repo:
    """A repository of a configured registry (``library/`` already added for Docker Hub)."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass(frozen=True, slots=True)
class BlobFlight:
    """A fill under way: follow it. ``joined`` when another caller started it.

    ``ranges`` asks the caller's sources for a range itself, for a reader far ahead
    of the fill (see :meth:`mirror.fetch.Fill.pieces`).
    """

    fill: Fill
    joined: bool
    ranges: RangeOpener | None = None


@dataclass(frozen=True, slots=True)
class BlobRedirect:
    """Fetch the blob from this URL instead (a presigned S3 URL; no credentials in it)."""

    url: str


@dataclass(frozen=True, slots=True)
class BlobSize:
    """A blob that is not here, and its size (the answer to a HEAD)."""

    size: int


BlobAnswer = CachedBlob | BlobFlight | BlobRedirect | BlobSize


@dataclass(frozen=True, slots=True)
class TagPage:
    """One page of a repository's tags, and where the next one starts (``None``: last)."""

    name: str
    tags: list[str]
    next_last: str | None = None
    n: int | None = None


@dataclass(frozen=True, slots=True)
class Referrers:
    """An image index of the manifests that refer to a digest."""

    body: bytes
    filtered: bool  # artifactType was applied (upstream or here)


class PullService:
    """Answers pulls from the cache, from fills under way, or through the sources."""

    def __init__(self, chains: Mapping[str, SourceChain], manifests: ManifestCache,
                 blobs: BlobCache, *, redirector: S3Source | None = None,
                 clock: Clock = SYSTEM, tag_list_ttl: float = 60.0,
                 membership: RepoMembership | None = None,
                 private: frozenset[str] = frozenset(), isolate: bool = True) -> None:
        """Args:
            membership: which registry and repository hold which digest; consulted
                for every content asked by digest, so content is served under a
                registry only when that registry is known to hold it (a client never
                gets another registry's, or another private repository's, content
                by naming its digest). ``None``: no isolation (unit tests).
            private: the registries reached with credentials: there the repository
                named itself must be known to hold a digest.
            isolate: check membership for every registry. ``False`` (no client auth
                and no registry reached with credentials: anyone may pull anything
                from every registry, and all of it is public): only the private
                registries are checked.
        """
        self.chains = dict(chains)
        self.manifests = manifests
        self.blobs = blobs
        self.membership = membership
        self._private = private
        self._isolate = isolate
        self._redirector = redirector if redirector is not None and redirector.redirect else None
        self._tag_lists: TTLCache[Repo, tuple[str, list[str]]] = TTLCache(
            maxsize=1000, ttl=max(tag_list_ttl, 0.001), timer=clock.monotonic)

    def with_chains(self, chains: Mapping[str, SourceChain]) -> PullService:
        """The same service (caches, fills, flights) filling misses from other chains: what a
        node answers to its peers and child regions, whose requests must not loop back."""
        view = copy.copy(self)
        view.chains = dict(chains)
        return view

    def chain(self, registry: str, background: bool = False) -> SourceChain:
        """The sources of a configured registry (for ``background`` work, its background view).

        Raises:
            NameUnknown: no such registry is configured.
        """
        chain = self.chains.get(registry)
        if chain is None:
            raise NameUnknown(f"no registry named {registry[:100]!r} is configured")
        return chain.in_background() if background else chain

    # --- manifests --------------------------------------------------------------------
    async def manifest(self, repo: Repo, reference: str | Digest,
                       accepted: frozenset[str] | None = None, *,
                       background: bool = False) -> Resolved:
        """A manifest by tag (negotiated against ``accepted``) or by digest.

        Args:
            background: no client waits (warming): the upstream's background budget.

        Raises:
            ManifestUnknown: no such manifest, or none the caller accepts.
            UpstreamUnavailable, TooManyRequests: upstream failed and nothing cached answers.
        """
        origin = self.chain(repo.registry, background)
        if isinstance(reference, str) and is_digest_reference(reference):
            reference = Digest.parse(reference)
        if isinstance(reference, Digest):
            await self._member(repo, reference, "manifest", background)
            resolved = await self.manifests.by_digest(origin, repo.repository, reference,
                                                      accepted)
        else:
            resolved = await self.manifests.by_tag(origin, repo.repository, reference, accepted)
        await self._served(repo, resolved)
        return resolved

    async def _served(self, repo: Repo, resolved: Resolved) -> None:
        """Remember that ``repo`` holds a manifest served from it and all it references."""
        if self.membership is not None:
            found = resolved.manifest
            await self.membership.record_manifest(repo.registry, repo.repository, found.digest,
                                                  found.data)

    async def _member(self, repo: Repo, digest: Digest, kind: str,
                      background: bool = False) -> None:
        """Refuse content the registry (for a registry with credentials: the repository)
        is not known to hold, unless upstream confirms it there with a ``HEAD`` (on the
        background budget for warming)."""
        private = repo.registry in self._private
        if self.membership is not None and (self._isolate or private):
            upstream = self.chain(repo.registry, background).upstream
            await ensure_member(self.membership, upstream, repo.repository, digest, kind=kind,
                                private=private)

    async def revalidate(self, repo: Repo, tag: str, max_age: float, *,
                         background: bool = True) -> Resolved:
        """A tag confirmed upstream unless it was checked within ``max_age`` seconds (by
        anyone): one HEAD, joined with a client's revalidation of the same tag under way.

        The manifest is fetched only when the tag moved (or was never seen). Warming
        watches tags with this.

        Raises:
            ManifestUnknown: the tag does not exist (any more).
            UpstreamUnavailable, TooManyRequests: upstream failed and nothing cached answers.
        """
        origin = self.chain(repo.registry, background)
        resolved = await self.manifests.by_tag(origin, repo.repository, tag, None,
                                               max_age=max_age)
        await self._served(repo, resolved)
        return resolved

    # --- blobs ------------------------------------------------------------------------
    async def blob(self, repo: Repo, digest: Digest, *, head: bool = False,
                   redirect: bool = True, background: bool = False) -> BlobAnswer:
        """Where a blob's bytes are: here, in a fill under way, or to be fetched.

        Args:
            head: only the size is wanted: a blob not here is not downloaded.
            redirect: a presigned S3 redirect is an acceptable answer.
            background: no client waits (warming): the upstream's background budget.

        Raises:
            BlobUnknown: no source has it.
            UpstreamUnavailable, TooManyRequests: upstream failed.
        """
        await self._member(repo, digest, "blob", background)
        cached = await self.blobs.cached(digest)
        if cached is not None:
            return cached
        origin = self.chain(repo.registry, background)
        ref = ContentRef(repo.registry, repo.repository, digest)
        ranges = functools.partial(origin.open_range, ref)
        fill = self.blobs.in_flight(digest)
        if fill is not None:
            return BlobFlight(fill, joined=True, ranges=ranges)
        if head:
            return BlobSize(await self.blobs.source_size(origin, ref))
        if redirect and self._redirector is not None:
            url = await self._redirector.presigned_url(digest)
            if url is not None:
                return BlobRedirect(url)
        fill, joined = await self.blobs.fill(origin, ref)
        return BlobFlight(fill, joined, ranges)

    async def fetch_blob(self, repo: Repo, digest: Digest, *, background: bool = True,
                         pace: Callable[[int], Awaitable[None]] | None = None,
                         ) -> CachedBlob | None:
        """Make sure the blob is here, waiting for its fill (warming, export).

        A fill cut because a source sent wrong bytes is tried once more (that
        source is skipped then).

        Args:
            pace: awaited with the size of each chunk a fill this call started reads,
                while no client reads that fill (a bandwidth cap for warming).

        Returns:
            The cached blob, or ``None`` when it was verified but could not be kept.

        Raises:
            BlobUnknown, UpstreamUnavailable, TooManyRequests, FillError.
        """
        for attempt in range(2):
            answer = await self.blob(repo, digest, redirect=False, background=background)
            if isinstance(answer, CachedBlob):
                return answer
            assert isinstance(answer, BlobFlight)
            if pace is not None and not answer.joined:
                answer.fill.pace = pace
            try:
                await answer.fill.wait_done()
            except FillError as exc:
                if isinstance(exc.__cause__, TooManyRequests):
                    raise exc.__cause__ from None  # asking again now only earns another 429
                if attempt:
                    raise
                continue
            return await self.blobs.cached(digest)
        return None  # pragma: no cover (the loop returns or raises)

    async def open_cached(self, blob: CachedBlob) -> IO[bytes] | None:
        """An open file of a cached blob (``None``: evicted meanwhile); call :meth:`closed`."""
        return await self.blobs.open(blob)

    def closed(self, digest: Digest) -> None:
        """A file from :meth:`open_cached` was closed."""
        self.blobs.closed(digest)

    # --- tag lists ----------------------------------------------------------------------
    async def tags(self, repo: Repo, n: int | None = None, last: str | None = None) -> TagPage:
        """A page of tags in lexical order, ``n`` at most, after ``last``.

        Upstream is asked with the same ``n`` and ``last``; when it ignores them (Distribution
        2.8 ignores ``last``), the whole list is read (cached briefly) and paginated here.

        Raises:
            NameUnknown: upstream does not know the repository.
            UpstreamUnavailable: upstream failed or sent something that is not a tag list.
        """
        page = await self.chain(repo.registry).upstream.tag_page(repo.repository, n, last)
        if _honoured(page.tags, n, last):
            return TagPage(page.name, page.tags, page.next_last,
                           page.next_n if page.next_last else None)
        name, every = await self.all_tags(repo)
        return _paginate(name, every, n, last)

    async def all_tags(self, repo: Repo, *, background: bool = False) -> tuple[str, list[str]]:
        """Every tag of a repository, sorted, following upstream's pages (cached briefly).

        Args:
            background: no client waits (warming): the upstream's background budget.
        """
        cached = self._tag_lists.get(repo)
        if cached is not None:
            return cached
        upstream = self.chain(repo.registry, background).upstream
        page = await upstream.tag_page(repo.repository)
        name, every = page.name, list(page.tags)
        for _ in range(TAG_PAGES_MAX):
            if page.next_last is None:
                break
            page = await upstream.tag_page(repo.repository, page.next_n or None, page.next_last)
            every.extend(page.tags)
        result = (name, sorted(set(every)))
        self._tag_lists[repo] = result
        return result

    # --- referrers ----------------------------------------------------------------------
    async def referrers(self, repo: Repo, digest: Digest, artifact_type: str | None = None,
                        *, background: bool = False) -> Referrers:
        """The manifests that refer to ``digest``: from upstream's referrers API, else from
        the referrers tag schema (an index under the tag ``<alg>-<hex>``), else none.

        Args:
            background: no client waits (warming): the upstream's background budget.

        Raises:
            UpstreamUnavailable: upstream failed or sent something that is not an index.
        """
        upstream = self.chain(repo.registry, background).upstream
        found = await upstream.referrers(repo.repository, digest, artifact_type)
        if found is not None:
            if artifact_type and not found.filtered:
                return Referrers(_index_body(_filtered(found.index, artifact_type)), True)
            return Referrers(found.body, bool(artifact_type))
        manifests = await self._referrers_by_tag(repo, digest, background)
        if artifact_type:
            manifests = _filtered({"manifests": manifests}, artifact_type)
        return Referrers(_index_body(manifests), bool(artifact_type))

    async def _referrers_by_tag(self, repo: Repo, digest: Digest,
                                background: bool = False) -> list[dict[str, Any]]:
        try:
            resolved = await self.manifest(repo, f"{digest.algorithm}-{digest.hex}",
                                           background=background)
        except ManifestUnknown:
            return []
        if resolved.manifest.media_type != OCI_INDEX:
            return []
        manifests = parse_manifest(resolved.manifest.data).get("manifests")
        return [m for m in manifests if isinstance(m, dict)] if isinstance(manifests, list) \
            else []


def _honoured(tags: list[str], n: int | None, last: str | None) -> bool:
    """Whether upstream applied ``n`` and ``last`` itself."""
    return (n is None or len(tags) <= n) and (last is None or all(t > last for t in tags))


def _paginate(name: str, tags: list[str], n: int | None, last: str | None) -> TagPage:
    after = [t for t in tags if last is None or t > last]
    if n is None or len(after) <= n:
        return TagPage(name, after)
    page = after[:n]
    return TagPage(name, page, page[-1] if page else None, n)


def _filtered(index: Mapping[str, Any], artifact_type: str) -> list[dict[str, Any]]:
    return [m for m in index.get("manifests") or [] if isinstance(m, dict)
            and m.get("artifactType") == artifact_type]


def _index_body(manifests: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": manifests}).encode()
