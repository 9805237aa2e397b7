"""The upstream registry as a source: always last in the chain, and the only one that knows
tags, tag lists and referrers (those are never taken from any other source).

It is also the mirror's one typed registry API: everything above ``sources/`` asks
upstream through these methods and gets values or the errors of :mod:`mirror.errors`,
never a response object or an HTTP status::

    head_tag(repository, tag)                 -> TagHead | None (no such tag)
    manifest(repository, tag | digest)        -> Fetched | None (no such manifest)
    tag_page(repository, n, last)             -> UpstreamTags (NameUnknown: no repository)
    referrers(repository, digest, type)       -> UpstreamReferrers | None (no referrers API)
    has_blob / has_manifest(repository, d)    -> bool (held there, or not)

A source built with ``background=True`` (:meth:`SourceChain.in_background`) sends
every request as background work: it waits for the registry's request budget
instead of spending the clients' overdraft (see :mod:`mirror.upstream.guard`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from yarl import URL

from mirror import metrics
from mirror.errors import Denied, ManifestInvalid, NameUnknown, UpstreamUnavailable
from mirror.oci import MANIFEST_MAX_BYTES, UPSTREAM_ACCEPT, Digest, is_number
from mirror.sources.base import ContentRef, PassiveSource
from mirror.storage.base import BodyResponse
from mirror.upstream import bodies

KIND = "upstream"


class RegistryClient(Protocol):
    """What the mirror needs of an upstream client (see :mod:`mirror.upstream`)."""

    @property
    def name(self) -> str: ...

    def request(self, method: str, repository: str, suffix: str, *,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, str] | None = None,
                retry: bool = True,
                background: bool = False,
                ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]: ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """A manifest body as upstream sent it, unverified."""

    data: bytes
    content_type: str | None
    digest_header: str | None


@dataclass(frozen=True, slots=True)
class TagHead:
    """What a ``HEAD`` of a tag says: the digest it points to, when upstream names it."""

    digest: str | None


@dataclass(frozen=True, slots=True)
class UpstreamTags:
    """One page of upstream's tag list, and where its next page starts (``None``: last)."""

    name: str
    tags: list[str]
    next_n: int | None = None
    next_last: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamReferrers:
    """Upstream's referrers index as sent, parsed, and whether it applied ``artifactType``."""

    body: bytes
    index: dict[str, Any]
    filtered: bool


class UpstreamSource(PassiveSource):
    """Blobs and manifests by digest from one registry, and its typed registry API.

    Args:
        client: the registry's client (its auth, retries, budget and breaker).
        background: send every request as background work (no client waits for it).
    """

    def __init__(self, client: RegistryClient, *, background: bool = False) -> None:
        self.client = client
        self.background = background
        self._view: UpstreamSource | None = None

    def in_background(self) -> UpstreamSource:
        """The same registry, every request spending its background budget."""
        if self.background:
            return self
        if self._view is None:
            self._view = UpstreamSource(self.client, background=True)
        return self._view

    @property
    def kind(self) -> str:
        return KIND

    @property
    def name(self) -> str:
        """The registry's configured name."""
        return self.client.name

    def _request(self, method: str, repository: str, suffix: str, *,
                 headers: Mapping[str, str] | None = None,
                 params: Mapping[str, str] | None = None,
                 ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.client.request(method, repository, suffix, headers=headers, params=params,
                                   background=self.background)

    # --- the source protocol ------------------------------------------------------------
    @asynccontextmanager
    async def open_blob(self, ref: ContentRef, offset: int,
                        end: int | None = None) -> AsyncIterator[BodyResponse]:
        headers = {"Range": range_header(offset, end)} if offset or end is not None else None
        async with self._request("GET", ref.repository, f"blobs/{ref.digest}",
                                 headers=headers) as resp:
            yield resp

    async def blob_size(self, ref: ContentRef) -> int | None:
        """The size from a ``HEAD`` (``None``: upstream does not have it).

        Raises:
            UpstreamUnavailable: upstream failed or sent no length.
        """
        async with self._request("HEAD", ref.repository, f"blobs/{ref.digest}") as resp:
            if resp.status == 404:
                return None
            if resp.status != 200 or resp.content_length is None:
                raise UpstreamUnavailable(f"upstream answered {resp.status} to a blob HEAD "
                                          "without a usable length", status=502)
            return resp.content_length

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        fetched = await self.manifest(ref.repository, str(ref.digest))
        if fetched is None:
            return None
        return fetched.data, fetched.content_type or ""

    # --- the registry API -----------------------------------------------------------------
    async def manifest(self, repository: str, reference: str) -> Fetched | None:
        """GET a manifest by tag or digest (``None``: upstream says 404).

        Raises:
            UpstreamUnavailable: upstream failed or broke off.
            ManifestInvalid: the body is over the size limit.
        """
        async with self._request("GET", repository, f"manifests/{reference}",
                                 headers={"Accept": UPSTREAM_ACCEPT}) as resp:
            if resp.status == 404:
                return None
            check_status(resp, self.name, "manifest")
            data = await read_limited(resp, "manifest")
            return Fetched(data, resp.headers.get("Content-Type"),
                           resp.headers.get("Docker-Content-Digest"))

    async def head_tag(self, repository: str, tag: str) -> TagHead | None:
        """One ``HEAD`` of a tag (free on Docker Hub, unlike a GET); ``None``: no such tag.

        Raises:
            UpstreamUnavailable, TooManyRequests: upstream failed.
        """
        async with self._request("HEAD", repository, f"manifests/{tag}",
                                 headers={"Accept": UPSTREAM_ACCEPT}) as resp:
            if resp.status == 404:
                return None
            check_status(resp, self.name, "manifest")
            return TagHead(resp.headers.get("Docker-Content-Digest"))

    async def tag_page(self, repository: str, n: int | None = None,
                       last: str | None = None) -> UpstreamTags:
        """A page of the tag list as upstream gives it for ``n`` and ``last`` (which it
        may ignore).

        Raises:
            NameUnknown: upstream does not know the repository.
            UpstreamUnavailable: upstream failed or sent something that is not a tag list.
        """
        params = {k: str(v) for k, v in (("n", n), ("last", last)) if v is not None}
        async with self._request("GET", repository, "tags/list", params=params) as resp:
            if resp.status == 404:
                raise NameUnknown(f"repository {repository!r} is unknown upstream")
            check_status(resp, self.name, "tag list")
            body = await read_limited(resp, "tag list")
            next_n, next_last = next_from_link(resp.headers.get("Link"))
        document = bodies.tag_list(body)
        return UpstreamTags(document["name"], list(document.get("tags") or []), next_n,
                            next_last)

    async def referrers(self, repository: str, digest: Digest,
                        artifact_type: str | None = None) -> UpstreamReferrers | None:
        """Upstream's referrers index of ``digest`` (``None``: it has no referrers API).

        Raises:
            UpstreamUnavailable: upstream failed or sent something that is not an index.
        """
        params = {"artifactType": artifact_type} if artifact_type else None
        async with self._request("GET", repository, f"referrers/{digest}",
                                 params=params) as resp:
            if resp.status not in (200, 404):
                raise UpstreamUnavailable(f"upstream answered {resp.status} for referrers",
                                          status=502)
            if resp.status == 404:
                return None
            body = await read_limited(resp, "referrers index")
            applied = "artifactType" in resp.headers.get("OCI-Filters-Applied", "")
        return UpstreamReferrers(body, bodies.referrers_index(body), applied)

    async def has_blob(self, repository: str, digest: Digest) -> bool:
        """Whether upstream holds the blob under ``repository`` (401, 403, 404: no).

        Raises:
            UpstreamUnavailable, TooManyRequests: upstream cannot say now.
        """
        return await self._holds(repository, f"blobs/{digest}", None)

    async def has_manifest(self, repository: str, digest: Digest) -> bool:
        """Whether upstream holds the manifest under ``repository`` (401, 403, 404: no).

        Raises:
            UpstreamUnavailable, TooManyRequests: upstream cannot say now.
        """
        return await self._holds(repository, f"manifests/{digest}", {"Accept": UPSTREAM_ACCEPT})

    async def _holds(self, repository: str, suffix: str,
                     headers: Mapping[str, str] | None) -> bool:
        try:
            async with self._request("HEAD", repository, suffix, headers=headers) as resp:
                status: int = resp.status
        except (Denied, NameUnknown):
            return False
        if status in (401, 403, 404):
            return False
        if status not in (200, 206):
            raise UpstreamUnavailable(f"upstream answered {status} when asked whether "
                                      f"{repository} holds {suffix.partition('/')[2]}",
                                      status=502)
        return True


def range_header(offset: int, end: int | None) -> str:
    """The ``Range`` value for bytes ``offset`` to ``end`` (exclusive; ``None``: to the end)."""
    return f"bytes={offset}-{'' if end is None else end - 1}"


def next_from_link(link: str | None) -> tuple[int | None, str | None]:
    """``n`` and ``last`` of an upstream ``Link: <...>; rel="next"`` header."""
    if not link or 'rel="next"' not in link.replace(" ", ""):
        return None, None
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        return None, None
    query = URL(link[start + 1:end]).query
    n = query.get("n", "")
    return (int(n) if is_number(n) else None), query.get("last")


def check_status(resp: aiohttp.ClientResponse, registry: str, what: str) -> None:
    """Anything but 200 from upstream is its failure, counted.

    Raises:
        UpstreamUnavailable: the status was not 200.
    """
    if resp.status != 200:
        metrics.UPSTREAM_ERRORS.labels(registry, "bad_content").inc()
        raise UpstreamUnavailable(f"upstream {registry} answered {resp.status} for a {what}",
                                  status=502)


async def read_limited(resp: aiohttp.ClientResponse, what: str,
                       limit: int = MANIFEST_MAX_BYTES) -> bytes:
    """The whole body of a small answer (manifest, tag list, referrers), refusing more.

    Raises:
        ManifestInvalid: the body is over ``limit``.
        UpstreamUnavailable: it broke off or was truncated.
    """
    if resp.content_length is not None and resp.content_length > limit:
        raise ManifestInvalid(f"upstream {what} is {resp.content_length} bytes, over the "
                              f"{limit} byte limit")
    parts: list[bytes] = []
    total = 0
    try:
        while chunk := await resp.content.read(65536):
            total += len(chunk)
            if total > limit:
                raise ManifestInvalid(f"upstream {what} exceeds the {limit} byte limit")
            parts.append(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"{what} download broke off: {type(exc).__name__}",
                                  status=502) from exc
    data = b"".join(parts)
    if resp.content_length is not None and len(data) != resp.content_length:
        raise UpstreamUnavailable(f"upstream {what} was truncated", status=502)
    return data
