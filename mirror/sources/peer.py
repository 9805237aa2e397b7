"""Other mirror nodes as sources: the owner of a digest in this region, and parent regions.

Both speak the OCI pull API under ``/_peer`` with a signed peer token, by digest
only, and never for tags (each region resolves tags against the upstream).

- :class:`PeerSource` asks the digest's owner in this region (rendezvous hash over
  the healthy peers). The owner fills from its own S3 tier and upstream, single
  flight, and streams while it downloads, so a blob missed by every node at once
  costs the region one upstream download. An owner that does not send headers
  within ``header_timeout``, or fails, is passed over for the next in hash order,
  until this node itself comes next: then this node fills from S3 or upstream.
- :class:`ParentSource` asks the parent regions' mirrors, nearest first; a parent
  serves from its own region (its peers, its S3, its upstream), never from its parents.

A peer that serves wrong bytes is quarantined; the chain then skips peers for that
digest and the pull goes on from the next source.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import structlog
from cachetools import TTLCache
from yarl import URL

from mirror.cluster import HOP_HEADER, POPULAR_PATH, PeerSet, TokenSource
from mirror.config import ClusterSettings
from mirror.errors import OciError
from mirror.sources.base import ContentRef, PassiveSource
from mirror.sources.upstream import range_header, read_limited
from mirror.storage.base import BodyResponse, absent

log = structlog.get_logger(__name__)

_FAILURES = (aiohttp.ClientError, TimeoutError, OSError)


class _NodeSource(PassiveSource):
    """What peers and parents share: requests to other nodes' ``/_peer`` API."""

    kind_name = "peer"
    hop = "peer"

    def __init__(self, settings: ClusterSettings, session: aiohttp.ClientSession,
                 token: TokenSource) -> None:
        self._settings = settings
        self._session = session
        self._token = token
        # digest -> nodes tried for it (a break mid-body moves on to the next one)
        self._tried: TTLCache[str, set[str]] = TTLCache(maxsize=10_000, ttl=120)
        self._serving: TTLCache[str, str] = TTLCache(maxsize=10_000, ttl=600)

    @property
    def kind(self) -> str:
        return self.kind_name

    def _nodes(self, key: str) -> list[str]:
        raise NotImplementedError

    def _failed(self, url: str, reason: str) -> None:
        return None

    def _succeeded(self, url: str) -> None:
        return None

    def _candidates(self, ref: ContentRef) -> list[str]:
        tried = self._tried.get(str(ref.digest), set())
        return [u for u in self._nodes(str(ref.digest)) if u not in tried]

    def _mark_tried(self, ref: ContentRef, url: str) -> None:
        key = str(ref.digest)
        self._tried[key] = {*self._tried.get(key, set()), url}

    def fail_over(self, ref: ContentRef) -> bool:
        """The node serving ``ref`` broke off: try the next one (``False``: none is left)."""
        url = self._serving.pop(str(ref.digest), None)
        if url is not None:
            self._mark_tried(ref, url)
            self._failed(url, "broke off")
        return bool(self._candidates(ref))

    def wrong_bytes(self, ref: ContentRef) -> None:
        url = self._serving.pop(str(ref.digest), None)
        if url is not None:
            self._quarantine(url)

    def _quarantine(self, url: str) -> None:
        log.error("node_sent_wrong_bytes", node=url, kind=self.kind)

    def _url(self, base: str, ref: ContentRef, what: str) -> URL:
        return URL(f"{base}/_peer/v2/{ref.repository}/{what}/{ref.digest}").with_query(
            ns=ref.registry)

    async def _ask(self, ref: ContentRef, what: str, method: str = "GET", offset: int = 0,
                   end: int | None = None) -> tuple[aiohttp.ClientResponse, str] | None:
        """The first node that answers with headers in time, and its URL; ``None``: none."""
        for url in self._candidates(ref):
            target = self._url(url, ref, what)
            # a token for this node, method and path only
            headers = {**self._token.headers(target, method), HOP_HEADER: self.hop}
            if offset or end is not None:
                headers["Range"] = range_header(offset, end)
            try:
                response = await asyncio.wait_for(self._session.request(
                    method, target, headers=headers), self._settings.header_timeout)
            except _FAILURES as exc:
                self._mark_tried(ref, url)
                self._failed(url, type(exc).__name__)
                continue
            if response.status in (200, 206):
                self._succeeded(url)
                return response, url
            response.release()
            if response.status == 404:
                return None  # the owner went to its own sources: upstream does not have it
            self._mark_tried(ref, url)
            self._failed(url, f"status {response.status}")
        return None

    @asynccontextmanager
    async def open_blob(self, ref: ContentRef, offset: int,
                        end: int | None = None) -> AsyncIterator[BodyResponse]:
        found = await self._ask(ref, "blobs", offset=offset, end=end)
        if found is None:
            yield absent()
            return
        response, url = found
        if end is None:  # a reader's range is not the fill: it must not move the fill over
            self._serving[str(ref.digest)] = url
        try:
            yield response
        finally:
            response.release()

    async def blob_size(self, ref: ContentRef) -> int | None:
        found = await self._ask(ref, "blobs", method="HEAD")
        if found is None:
            return None
        response, _ = found
        response.release()
        return response.content_length

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        found = await self._ask(ref, "manifests")
        if found is None:
            return None
        response, url = found
        self._serving[str(ref.digest)] = url
        try:
            data = await read_limited(response, "manifest")
        finally:
            response.release()
        return data, response.headers.get("Content-Type", "")


class PeerSource(_NodeSource):
    """The owner of a digest in this region, by rendezvous hash over the healthy peers."""

    kind_name = "peer"
    hop = "peer"

    def __init__(self, settings: ClusterSettings, session: aiohttp.ClientSession,
                 token: TokenSource, peers: PeerSet) -> None:
        super().__init__(settings, session, token)
        self._peers = peers

    def _nodes(self, key: str) -> list[str]:
        ranked = self._peers.ranked(key)
        return ranked[:ranked.index(self._peers.self_url)]

    def _failed(self, url: str, reason: str) -> None:
        self._peers.failed(url, reason)

    def _succeeded(self, url: str) -> None:
        self._peers.succeeded(url)

    def _quarantine(self, url: str) -> None:
        self._peers.quarantine(url)


class ParentSource(_NodeSource):
    """The mirrors of parent regions, nearest first."""

    kind_name = "parent"
    hop = "child"

    def __init__(self, settings: ClusterSettings, session: aiohttp.ClientSession,
                 token: TokenSource, clock_monotonic: Callable[[], float]) -> None:
        super().__init__(settings, session, token)
        self._now = clock_monotonic
        self._down: dict[str, float] = {}

    def _nodes(self, key: str) -> list[str]:
        now = self._now()
        return [u for u in self._settings.parents if self._down.get(u, 0.0) <= now]

    def _failed(self, url: str, reason: str) -> None:
        # A parent that failed is skipped for a while, like a peer out of the hash.
        self._down[url] = self._now() + self._settings.health_interval * 5
        log.warning("parent_failed", parent=url, reason=reason)

    def _quarantine(self, url: str) -> None:
        self._down[url] = self._now() + self._settings.quarantine
        log.error("parent_quarantined", parent=url, seconds=self._settings.quarantine)

    async def popular(self, top: int) -> list[Any]:
        """Each answering parent's most pulled tags (``/_peer/popular``), for the sync loop.

        Unverified JSON: the caller checks every item; a parent that fails is skipped.
        """
        documents = []
        timeout = aiohttp.ClientTimeout(total=max(2.0, self._settings.header_timeout * 10))
        for url in self._settings.parents:
            target = URL(f"{url}{POPULAR_PATH}").with_query(top=str(top))
            try:
                async with self._session.get(target, headers=self._token.headers(target),
                                             timeout=timeout) as resp:
                    if resp.status != 200:
                        continue
                    documents.append(json.loads(await read_limited(resp, "popular list")))
            except (*_FAILURES, ValueError, OciError) as exc:
                log.warning("parent_popular_failed", parent=url, error=type(exc).__name__)
        return documents
