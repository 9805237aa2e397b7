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

With a policy (``gate``), every manifest answer is judged first: an image that fails an
``enforce`` rule raises :class:`~mirror.errors.PolicyDenied`, so clients, warming and
export all obey it; its signatures are read through this service (see :class:`_Signatures`).
Peers' views (:meth:`with_chains`) do not judge: the node a client talks to decides.
With a ``countersigner`` too, cosign's tag ``sha256-<hex>.sig`` of an image that passed
is answered with upstream's signatures plus the mirror's (see :meth:`countersigned`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from cachetools import TTLCache

from mirror import metrics
from mirror.cache.blobs import BlobCache, CachedBlob
from mirror.cache.manifests import Manifest, ManifestCache, Resolved
from mirror.cache.membership import Membership as RepoMembership
from mirror.cache.membership import ensure_member, may_serve
from mirror.clock import SYSTEM, Clock
from mirror.errors import (
    BlobUnknown,
    FillError,
    ManifestUnknown,
    NameUnknown,
    OciError,
    PolicyDenied,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.fetch import Fill, RangeOpener
from mirror.oci import OCI_INDEX, Digest, client_accepts, is_digest_reference, parse_manifest
from mirror.policy import Verdict
from mirror.policy.countersign import OCI_MANIFEST, Countersigned, Countersigner
from mirror.policy.gate import Found, Gate
from mirror.policy.model import BUNDLE_TYPES
from mirror.sources import ContentRef, SourceChain

if TYPE_CHECKING:  # botocore is imported only by a node with an S3 tier
    from mirror.sources.s3 import S3Source

#: Pages of an upstream tag list followed to paginate it here, at most.
TAG_PAGES_MAX = 20
#: Seconds a resolved ``.sig`` tag is reused by the policy gate without asking the cache.
SIG_TAG_MEMO = 5.0
#: Countersigned ``.sig`` manifests a process remembers as made and stored.
COUNTERSIGNED_MAX = 10_000
_SIG_TAG_RE = re.compile(r"sha256-([0-9a-f]{64})\.sig")


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
        self.gate: Gate | None = None
        self._decisions: dict[tuple[str, str], Any] = {}  # (registry, outcome) -> counter
        # verdicts that let an answer through, until the first signature look-up they
        # used would be made again (so a changed signature is seen exactly as before)
        self._passed: dict[tuple[Repo, str, str | None], tuple[float, Gate, Verdict | None]] = {}
        self._clock = clock
        # referrers indexes read for verdicts, revalidated with the tag TTL
        self._referrers = _Memo(tag_list_ttl, clock)
        # cosign's .sig tags as last resolved: a kept verdict then costs no tag look-up
        # (a moved .sig tag is seen within SIG_TAG_MEMO seconds after its TTL ends)
        self._sig_tags = _Memo(min(tag_list_ttl, SIG_TAG_MEMO), clock)
        self.countersigner: Countersigner | None = None
        # (repo, image digest, upstream .sig digest) -> the countersigned answer, stored
        self._countersigned: dict[tuple[Repo, str, str], Countersigned] = {}

    def with_chains(self, chains: Mapping[str, SourceChain]) -> PullService:
        """The same service (caches, fills, flights) filling misses from other chains: what a
        node answers to its peers and child regions, whose requests must not loop back."""
        view = copy.copy(self)
        view.chains = dict(chains)
        view.gate = None  # peers serve nodes by digest; the node a client talks to judged
        view.countersigner = None
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
        if isinstance(reference, str) and is_digest_reference(reference):
            reference = Digest.parse(reference)
        if self.countersigner is not None and isinstance(reference, str):
            signed = _SIG_TAG_RE.fullmatch(reference)
            if signed is not None:
                return await self.countersigned(repo, reference, Digest("sha256", signed[1]),
                                                accepted, background=background)
        resolved = await self._resolve(repo, reference, accepted, background)
        if self.gate is None:
            return resolved
        verdict = await self.judge(repo, resolved, None if isinstance(reference, Digest)
                                   else reference, background=background)
        return resolved if verdict is None else dataclasses.replace(resolved, verdict=verdict)

    async def _resolve(self, repo: Repo, reference: str | Digest,
                       accepted: frozenset[str] | None, background: bool) -> Resolved:
        origin = self.chain(repo.registry, background)
        if isinstance(reference, Digest):
            made = await self._member(repo, reference, "manifest", background)
            resolved = await self.manifests.by_digest(origin, repo.repository, reference,
                                                      accepted)
            if made:
                return resolved  # the mirror's own: no fact about upstream to learn
        else:
            resolved = await self.manifests.by_tag(origin, repo.repository, reference, accepted)
        await self._served(repo, resolved)
        return resolved

    async def judge(self, repo: Repo, resolved: Resolved, tag: str | None = None, *,
                    background: bool = False) -> Verdict | None:
        """The policy's verdict on a manifest answer (``None``: no policy, or a signature).

        Raises:
            PolicyDenied: the image fails an ``enforce`` rule (counted).
        """
        gate = self.gate
        if gate is None:
            return None
        found = resolved.manifest
        key = (repo, str(found.digest), tag)
        passed = self._passed.get(key)
        if passed is not None and passed[1] is gate and passed[0] > self._clock.monotonic():
            verdict = passed[2]  # the gate would read the same memos and keep the same verdict
        else:
            reader = _Signatures(self, repo, background)
            verdict = await gate.judge(reader, repo.registry, repo.repository, key[1],
                                       manifest=found.data, media_type=found.media_type,
                                       tag=tag)
            if verdict is None or verdict.allowed:
                self._pass(key, gate, verdict, reader.until)
        if verdict is None:
            return None
        outcome = "deny" if not verdict.allowed else "warn" if verdict.warning else "allow"
        counter = self._decisions.get((repo.registry, outcome))
        if counter is None:  # labels() takes a lock and validates: once per pair
            counter = self._decisions[(repo.registry, outcome)] = metrics.child(
                metrics.POLICY_DECISIONS, repo.registry, outcome)
        counter.inc()
        if not verdict.allowed:
            raise PolicyDenied(verdict.rule, verdict.reason, repo.repository,
                               str(found.digest))
        return verdict

    async def countersigned(self, repo: Repo, tag: str, image: Digest,
                            accepted: frozenset[str] | None = None, *,
                            background: bool = False) -> Resolved:
        """cosign's ``.sig`` tag of ``image``: upstream's answer, and when the image passes
        the policy (allowed, not warned) upstream's signatures plus the mirror's.

        The answer is made once per (repository, image, upstream ``.sig``) and stored
        (content-addressed, published by rename; signing is deterministic), so every worker
        and a restarted node give the same bytes, by tag and by digest; its manifest and
        blobs are served under this repository only (see :meth:`_made_here`). Evicted, it
        is made and stored again at the next request (:meth:`forget_countersigned`).

        Raises:
            ManifestUnknown: upstream has no ``.sig`` and the image did not pass.
        """
        assert self.countersigner is not None
        try:
            upstream: Resolved | None = await self._resolve(repo, tag, None, background)
        except ManifestUnknown:
            upstream = None
        if not await self._passes_policy(repo, image, background):
            if upstream is None:
                raise ManifestUnknown(f"manifest {tag!r} is unknown upstream")
            return await self._resolve(repo, tag, accepted, background)
        if not client_accepts(accepted, OCI_MANIFEST):
            raise ManifestUnknown(f"manifest {tag!r} is {OCI_MANIFEST}, which the request's "
                                  "Accept header does not include")
        key = (repo, str(image), str(upstream.manifest.digest) if upstream else "-")
        made = self._countersigned.get(key)
        cache = upstream.cache if upstream else "hit" if made else "miss"
        if made is None:
            made = self.countersigner.countersign(str(repo), str(image),
                                                  upstream.manifest.data if upstream else None)
            await self._publish(repo, made)
            if len(self._countersigned) >= COUNTERSIGNED_MAX:
                self._countersigned.clear()
            self._countersigned[key] = made
        manifest = Manifest(Digest.parse(made.digest), made.manifest, OCI_MANIFEST)
        return Resolved(manifest, cache)

    def forget_countersigned(self, digest: str | None) -> None:
        """Content was removed from the cache (``None``: some, elsewhere): answers made of
        it are made and stored again when next asked."""
        if digest is None:
            self._countersigned.clear()
            return
        for key in [k for k, made in self._countersigned.items()
                    if made.digest == digest or digest in made.blobs]:
            del self._countersigned[key]

    async def _passes_policy(self, repo: Repo, image: Digest, background: bool) -> bool:
        """Whether the image passes the policy here (allowed and not warned); not counted
        as a decision: this is a request for its signatures."""
        if self.gate is None:
            return False
        try:
            found = (await self._resolve(repo, image, None, background)).manifest
        except ManifestUnknown:
            return False
        verdict = await self.gate.judge(_Signatures(self, repo, background), repo.registry,
                                        repo.repository, str(found.digest), manifest=found.data,
                                        media_type=found.media_type)
        return verdict is not None and verdict.allowed and not verdict.warning

    async def _made_here(self, repo: Repo, digest: Digest, private: bool) -> bool:
        """Whether ``digest`` is the mirror's own content made for this very repository
        (a countersigned ``.sig`` or its blobs); asked only after the facts about
        upstream (memory, first) do not already allow it."""
        assert self.membership is not None
        if await may_serve(self.membership, repo.registry, repo.repository, str(digest),
                           private=private):
            return False  # ensure_member passes at once
        return await self.membership.known(_made_by_mirror(repo.registry), repo.repository,
                                           str(digest))

    async def _publish(self, repo: Repo, made: Countersigned) -> None:
        """Store a countersigned answer and its blobs, served under this repository only:
        the facts are kept apart from upstream's (:func:`_made_by_mirror`)."""
        for blob, data in made.blobs.items():
            await self.blobs.put(Digest.parse(blob), data)
        digest = Digest.parse(made.digest)
        await self.manifests.put(Manifest(digest, made.manifest, OCI_MANIFEST))
        if self.membership is not None:
            await self.membership.record(_made_by_mirror(repo.registry), repo.repository,
                                         [*made.blobs, made.digest])

    def _pass(self, key: tuple[Repo, str, str | None], gate: Gate, verdict: Verdict | None,
              until: float) -> None:
        if verdict is not None and verdict.expires is not None:  # a report's max_age
            until = min(until, self._clock.monotonic() + verdict.expires - self._clock.time())
        if until <= self._clock.monotonic():
            return
        if len(self._passed) >= 10_000:
            self._passed.clear()  # rare: thousands of images judged within one TTL
        self._passed[key] = (until, gate, verdict)

    async def _served(self, repo: Repo, resolved: Resolved) -> None:
        """Remember that ``repo`` holds a manifest served from it and all it references."""
        if self.membership is not None:
            found = resolved.manifest
            await self.membership.record_manifest(repo.registry, repo.repository, found.digest,
                                                  found.data)

    async def _member(self, repo: Repo, digest: Digest, kind: str,
                      background: bool = False) -> bool:
        """Refuse content the registry (for a registry with credentials: the repository)
        is not known to hold, unless upstream confirms it there with a ``HEAD`` (on the
        background budget for warming). ``True``: the mirror made it for this repository
        (a countersigned ``.sig`` and its blobs)."""
        private = repo.registry in self._private
        if self.membership is not None and (self._isolate or private):
            if self.countersigner is not None and await self._made_here(repo, digest, private):
                return True
            upstream = self.chain(repo.registry, background).upstream
            await ensure_member(self.membership, upstream, repo.repository, digest, kind=kind,
                                private=private)
        return False

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


class _Memo:
    """Signature look-ups for ``ttl`` seconds, bounded: a plain dict of (expiry, value),
    cheaper than a ``TTLCache`` on every manifest answer."""

    def __init__(self, ttl: float, clock: Clock, max_entries: int = 10_000) -> None:
        self._ttl, self._clock, self._max = max(ttl, 0.001), clock, max_entries
        self._items: dict[tuple[Repo, str], tuple[float, Found | None]] = {}

    def get(self, key: tuple[Repo, str]) -> tuple[bool, Found | None]:
        """``(True, value)`` while kept, else ``(False, None)``."""
        item = self._items.get(key)
        if item is None or item[0] <= self._clock.monotonic():
            return False, None
        return True, item[1]

    def until(self, key: tuple[Repo, str]) -> float:
        """When the kept look-up of ``key`` ends (``-inf``: none is kept)."""
        item = self._items.get(key)
        return item[0] if item is not None else -math.inf

    def put(self, key: tuple[Repo, str], value: Found | None) -> None:
        if len(self._items) >= self._max:
            self._items.clear()  # rare: thousands of images judged within one TTL
        self._items[key] = (self._clock.monotonic() + self._ttl, value)


class _Signatures:
    """The gate's reader: signatures through this service, for one repository (cached like
    any content; tags, the referrers fallback tag included, revalidated with the tag TTL)."""

    def __init__(self, pull: PullService, repo: Repo, background: bool) -> None:
        self._pull, self._repo, self._background = pull, repo, background
        self.until = math.inf  # when the first tag look-up this reader used is made again

    async def manifest(self, reference: str) -> Found | None:
        if reference.endswith((".sig", ".att")):  # cosign's signatures and attestations
            key = (self._repo, reference)
            known, found = self._pull._sig_tags.get(key)
            if not known:
                found = await self._manifest(reference)
                self._pull._sig_tags.put(key, found)
            self.until = min(self.until, self._pull._sig_tags.until(key))
            return found
        return await self._manifest(reference)

    async def _manifest(self, reference: str) -> Found | None:
        ref: str | Digest = Digest.parse(reference) if is_digest_reference(reference) \
            else reference
        try:
            resolved = await self._pull._resolve(self._repo, ref, None, self._background)
        except (ManifestUnknown, NameUnknown):
            return None
        except (UpstreamUnavailable, TooManyRequests):
            return None  # no signatures read: the verdict says so, and is not an error
        return Found(str(resolved.manifest.digest), resolved.manifest.data)

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        if size > limit or not is_digest_reference(digest):
            return None
        try:
            cached = await self._pull.fetch_blob(self._repo, Digest.parse(digest),
                                                 background=self._background)
        except (BlobUnknown, FillError, UpstreamUnavailable, TooManyRequests):
            return None
        if cached is None or cached.size > limit:
            return None
        if cached.data is not None:
            return cached.data
        file = await self._pull.open_cached(cached)
        if file is None:
            return None
        try:
            return await asyncio.to_thread(file.read, limit + 1)
        finally:
            file.close()
            self._pull.closed(cached.digest)

    async def referrers(self, digest: str) -> Found | None:
        key = (self._repo, digest)
        known, kept = self._pull._referrers.get(key)
        if known:
            self.until = min(self.until, self._pull._referrers.until(key))
            return kept
        found: Referrers | None
        try:
            found = await self._pull.referrers(self._repo, Digest.parse(digest),
                                               BUNDLE_TYPES[0], background=self._background)
        except (UpstreamUnavailable, TooManyRequests):
            found = await self._tag_schema(digest)  # an air-gapped node: what was imported
        except OciError:
            found = None
        if found is None:
            self.until = -math.inf  # nothing kept: neither is the verdict
            return None  # not kept: asked again next time
        body = found.body
        index = parse_manifest(body) if body else {}
        result = Found("sha256:" + hashlib.sha256(body).hexdigest(), body) \
            if index.get("manifests") else None
        self._pull._referrers.put(key, result)
        self.until = min(self.until, self._pull._referrers.until(key))
        return result


    async def _tag_schema(self, digest: str) -> Referrers | None:
        """The referrers tag schema's index as the cache holds it (a tag record answered
        while upstream is unreachable, as ``mirror import`` or an earlier pull left it)."""
        try:
            listed = await self._pull._referrers_by_tag(self._repo, Digest.parse(digest),
                                                        self._background)
        except OciError:
            return None
        return Referrers(_index_body(_filtered({"manifests": listed}, BUNDLE_TYPES[0])), True)


def _made_by_mirror(registry: str) -> str:
    """The membership "registry" of content the mirror made for ``registry`` (never a
    configured registry's name: it holds a character names cannot)."""
    return f"{registry}#countersign"


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
