"""The shared S3 tier in process: mirror apps in front of the fake upstream and moto's S3.

Local disk first, then S3, then upstream; what comes from upstream goes to S3
in the background; two nodes sharing a bucket fetch each blob upstream once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from mirror import config
from mirror.server.app import create_app
from mirror.server.state import NODE
from tests.support.fake import OCI_INDEX, OCI_MANIFEST, FakeRegistry, sha256
from tests.support.net import free_port
from tests.support.s3 import MotoS3, credential_files, s3_config
from tests.support.throttle import ThrottledProxy
from tests.unit.conftest import cache_files, mirror_settings

Client = TestClient[Any, Any]
NodeFactory = Callable[..., Awaitable[Client]]
ALL_TYPES = f"{OCI_INDEX}, {OCI_MANIFEST}"
MiB = 1 << 20


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket("tier")


@pytest.fixture
def make_node(tmp_path: Path, upstream: TestServer, aiohttp_client: Any, moto_s3: MotoS3,
              bucket: str) -> NodeFactory:
    """A mirror node with its own local folder, sharing ``bucket`` with the other nodes."""

    async def start(name: str, **s3_extra: Any) -> Client:
        url = str(upstream.make_url("")).rstrip("/")
        s3 = s3_config(moto_s3, bucket, tmp_path / "creds", prefix="eu", **s3_extra)
        settings = _settings(tmp_path / name, url, s3)
        client: Client = await aiohttp_client(create_app(settings))
        return client

    return start


def _settings(path: Path, upstream_url: str, s3: dict[str, Any]) -> config.Settings:
    """The unit tests' mirror settings, with ``storage.s3``."""
    storage = config.parse({"storage": {"path": str(path), "s3": s3}}, env={}).storage
    return dataclasses.replace(mirror_settings(path, upstream_url), storage=storage)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _drain(node: Client) -> None:
    s3 = node.server.app[NODE].s3
    assert s3 is not None
    await s3.drain()


def _layers() -> list[bytes]:
    # One layer past a chunk and an S3 part boundary, and small ones.
    big = hashlib.sha256(b"big").digest() * (6 * MiB // 32 + 1000)
    return [big, b"small-layer-one", b"small-layer-two"]


async def _pull(node: Client, repo: str, ref: str) -> dict[str, bytes]:
    """Pull like a client: the manifest (and children), every blob; returns digest -> bytes."""
    seen: dict[str, bytes] = {}
    pending = [ref]
    while pending:
        response = await node.get(f"/v2/{repo}/manifests/{pending.pop()}",
                                  headers={"Accept": ALL_TYPES})
        assert response.status == 200
        body = await response.read()
        seen[sha256(body)] = body
        document = json.loads(body)
        pending += [m["digest"] for m in document.get("manifests", [])]
        for blob in [document.get("config"), *document.get("layers", [])]:
            if blob is None:
                continue
            answer = await node.get(f"/v2/{repo}/blobs/{blob['digest']}")
            assert answer.status == 200
            data = await answer.read()
            assert sha256(data) == blob["digest"]
            seen[blob["digest"]] = data
    return seen


async def test_a_miss_goes_upstream_and_then_to_s3(make_node: NodeFactory, fake: FakeRegistry,
                                                   moto_s3: MotoS3, bucket: str) -> None:
    digest, _ = fake.add_image("app", "v1", _layers())
    uploads = _metric("mirror_s3_uploads_total", kind="blob", result="ok")
    node = await make_node("a")
    pulled = await _pull(node, "app", "v1")
    await _drain(node)
    keys = set(moto_s3.keys(bucket))
    for item, data in pulled.items():
        kind = "manifests" if item == digest else "blobs"
        key = f"eu/{kind}/sha256/{item.split(':')[1]}"
        assert key in keys
        assert moto_s3.get(bucket, key) == data
    assert _metric("mirror_s3_uploads_total", kind="blob", result="ok") - uploads == 4
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"eu/manifests/sha256/{digest[7:]}")
    assert head["ContentType"] == OCI_MANIFEST


async def test_two_nodes_sharing_a_bucket_fetch_each_blob_upstream_once(
        make_node: NodeFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    amd, amd_body = fake.add_image("multi", None, _layers(), arch="amd64")
    arm, arm_body = fake.add_image("multi", None, [b"arm-layer"], arch="arm64")
    index = fake.add_index("multi", "v1", [(amd, amd_body, "amd64"), (arm, arm_body, "arm64")])
    node_a = await make_node("a")
    through_a = await _pull(node_a, "multi", "v1")
    await _drain(node_a)
    blob_gets = fake.count("GET", "/blobs/")
    digest_gets = fake.count("GET", "/manifests/sha256:")
    s3_hits = _metric("mirror_s3_lookups_total", kind="blob", result="hit")

    node_b = await make_node("b")
    through_b = await _pull(node_b, "multi", "v1")
    assert through_b == through_a
    assert fake.count("GET", "/blobs/") == blob_gets  # zero upstream blob requests through B
    assert fake.count("GET", "/manifests/sha256:") == digest_gets
    blobs = {d.split(":")[1] for d in through_a if d not in (index, amd, arm)}
    assert len(blobs) == 6  # two configs, four layers
    assert _metric("mirror_s3_lookups_total", kind="blob", result="hit") - s3_hits == 6
    # B keeps them on its own disk: the next pull needs neither S3 nor upstream.
    assert {p.name for p in cache_files(tmp_path / "b") if "blobs" in p.parts} == blobs


async def test_a_herd_on_a_blob_in_s3_is_one_s3_read_streamed_to_all(
        make_node: NodeFactory, fake: FakeRegistry) -> None:
    big = _layers()[0]
    digest = fake.add_blob(big)
    fake.add_image("app", "v1", [big])
    node_a = await make_node("a")
    await _pull(node_a, "app", "v1")
    await _drain(node_a)
    node_b = await make_node("b")
    read_before = _metric("mirror_s3_read_bytes_total")

    async def get() -> bytes:
        response = await node_b.get(f"/v2/app/blobs/{digest}")
        assert response.status == 200
        return await response.read()

    bodies = await asyncio.gather(*(get() for _ in range(8)))
    assert all(body == big for body in bodies)
    assert _metric("mirror_s3_read_bytes_total") - read_before == len(big)
    assert fake.count("GET", f"/blobs/{digest}") == 1  # node A's, never B's


async def test_s3_down_keeps_serving_and_counts_failures(
        tmp_path: Path, upstream: TestServer, aiohttp_client: Any, fake: FakeRegistry) -> None:
    url = str(upstream.make_url("")).rstrip("/")
    dead = {"bucket": "nowhere", "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "region": "us-east-1", "connect_timeout": "1s", "failure_backoff": "1h",
            **credential_files(tmp_path / "creds")}
    settings = _settings(tmp_path / "cache", url, dead)
    node: Client = await aiohttp_client(create_app(settings))
    failures = sum(_metric("mirror_s3_failures_total", operation=op)
                   for op in ("head", "get", "put", "upload"))
    fake.add_image("app", "v1", [b"layer-a", b"layer-b"])
    pulled = await _pull(node, "app", "v1")
    assert len(pulled) == 4
    await _drain(node)  # the copies offered to S3 in the background have failed too
    after_first = sum(_metric("mirror_s3_failures_total", operation=op)
                      for op in ("head", "get", "put", "upload"))
    assert after_first - failures >= 1
    # Backing off: more misses cost no further S3 calls, and still get served.
    skipped = _metric("mirror_s3_lookups_total", kind="blob", result="skipped")
    fake.add_image("other", "v1", [b"layer-c"], arch="arm64")
    assert len(await _pull(node, "other", "v1")) == 3
    assert _metric("mirror_s3_lookups_total", kind="blob", result="skipped") - skipped == 2
    assert sum(_metric("mirror_s3_failures_total", operation=op)
               for op in ("head", "get", "put", "upload")) == after_first


async def test_presigned_redirect_for_blobs_cold_here_but_in_s3(
        make_node: NodeFactory, fake: FakeRegistry) -> None:
    layer = b"redirected-layer" * 1000
    digest = fake.add_blob(layer)
    fake.add_image("app", "v1", [layer])
    node_a = await make_node("a")
    await _pull(node_a, "app", "v1")
    await _drain(node_a)
    node_b = await make_node("b", redirect=True, redirect_ttl="5m")
    blob_gets = fake.count("GET", "/blobs/")
    response = await node_b.get(f"/v2/app/blobs/{digest}", allow_redirects=False)
    assert response.status == 307
    location = response.headers["Location"]
    assert "Signature" in location and "Expires=" in location
    async with aiohttp.ClientSession(trust_env=False) as session, \
            session.get(location) as s3_answer:
        assert s3_answer.status == 200
        assert await s3_answer.read() == layer
    # Several ranges are answered here (S3 would send the whole object), from S3.
    parts = await node_b.get(f"/v2/app/blobs/{digest}", allow_redirects=False,
                             headers={"Range": "bytes=0-9,100-109"})
    assert parts.status == 206 and parts.content_type == "multipart/byteranges"
    body = await parts.read()
    assert layer[0:10] in body and layer[100:110] in body
    head = await node_b.head(f"/v2/app/blobs/{digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(layer))
    assert fake.count("GET", "/blobs/") == blob_gets
    assert fake.count("HEAD", "/blobs/") == 0
    # Not in S3: streamed from upstream as usual, never a redirect.
    other = fake.add_blob(b"only-upstream")
    response = await node_b.get(f"/v2/app/blobs/{other}", allow_redirects=False)
    assert response.status == 200
    assert await response.read() == b"only-upstream"


async def test_a_corrupt_object_in_s3_is_never_served_and_is_removed(
        make_node: NodeFactory, fake: FakeRegistry, moto_s3: MotoS3, bucket: str) -> None:
    layer = b"good-bytes" * 1000
    digest = fake.add_blob(layer)
    key = f"eu/blobs/sha256/{digest[7:]}"
    moto_s3.client().put_object(Bucket=bucket, Key=key, Body=b"x" * len(layer))
    node = await make_node("a")
    with pytest.raises(aiohttp.ClientPayloadError):
        response = await node.get(f"/v2/app/blobs/{digest}")
        await response.read()
    await _drain(node)
    assert key not in moto_s3.keys(bucket) or moto_s3.get(bucket, key) == layer
    response = await node.get(f"/v2/app/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == layer


async def test_s3_cut_mid_blob_the_fill_continues_from_upstream_with_range(
        make_node: NodeFactory, fake: FakeRegistry, moto_s3: MotoS3) -> None:
    big = _layers()[0]
    digest = fake.add_blob(big)
    fake.add_image("app", "v1", [big])
    node_a = await make_node("a")
    await _pull(node_a, "app", "v1")
    await _drain(node_a)
    # Node B reaches S3 through a slow proxy that the test then closes mid-blob.
    proxy = ThrottledProxy("127.0.0.1", moto_s3.port, 2 * MiB)
    proxy.start()
    node_b = await make_node("b", endpoint_url=proxy.url)
    failures = _metric("mirror_s3_failures_total", operation="read")
    response = await node_b.get(f"/v2/app/blobs/{digest}")
    assert response.status == 200
    first = await response.content.readexactly(256 * 1024)
    await asyncio.to_thread(proxy.stop)
    rest = await response.read()
    assert first + rest == big
    assert _metric("mirror_s3_failures_total", operation="read") - failures == 1
    resumed = [r for r in fake.requests if r.method == "GET" and digest in r.path][1:]
    assert len(resumed) == 1
    assert resumed[0].headers["Range"].startswith("bytes=")
    assert resumed[0].headers["Range"] != "bytes=0-"


async def test_upstream_down_a_second_node_still_serves_by_digest_from_s3(
        make_node: NodeFactory, fake: FakeRegistry) -> None:
    digest, body = fake.add_image("app", "v1", [b"layer-x", b"layer-y"])
    node_a = await make_node("a")
    through_a = await _pull(node_a, "app", "v1")
    await _drain(node_a)
    fake.fault(kind="status", status=503)
    node_b = await make_node("b")
    layer = json.loads(body)["layers"][0]["digest"]
    head = await node_b.head(f"/v2/app/blobs/{layer}")  # cold on B: S3 answers the size
    assert head.status == 200 and head.headers["Content-Length"] == str(len(b"layer-x"))
    assert await _pull(node_b, "app", digest) == through_a
    assert fake.count("HEAD", "/blobs/") == 0
    assert fake.count("GET", "/blobs/") == 3  # node A's only
