"""The shared S3 tier of a region as a source, and the copies it keeps.

- A blob missing locally but present in S3 is read from S3 by the same
  single-flight fill as an upstream download; when S3 breaks off, the chain
  resumes from the next source at the same offset.
- What another source (the upstream) delivered is uploaded to S3 in the
  background once verified: the client's stream never waits for it, and a
  failed upload never fails a request.
- Cold blobs can be answered with a presigned 307 to S3 (``storage.s3.redirect``).
- S3 is optional at run time: any failure is counted (``mirror_s3_failures_total``),
  logged, and makes the tier step aside for ``failure_backoff``, so a dead
  endpoint costs a miss one failed call, not one per request.
- An object whose bytes are not its digest is garbage under its key: removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog

from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.config import S3Settings
from mirror.oci import Digest
from mirror.sources.base import ContentRef, FillResult
from mirror.storage.base import BodyReader, BodyResponse, absent
from mirror.storage.s3 import S3_ERRORS, S3Body, S3Store
from mirror.tasks import TaskGroup

log = structlog.get_logger(__name__)

KIND = "s3"
T = TypeVar("T")


class S3Source:
    """Look-ups, reads and background uploads of the region's bucket."""

    def __init__(self, store: S3Store, settings: S3Settings, clock: Clock = SYSTEM) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._down_until = 0.0
        self._queued: set[tuple[str, Digest]] = set()
        self._tasks = TaskGroup("s3")
        self._upload_slots = asyncio.Semaphore(settings.max_uploads)

    @property
    def kind(self) -> str:
        return KIND

    @property
    def redirect(self) -> bool:
        """Whether cold blobs found in S3 are answered with a presigned 307."""
        return self.settings.redirect

    def usable(self) -> bool:
        """False while backing off after a failure."""
        return self._clock.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: BaseException, digest: Digest | None = None) -> None:
        metrics.child(metrics.S3_FAILURES, operation).inc()
        self._down_until = self._clock.monotonic() + self.settings.failure_backoff
        log.warning("s3_failed", operation=operation, digest=str(digest) if digest else None,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    backoff_s=self.settings.failure_backoff)

    def _skipped(self, kind: str) -> bool:
        if self.usable():
            return False
        metrics.child(metrics.S3_LOOKUPS, kind, "skipped").inc()
        return True

    # --- reads ---------------------------------------------------------------------
    async def blob_size(self, ref: ContentRef) -> int | None:
        """The blob's size in S3, or ``None`` (absent, or S3 unavailable)."""
        return await self._look_up("blob", "head", ref.digest, self.store.blob_size)

    async def _look_up(self, kind: str, operation: str, digest: Digest,
                       call: Callable[[Digest], Awaitable[T | None]]) -> T | None:
        """One S3 look-up: skipped while backing off, counted, a failure is a miss."""
        if self._skipped(kind):
            return None
        try:
            found = await call(digest)
        except S3_ERRORS as exc:
            self._failed(operation, exc, digest)
            return None
        metrics.child(metrics.S3_LOOKUPS, kind, "miss" if found is None else "hit").inc()
        return found

    @asynccontextmanager
    async def open_blob(self, ref: ContentRef, offset: int,
                        end: int | None = None) -> AsyncIterator[BodyResponse]:
        """The blob's body from S3 (404 when absent or while S3 is backing off)."""
        if self._skipped("blob"):
            yield absent()
            return
        yielded = False
        try:
            async with self.store.open_blob(ref.digest, offset, end) as body:
                if offset == 0 and end is None:
                    result = "miss" if body.status == 404 else "hit"
                    metrics.child(metrics.S3_LOOKUPS, "blob", result).inc()
                yielded = True
                yield _counted(body) if body.status != 404 else body
        except _BREAKS as exc:
            self._failed("read" if yielded else "get", exc, ref.digest)
            raise
        except S3_ERRORS as exc:
            if not yielded:
                self._failed("get", exc, ref.digest)
            raise

    async def get_manifest(self, ref: ContentRef) -> tuple[bytes, str] | None:
        """Manifest bytes and media type from S3, or ``None``."""
        return await self._look_up("manifest", "get", ref.digest, self.store.get_manifest)

    def wrong_bytes(self, ref: ContentRef) -> None:
        """An object that fails verification is garbage under its key: remove it."""
        metrics.child(metrics.S3_FAILURES, "verify").inc()
        log.error("s3_object_corrupt", digest=str(ref.digest),
                  reason="its bytes do not hash to the digest")
        self._spawn(("delete", ref.digest), self._delete(ref.digest))

    async def _delete(self, digest: Digest) -> None:
        try:
            await self.store.delete_blob(digest)
        except S3_ERRORS as exc:
            self._failed("delete", exc, digest)

    async def presigned_url(self, digest: Digest) -> str | None:
        """A presigned GET URL for the blob if S3 has it, else ``None``."""
        if await self.blob_size(ContentRef("", "", digest)) is None:
            return None
        try:
            return await self.store.presign_blob(digest, self.settings.redirect_ttl)
        except S3_ERRORS as exc:
            self._failed("presign", exc, digest)
            return None

    # --- copies of what other sources delivered ------------------------------------------
    def offer_blob(self, ref: ContentRef, fill: FillResult) -> None:
        """Upload the blob once its fill is verified and kept (unless it came from S3)."""
        self._spawn(("blob", ref.digest), self._upload_blob_after(ref.digest, fill))

    def offer_manifest(self, ref: ContentRef, data: bytes, media_type: str) -> None:
        """Put a verified manifest in S3 in the background."""
        self._spawn(("manifest", ref.digest), self._upload_manifest(ref.digest, data, media_type))

    async def _upload_blob_after(self, digest: Digest, fill: FillResult) -> None:
        try:
            await fill.wait_done()
        except Exception:
            return  # nothing verified, nothing to share
        if fill.final is None or fill.source == KIND:
            return
        await self._upload_blob(digest, fill.final)

    async def _upload_blob(self, digest: Digest, path: Path) -> None:
        async with self._upload_slots:
            if not self.usable():
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

    async def _upload_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        async with self._upload_slots:
            if not self.usable():
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
        if key in self._queued:
            work.close()  # the same upload is already queued
            return
        self._queued.add(key)
        task = self._tasks.spawn(work, key[0])
        task.add_done_callback(lambda _t: self._queued.discard(key))

    async def drain(self) -> None:
        """Wait for every upload queued so far (tests; graceful shutdown)."""
        while self._tasks:
            await self._tasks.wait()

    async def close(self, grace: float = 5.0) -> None:
        """Give queued uploads ``grace`` seconds, then cancel the rest."""
        await self._tasks.close(grace)


_BREAKS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


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
