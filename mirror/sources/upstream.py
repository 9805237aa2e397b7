"""The upstream registry as a source: always last in the chain, and the only one that knows
tags, tag lists and referrers (those are never taken from any other source)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from mirror import metrics
from mirror.errors import ManifestInvalid, UpstreamUnavailable
from mirror.oci import MANIFEST_MAX_BYTES, UPSTREAM_ACCEPT
from mirror.sources.base import ContentRef, PassiveSource
from mirror.storage.base import BodyResponse

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


class UpstreamSource(PassiveSource):
    """Blobs and manifests by digest from one registry."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    @property
    def kind(self) -> str:
        return KIND

    @asynccontextmanager
    async def open_blob(self, ref: ContentRef, offset: int,
                        end: int | None = None) -> AsyncIterator[BodyResponse]:
        headers = {"Range": range_header(offset, end)} if offset or end is not None else None
        async with self.client.request("GET", ref.repository, f"blobs/{ref.digest}",
                                       headers=headers) as resp:
            yield resp

    async def blob_size(self, ref: ContentRef) -> int | None:
        """The size from a ``HEAD`` (``None``: upstream does not have it).

        Raises:
            UpstreamUnavailable: upstream failed or sent no length.
        """
        async with self.client.request("HEAD", ref.repository, f"blobs/{ref.digest}") as resp:
            if resp.status == 404:
                return None
            if resp.status != 200 or resp.content_length is None:
                raise UpstreamUnavailable(f"upstream answered {resp.status} to a blob HEAD "
                                          "without a usable length", status=502)
            return resp.content_length

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        fetched = await fetch_manifest(self.client, ref.repository, str(ref.digest))
        if fetched is None:
            return None
        return fetched.data, fetched.content_type or ""


async def fetch_manifest(client: RegistryClient, repository: str,
                         reference: str) -> Fetched | None:
    """GET a manifest by tag or digest (``None``: upstream says 404).

    Raises:
        UpstreamUnavailable: upstream failed or broke off.
        ManifestInvalid: the body is over the size limit.
    """
    async with client.request("GET", repository, f"manifests/{reference}",
                              headers={"Accept": UPSTREAM_ACCEPT}) as resp:
        if resp.status == 404:
            return None
        check_status(resp, client.name, "manifest")
        data = await read_limited(resp, "manifest")
        return Fetched(data, resp.headers.get("Content-Type"),
                       resp.headers.get("Docker-Content-Digest"))


def range_header(offset: int, end: int | None) -> str:
    """The ``Range`` value for bytes ``offset`` to ``end`` (exclusive; ``None``: to the end)."""
    return f"bytes={offset}-{'' if end is None else end - 1}"


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
