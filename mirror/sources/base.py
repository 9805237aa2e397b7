"""The protocol every source of content implements, and what a request for content is."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror.oci import Digest
from mirror.storage.base import BodyResponse


@dataclass(frozen=True, slots=True)
class ContentRef:
    """Content by digest, and where it was asked for.

    Content-addressed sources (S3, peers, bundles) need only the digest; the
    upstream registry also needs the repository (its auth scope).
    """

    registry: str
    repository: str
    digest: Digest


class Source(Protocol):
    """One place a blob or manifest can come from after a local miss."""

    @property
    def kind(self) -> str:
        """A bounded label for metrics and logs: s3, upstream, memory, peer, parent, bundle."""
        ...

    def open_blob(self, ref: ContentRef, offset: int,
                  end: int | None = None) -> AbstractAsyncContextManager[BodyResponse]:
        """The blob's body from ``offset``: status 200 (from 0), 206 (resumed) or 404.

        With ``end``, only bytes up to ``end`` (exclusive) are asked for (a reader's
        range); a source that cannot ask for less may send more, which is left unread.

        Raises:
            Exception: the source failed; the chain moves on to the next one.
        """
        ...

    async def blob_size(self, ref: ContentRef) -> int | None:
        """The blob's size, or ``None`` when this source does not have it."""
        ...

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        """Manifest bytes and media type by digest, or ``None`` (not verified here)."""
        ...

    def wrong_bytes(self, ref: ContentRef) -> None:
        """This source served bytes that are not ``ref.digest`` (it may drop its copy)."""
        ...

    def offer_blob(self, ref: ContentRef, fill: FillResult) -> None:
        """A fill of ``ref`` started from another source: keep a copy if this source wants one."""
        ...

    def offer_manifest(self, ref: ContentRef, data: bytes, media_type: str) -> None:
        """A verified manifest came from another source: keep a copy if wanted."""
        ...


class FillResult(Protocol):
    """What a source that keeps copies needs of a fill (see :class:`mirror.fetch.Fill`)."""

    @property
    def source(self) -> str: ...

    @property
    def final(self) -> Path | None: ...

    async def wait_done(self) -> None: ...


class PassiveSource:
    """Defaults for a source that keeps no copies of others' content."""

    def wrong_bytes(self, ref: ContentRef) -> None:
        return None

    def offer_blob(self, ref: ContentRef, fill: FillResult) -> None:
        return None

    def offer_manifest(self, ref: ContentRef, data: bytes, media_type: str) -> None:
        return None
