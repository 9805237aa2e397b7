"""The shared S3 tier: consulted after the local disk, before upstream.

- A blob missing locally but present in S3 is filled from S3 through the
  same single-flight :class:`~mirror.fetch.Fill` as an upstream download:
  every reader streams the growing local temp file, which is verified and
  published like any other. If S3 fails to open the body (at the start or at a
  resume point), the fill continues from upstream with a ``Range`` request.
- A blob or manifest fetched from upstream is uploaded to S3 in the background
  once verified; the client's stream never waits for it and an upload failure
  never fails a request.
- S3 is optional at run time: any failure is counted
  (``mirror_s3_failures_total``), logged, and makes the tier step aside for
  ``failure_backoff``, so a dead endpoint costs a miss one failed call, not one
  per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import structlog

from mirror import metrics
from mirror.config import S3Settings
from mirror.errors import FillError
from mirror.fetch import DigestMismatch, Fetcher, Fill, UpstreamOpener
from mirror.oci import Digest
from mirror.storage.base import BodyReader, BodyResponse
from mirror.storage.s3 import S3_ERRORS, S3Body, S3Store

log = structlog.get_logger(__name__)

#: The fills' ``registry`` label (metrics, logs) when a blob comes from S3.
SOURCE = "s3"


class SharedTier:
    """The S3 tier as the caches use it: look-ups, fills, background uploads."""

    def __init__(self, store: S3Store, settings: S3Settings) -> None:
        self.store = store
        self.settings = settings
        self._down_until = 0.0
        self._uploads: dict[tuple[str, Digest], asyncio.Task[None]] = {}
        self._upload_slots = asyncio.Semaphore(settings.max_uploads)

    @property
    def redirect(self) -> bool:
        """Whether cold blobs found in S3 are answered with a presigned 307."""
        return self.settings.redirect

    def available(self) -> bool:
        """False while backing off after a failure."""
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: BaseException, digest: Digest | None = None) -> None:
        metrics.child(metrics.S3_FAILURES, operation).inc()
        self._down_until = time.monotonic() + self.settings.failure_backoff
        log.warning("s3_failed", operation=operation, digest=str(digest) if digest else None,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    backoff_s=self.settings.failure_backoff)

    # --- blobs -------------------------------------------------------------------
    async def blob_size(self, digest: Digest) -> int | None:
        """The blob's size in S3, or ``None`` (absent, or S3 unavailable)."""
        if not self.available():
            metrics.child(metrics.S3_LOOKUPS, "blob", "skipped").inc()
            return None
        try:
            size = await self.store.blob_size(digest)
        except S3_ERRORS as exc:
            self._failed("head", exc, digest)
            return None
        metrics.child(metrics.S3_LOOKUPS, "blob", "miss" if size is None else "hit").inc()
        return size

    async def fill(self, fetcher: Fetcher, digest: Digest, upstream: UpstreamOpener,
                   registry: str, expected_size: int | None) -> tuple[Fill, bool]:
        """Join the fill of ``digest``, or start one from S3, else from upstream.

        Returns:
            The fill, and whether this call joined one under way.
        """
        if fetcher.current(digest) is None:
            size = await self.blob_size(digest)
            # A manifest's size is only a hint (anyone's manifest may declare any size):
            # S3's object is judged by its digest on the way in, not by the hint.
            if size is not None and fetcher.current(digest) is None:
                opener = self._opener(digest, upstream)
                fill, joined = await fetcher.start(digest, opener, SOURCE, size)
                if not joined:
                    self._spawn(("check", digest), self._check_fill_from_s3(fill))
                return fill, joined
        fill, joined = await fetcher.start(digest, upstream, registry, expected_size)
        if not joined:
            self._spawn(("blob", digest), self._upload_blob_after(fill))
        return fill, joined

    def _opener(self, digest: Digest, upstream: UpstreamOpener) -> UpstreamOpener:
        def opener(offset: int) -> AbstractAsyncContextManager[BodyResponse]:
            return self._open(digest, offset, upstream)
        return opener

    @asynccontextmanager
    async def _open(self, digest: Digest, offset: int,
                    upstream: UpstreamOpener) -> AsyncIterator[BodyResponse]:
        async with AsyncExitStack() as stack:
            response: BodyResponse | None = None
            if self.available():
                try:
                    body = await stack.enter_async_context(self.store.open_blob(digest, offset))
                    response = _counted(body) if body.status != 404 else None
                except S3_ERRORS as exc:
                    self._failed("get", exc, digest)
            if response is None:
                # Gone from S3 or S3 failing: upstream continues from the same offset.
                log.info("s3_fill_fallback", digest=str(digest), offset=offset)
                response = await stack.enter_async_context(upstream(offset))
            try:
                yield response
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                    TimeoutError) as exc:
                if isinstance(response, S3Body):
                    self._failed("read", exc, digest)
                raise  # the fill resumes through this opener, now from upstream

    async def _check_fill_from_s3(self, fill: Fill) -> None:
        """An object that fails verification is garbage under its key: remove it."""
        try:
            await fill.wait_done()
        except FillError:
            if isinstance(fill.error, DigestMismatch):
                await self._drop_bad_blob(fill.digest, "its bytes do not hash to the digest")

    async def _drop_bad_blob(self, digest: Digest, why: str) -> None:
        metrics.child(metrics.S3_FAILURES, "verify").inc()
        log.error("s3_object_corrupt", digest=str(digest), reason=why)
        try:
            await self.store.delete_blob(digest)
        except S3_ERRORS as exc:
            self._failed("delete", exc, digest)

    async def presigned_url(self, digest: Digest) -> str | None:
        """A presigned GET URL for the blob if S3 has it, else ``None``."""
        if await self.blob_size(digest) is None:
            return None
        try:
            return await self.store.presign_blob(digest, self.settings.redirect_ttl)
        except S3_ERRORS as exc:
            self._failed("presign", exc, digest)
            return None

    async def _upload_blob_after(self, fill: Fill) -> None:
        try:
            await fill.wait_done()
        except FillError:
            return  # nothing verified, nothing to share
        if fill.final is None:
            return
        digest, path = fill.digest, fill.final
        async with self._upload_slots:
            if not self.available():
                metrics.child(metrics.S3_UPLOADS, "blob", "skipped").inc()
                return
            try:
                if await self.store.blob_size(digest) is not None:
                    metrics.child(metrics.S3_UPLOADS, "blob", "exists").inc()
                    return
                size = await self.store.upload_file(digest, path)
            except FileNotFoundError:
                return  # evicted locally before we got to it; another fill will share it
            except Exception as exc:  # S3 errors, or a file that is not the blob
                metrics.child(metrics.S3_UPLOADS, "blob", "failed").inc()
                self._failed("upload", exc, digest)
                return
        metrics.child(metrics.S3_UPLOADS, "blob", "ok").inc()
        metrics.child(metrics.S3_UPLOAD_BYTES, "blob").inc(size)
        log.info("s3_uploaded", kind="blob", digest=str(digest), bytes=size)

    # --- manifests -----------------------------------------------------------------
    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """Verified manifest bytes and media type from S3, or ``None``."""
        if not self.available():
            metrics.child(metrics.S3_LOOKUPS, "manifest", "skipped").inc()
            return None
        try:
            found = await self.store.get_manifest(digest)
        except S3_ERRORS as exc:
            self._failed("get", exc, digest)
            return None
        metrics.child(metrics.S3_LOOKUPS, "manifest", "miss" if found is None else "hit").inc()
        return found

    def upload_manifest_later(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Put a verified manifest in S3 in the background."""
        self._spawn(("manifest", digest), self._upload_manifest(digest, data, media_type))

    async def _upload_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        async with self._upload_slots:
            if not self.available():
                metrics.child(metrics.S3_UPLOADS, "manifest", "skipped").inc()
                return
            try:
                await self.store.put_manifest(digest, data, media_type)
            except S3_ERRORS as exc:
                metrics.child(metrics.S3_UPLOADS, "manifest", "failed").inc()
                self._failed("put", exc, digest)
                return
        metrics.child(metrics.S3_UPLOADS, "manifest", "ok").inc()
        metrics.child(metrics.S3_UPLOAD_BYTES, "manifest").inc(len(data))

    # --- background work -------------------------------------------------------------
    def _spawn(self, key: tuple[str, Digest], work: Coroutine[Any, Any, None]) -> None:
        if key in self._uploads:
            work.close()  # the same upload is already queued
            return
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._uploads[key] = task
        task.add_done_callback(lambda _t: self._uploads.pop(key, None))

    async def drain(self) -> None:
        """Wait for every upload queued so far (tests; graceful shutdown)."""
        while self._uploads:
            await asyncio.gather(*self._uploads.values(), return_exceptions=True)

    async def close(self, grace: float = 5.0) -> None:
        """Give queued uploads ``grace`` seconds, then cancel the rest."""
        tasks = list(self._uploads.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class _CountingReader:
    """Counts the bytes a fill reads from S3 (``mirror_s3_read_bytes_total``)."""

    def __init__(self, inner: BodyReader) -> None:
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        metrics.S3_READ_BYTES.inc(len(data))
        return data

    def read_nowait(self, n: int = -1) -> bytes:
        data = self._inner.read_nowait(n)
        metrics.S3_READ_BYTES.inc(len(data))
        return data


def _counted(body: S3Body) -> S3Body:
    return S3Body(body.status, body.content_length, body.headers, _CountingReader(body.content))
