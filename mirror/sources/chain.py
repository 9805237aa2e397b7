"""The ordered chain of sources of one registry: first that has it, next on failure.

Blobs: a fill reads through one :class:`ChainOpener`. It opens the first usable
source that answers with the body (200 from the start, 206 for a resume); a
404 or a failure to answer moves on to the next source. A source that breaks
off mid-body hands the rest to the next one at the same offset. When the
finished bytes do not hash to the digest, every source the fill read from
(except the last, the upstream, which nothing could replace) is rejected for
that digest for ``reject_ttl``, and the fill may start over from the next.

Ranges (:meth:`SourceChain.open_range`): a reader far ahead of its fill asks the
first source that answers with exactly those bytes (206); nothing of it is kept.

Manifests by digest: the first source whose bytes hash to the digest; wrong
bytes reject the source for that digest and the next is asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from cachetools import TTLCache

from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.errors import ManifestInvalid
from mirror.oci import Digest
from mirror.sources.base import ContentRef, FillResult, Source
from mirror.sources.upstream import UpstreamSource
from mirror.storage.base import BodyReader, BodyResponse

log = structlog.get_logger(__name__)

#: What a body that breaks off raises; the fill resumes (through the chain) on these.
BREAKS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)
REJECT_TTL = 600.0


class Rejections:
    """Sources that served wrong bytes, per digest, for a while (shared by every chain)."""

    def __init__(self, ttl: float = REJECT_TTL, clock: Clock = SYSTEM) -> None:
        self._rejected: TTLCache[tuple[str, Digest], bool] = TTLCache(
            maxsize=100_000, ttl=ttl, timer=clock.monotonic)

    def add(self, source: Source, ref: ContentRef) -> None:
        """``source`` served bytes that are not ``ref.digest``: skip it for that digest."""
        self._rejected[(source.kind, ref.digest)] = True
        metrics.child(metrics.SOURCE_FILLS, source.kind, "rejected").inc()
        log.warning("source_rejected", source=source.kind, digest=str(ref.digest),
                    reason="bytes do not hash to the digest")
        source.wrong_bytes(ref)

    def rejected(self, source: Source, digest: Digest) -> bool:
        return (source.kind, digest) in self._rejected


class SourceChain:
    """The sources of one registry, in the order they are asked; its upstream is last."""

    def __init__(self, before: Sequence[Source], upstream: UpstreamSource,
                 rejections: Rejections | None = None) -> None:
        self.sources: tuple[Source, ...] = (*before, upstream)
        self.upstream = upstream
        self.rejections = rejections or Rejections()
        self._background: SourceChain | None = None

    def in_background(self) -> SourceChain:
        """The same chain for work no client waits for: upstream requests spend the
        registry's background budget (:meth:`UpstreamSource.in_background`)."""
        if self.upstream.background:
            return self
        if self._background is None:
            self._background = SourceChain(self.sources[:-1], self.upstream.in_background(),
                                           self.rejections)
        return self._background

    @property
    def name(self) -> str:
        """The registry's configured name."""
        return self.upstream.name

    def candidates(self, digest: Digest) -> list[Source]:
        """The sources worth asking for ``digest``: all but those that served it wrong (the
        last one always is). A source that is backing off answers as absent by itself."""
        *first, last = self.sources
        return [s for s in first if not self.rejections.rejected(s, digest)] + [last]

    def opener(self, ref: ContentRef) -> ChainOpener:
        """What one fill of ``ref`` reads through."""
        return ChainOpener(self, ref)

    @asynccontextmanager
    async def open_range(self, ref: ContentRef, start: int,
                         end: int) -> AsyncIterator[BodyResponse]:
        """Bytes ``start`` to ``end`` (exclusive) of a blob, from the first source that
        answers with a range (206), for one reader far ahead of the blob's fill: a
        region's owner, a parent, S3, then the upstream. The reader checks the answer
        against the blob's size; the bytes are never kept.

        Raises:
            Exception: whatever the last source raised (earlier failures are skipped).
        """
        candidates = self.candidates(ref.digest)
        for index, source in enumerate(candidates):
            last = index == len(candidates) - 1
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(source.open_blob(ref, start, end))
            except Exception as exc:
                await stack.aclose()
                if last:
                    raise
                _failed(source, ref, exc)
                continue
            if last or response.status == 206:
                async with stack:
                    yield _Counted.wrap(response, source.kind, ref.registry)
                return
            await stack.aclose()

    async def blob_size(self, ref: ContentRef) -> int | None:
        """The size from the first source that has the blob (``None``: none has it).

        Raises:
            Exception: whatever the last source raised (earlier failures are skipped).
        """
        candidates = self.candidates(ref.digest)
        for source in candidates:
            try:
                size = await source.blob_size(ref)
            except Exception as exc:
                if source is candidates[-1]:
                    raise
                _failed(source, ref, exc)
                continue
            if size is not None:
                return size
        return None

    async def manifest(self, ref: ContentRef) -> tuple[bytes, str, Source] | None:
        """Verified manifest bytes, the content type given, and the source they came from.

        Raises:
            ManifestInvalid: the last source sent bytes that are not the digest.
            Exception: whatever the last source raised.
        """
        candidates = self.candidates(ref.digest)
        for source in candidates:
            last = source is candidates[-1]
            try:
                found = await source.get_manifest(ref)
            except Exception as exc:
                if last:
                    raise
                _failed(source, ref, exc)
                continue
            if found is None:
                metrics.child(metrics.SOURCE_FILLS, source.kind, "absent").inc()
                continue
            data, content_type = found
            if Digest.of(data, ref.digest.algorithm) == ref.digest:
                metrics.child(metrics.SOURCE_FILLS, source.kind, "ok").inc()
                return data, content_type, source
            if last:
                metrics.UPSTREAM_ERRORS.labels(ref.registry, "digest_mismatch").inc()
                raise ManifestInvalid(f"{source.kind} sent a manifest whose digest is "
                                      f"{Digest.of(data, ref.digest.algorithm)}, not {ref.digest}")
            self.rejections.add(source, ref)
        return None

    def offer_blob(self, ref: ContentRef, fill: FillResult) -> None:
        """Every source may keep a copy of a new fill (the S3 tier uploads it)."""
        for source in self.sources:
            source.offer_blob(ref, fill)

    def offer_manifest(self, ref: ContentRef, data: bytes, media_type: str,
                       origin: Source) -> None:
        """Every source but the one it came from may keep a copy of a verified manifest."""
        for source in self.sources:
            if source is not origin:
                source.offer_manifest(ref, data, media_type)


class ChainOpener:
    """Opens a blob's body for one fill, moving along the chain as sources fail."""

    def __init__(self, chain: SourceChain, ref: ContentRef) -> None:
        self._chain = chain
        self._ref = ref
        self._sources = chain.candidates(ref.digest)
        self._index = 0
        self._used: set[int] = set()
        self.source = ""  # the kind of the source being read

    def __call__(self, offset: int) -> AbstractAsyncContextManager[BodyResponse]:
        """The body from ``offset`` (see :meth:`open`): a chain opener is a fill's opener."""
        return self.open(offset)

    @asynccontextmanager
    async def open(self, offset: int) -> AsyncIterator[BodyResponse]:
        """The body from ``offset``, from the first source that serves it."""
        response, stack, index = await self._first_answer(offset)
        async with stack:
            try:
                yield response
            except BREAKS as exc:
                source = self._sources[index]
                fail_over = getattr(source, "fail_over", None)
                if fail_over is not None and fail_over(self._ref):
                    pass  # the same source resumes from another of its nodes
                elif index < len(self._sources) - 1:
                    _failed(source, self._ref, exc)
                    self._index = index + 1  # the resume goes to the next source
                raise

    async def _first_answer(self, offset: int) -> tuple[BodyResponse, AsyncExitStack, int]:
        while True:
            index = self._index
            source = self._sources[index]
            last = index == len(self._sources) - 1
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(source.open_blob(self._ref, offset))
            except Exception as exc:
                await stack.aclose()
                if last:
                    raise
                _failed(source, self._ref, exc)
                self._index += 1
                continue
            if last or response.status == (206 if offset else 200):
                self._used.add(index)
                self.source = source.kind
                metrics.child(metrics.SOURCE_FILLS, source.kind, "ok").inc()
                return _Counted.wrap(response, source.kind, self._ref.registry), stack, index
            await stack.aclose()
            result = "absent" if response.status == 404 else "failed"
            metrics.child(metrics.SOURCE_FILLS, source.kind, result).inc()
            self._index += 1

    def wrong_bytes(self) -> bool:
        """The fill's bytes did not verify: reject the sources it read (but the last).

        Returns:
            Whether starting over can read from another source.
        """
        last = len(self._sources) - 1
        rejected = [self._sources[i] for i in self._used if i < last]
        for source in rejected:
            self._chain.rejections.add(source, self._ref)
        self._used.clear()
        self._sources = self._chain.candidates(self._ref.digest)
        self._index = 0
        return bool(rejected)


def _failed(source: Source, ref: ContentRef, exc: BaseException) -> None:
    metrics.child(metrics.SOURCE_FILLS, source.kind, "failed").inc()
    log.warning("source_failed", source=source.kind, digest=str(ref.digest),
                error=f"{type(exc).__name__}: {exc}"[:300], next="the next source")


@dataclass
class _Counted:
    """A body whose reads count ``mirror_source_bytes_total`` (and upstream bytes)."""

    status: int
    content_length: int | None
    headers: Mapping[str, str]
    content: BodyReader

    @classmethod
    def wrap(cls, response: BodyResponse, kind: str, registry: str) -> _Counted:
        counters = [metrics.child(metrics.SOURCE_BYTES, kind)]
        if kind == "upstream":
            counters.append(metrics.UPSTREAM_BYTES.labels(registry))
        return cls(response.status, response.content_length, response.headers,
                   _CountingReader(response.content, counters))


class _CountingReader:
    def __init__(self, inner: BodyReader, counters: list[Any]) -> None:
        self._inner = inner
        self._counters = counters

    def _count(self, data: bytes) -> bytes:
        for counter in self._counters:
            counter.inc(len(data))
        return data

    async def read(self, n: int = -1) -> bytes:
        return self._count(await self._inner.read(n))

    def read_nowait(self, n: int = -1) -> bytes:
        return self._count(self._inner.read_nowait(n))
