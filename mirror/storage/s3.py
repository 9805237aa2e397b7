"""Content-addressed storage in an S3 bucket (aiobotocore): the shared tier.

::

    s3://<bucket>/<prefix>/
      blobs/<algorithm>/<hex>        blob bytes, verified before the upload completed
      manifests/<algorithm>/<hex>    manifest bytes exactly as received;
                                     Content-Type and x-amz-meta-media-type = media type

Keys hold no shard folder: S3 partitions by key itself. An object appears only
when its upload completes, and :class:`S3BlobWriter` completes it only after
the bytes hashed to the digest, so any node that sees a key may trust it.
Blobs larger than one part go up as multipart uploads, one part in memory at
a time; reads are ranged and streamed in the HTTP client's chunks.

One client per process, made by :func:`open_s3` in the app's ``cleanup_ctx``;
its connection pool is bounded by ``storage.s3.max_connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.config import S3Settings
from mirror.errors import BlobUnknown
from mirror.oci import MANIFEST_MAX_BYTES, Digest
from mirror.storage.base import Body, BodyReader, absent, check_content

#: What a failing S3 endpoint raises: refused, timed out, 5xx, bad credentials.
S3_ERRORS: tuple[type[BaseException], ...] = (
    BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError, OSError,
)
#: S3 allows at most this many parts in one multipart upload.
MAX_PARTS = 10_000
_HASH_IN_THREAD = 1 << 20


@asynccontextmanager
async def open_s3(settings: S3Settings) -> AsyncIterator[S3Store]:
    """The process's one S3 client, closed on exit.

    Credentials come from the config when it names them, else from the
    standard AWS chain (environment, profile, instance role).
    """
    endpoint = str(settings.endpoint_url) if settings.endpoint_url else None
    config = AioConfig(
        max_pool_connections=settings.max_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # One retry: a dead endpoint must fail fast; the tier backs off instead.
        retries={"total_max_attempts": 2, "mode": "standard"},
        # S3-compatible stores (MinIO, Ceph, moto) want path-style addressing.
        s3={"addressing_style": "path" if endpoint else "auto"},
        signature_version="s3v4",
        # Content is verified by digest on both ends; skip botocore's default CRC trailers,
        # which older S3-compatible stores (MinIO, Ceph) reject and which cost a body copy.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    credentials: dict[str, str] = {}
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        credentials = {"aws_access_key_id": settings.access_key_id.reveal(),
                       "aws_secret_access_key": settings.secret_access_key.reveal()}
    session = get_session()
    async with session.create_client("s3", region_name=settings.region, endpoint_url=endpoint,
                                     config=config, **credentials) as client:
        yield S3Store(client, settings.bucket, settings.prefix, settings.part_size)


def is_not_found(exc: BaseException) -> bool:
    """Whether an S3 error means "no such object"."""
    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


class S3Store:
    """Blobs and manifests by digest in one bucket under one prefix."""

    def __init__(self, client: Any, bucket: str, prefix: str = "",
                 part_size: int = 16 << 20) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size

    def _key(self, kind: str, digest: Digest) -> str:
        path = f"{kind}/{digest.algorithm}/{digest.hex}"
        return f"{self.prefix}/{path}" if self.prefix else path

    def blob_key(self, digest: Digest) -> str:
        """The object key of a blob."""
        return self._key("blobs", digest)

    def manifest_key(self, digest: Digest) -> str:
        """The object key of a manifest."""
        return self._key("manifests", digest)

    async def blob_size(self, digest: Digest) -> int | None:
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=self.blob_key(digest))
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        return int(head["ContentLength"])

    async def begin_blob(self, digest: Digest,
                         expected_size: int | None = None) -> S3BlobWriter:
        part_size = self.part_size
        if expected_size is not None:
            part_size = max(part_size, -(-expected_size // MAX_PARTS))
        return S3BlobWriter(self, digest, expected_size, part_size)

    async def upload_file(self, digest: Digest, path: Path) -> int:
        """Upload a local blob file, hashing it again on the way (one part in memory).

        Returns:
            The bytes uploaded.

        Raises:
            DigestMismatch: the file is not the blob (nothing was published).
        """
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            size = await asyncio.to_thread(lambda: path.stat().st_size)
            writer = await self.begin_blob(digest, size)
            try:
                while data := await asyncio.to_thread(handle.read, writer.part_size):
                    await writer.write(data)
                await writer.commit()
            except BaseException:
                await asyncio.shield(writer.abort())
                raise
        finally:
            await asyncio.to_thread(handle.close)
        return size

    async def read_blob(self, digest: Digest, start: int = 0, end: int | None = None,
                        chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        async with self.open_blob(digest, start, end) as response:
            if response.status == 404:
                raise BlobUnknown(f"blob {digest} is not in the bucket")
            while data := await response.content.read(chunk_size):
                yield data

    @asynccontextmanager
    async def open_blob(self, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[S3Body]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.blob_key(digest)}
        if offset or end is not None:
            params["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        try:
            answer = await self.client.get_object(**params)
        except ClientError as exc:
            if not is_not_found(exc):
                raise
            yield absent()
            return
        body = answer["Body"]
        try:
            headers = {"Content-Range": answer["ContentRange"]} if "ContentRange" in answer else {}
            status = 206 if "Range" in params else 200
            yield S3Body(status, int(answer["ContentLength"]), headers, _reader(body))
        finally:
            body.close()

    async def presign_blob(self, digest: Digest, expires: float) -> str:
        """A URL that lets anyone GET the blob for ``expires`` seconds."""
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.blob_key(digest)},
            ExpiresIn=max(1, int(expires)))
        return url

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        try:
            answer = await self.client.get_object(Bucket=self.bucket,
                                                  Key=self.manifest_key(digest))
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        body = answer["Body"]
        try:
            if int(answer["ContentLength"]) > MANIFEST_MAX_BYTES:
                return None
            data: bytes = await body.read()
        finally:
            body.close()
        media_type = answer.get("Metadata", {}).get("media-type") or answer.get("ContentType")
        if not media_type or not digest.matches(data):
            return None  # never serve what does not verify; the caller fetches elsewhere
        return data, str(media_type)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        await self.client.put_object(Bucket=self.bucket, Key=self.manifest_key(digest), Body=data,
                                     ContentType=media_type,
                                     Metadata={"media-type": media_type})

    async def list_blobs(self) -> AsyncIterator[Digest]:
        async for digest in self._list("blobs"):
            yield digest

    async def list_manifests(self) -> AsyncIterator[Digest]:
        async for digest in self._list("manifests"):
            yield digest

    async def _list(self, kind: str) -> AsyncIterator[Digest]:
        start = f"{self.prefix}/{kind}/" if self.prefix else f"{kind}/"
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                algorithm, _, hex_part = item["Key"][len(start):].partition("/")
                try:
                    yield Digest.parse(f"{algorithm}:{hex_part}")
                except Exception:
                    continue  # a foreign object under our prefix: not ours to list

    async def delete_blob(self, digest: Digest) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(digest))

    async def delete_manifest(self, digest: Digest) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=self.manifest_key(digest))


#: An S3 object body as a response-like object a fill reads.
S3Body = Body


def _reader(body: Any) -> BodyReader:
    """The aiohttp stream under aiobotocore's body: its errors are the ones fills resume on."""
    raw = getattr(body, "raw_stream", None)
    content = getattr(raw, "content", None)
    if isinstance(content, aiohttp.StreamReader):
        return content
    return _BodyAdapter(body)


class _BodyAdapter:
    """For an HTTP backend other than aiohttp: aiobotocore's own ``read``."""

    def __init__(self, body: Any) -> None:
        self._body = body

    async def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = await self._body.read(n if n > 0 else None)
        except BotoCoreError as exc:
            raise aiohttp.ClientPayloadError(f"S3 body broke off: {exc}") from exc
        return data

    def read_nowait(self, n: int = -1) -> bytes:
        return b""


class S3BlobWriter:
    """A blob upload that completes only once its bytes hash to the digest.

    Bytes are buffered up to one part; a blob that fits in one part is sent
    with one PUT at commit, a larger one as a multipart upload whose parts go
    up while the rest is written. The multipart upload is completed (made
    visible) only after verification, and aborted otherwise.
    """

    def __init__(self, store: S3Store, digest: Digest, expected_size: int | None,
                 part_size: int) -> None:
        self._store = store
        self._digest = digest
        self._expected = expected_size
        self.part_size = part_size
        self._hasher: Any = digest.hasher()
        self._buffer = bytearray()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._closed = False

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write after commit or abort")
        if len(data) >= _HASH_IN_THREAD:
            await asyncio.to_thread(self._hasher.update, data)
        else:
            self._hasher.update(data)
        self._size += len(data)
        if not self._buffer and len(data) == self.part_size:
            await self._upload_part(data)  # a whole part as given: no copy
            return
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[:self.part_size])
            del self._buffer[:self.part_size]
            await self._upload_part(part)

    async def _upload_part(self, data: bytes) -> None:
        client, bucket = self._store.client, self._store.bucket
        key = self._store.blob_key(self._digest)
        if self._upload_id is None:
            started = await client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/octet-stream")
            self._upload_id = str(started["UploadId"])
        number = len(self._parts) + 1
        answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=self._upload_id,
                                          PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def commit(self) -> None:
        if self._closed:
            raise ValueError("commit after commit or abort")
        try:
            check_content(self._digest, self._hasher.hexdigest(), self._size, self._expected)
            await self._publish()
        except BaseException:
            await asyncio.shield(self.abort())
            raise
        self._closed = True

    async def _publish(self) -> None:
        client, bucket = self._store.client, self._store.bucket
        key = self._store.blob_key(self._digest)
        if self._upload_id is None:
            await client.put_object(Bucket=bucket, Key=key, Body=bytes(self._buffer),
                                    ContentType="application/octet-stream")
        else:
            if self._buffer:
                await self._upload_part(bytes(self._buffer))
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts})
        self._buffer.clear()

    async def abort(self) -> None:
        self._closed = True
        self._buffer.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            # On failure, the bucket's lifecycle rule for incomplete uploads cleans up.
            with contextlib.suppress(*S3_ERRORS):
                await self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._store.blob_key(self._digest),
                    UploadId=upload_id)
