"""Upstream faults a real registry cannot show, and what clients see of them.

After every fault: the client got a clear error or correct bytes, never a
short or wrong blob, and the cache holds nothing it should not.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.clock import ManualClock
from tests.support.fake import FakeRegistry, sha256
from tests.unit.conftest import MirrorFactory, cache_files

Client = TestClient[Any, Any]


def _blob_files(root: Path) -> list[Path]:
    return [p for p in cache_files(root) if "blobs" in p.parts or "tmp" in p.parts]


async def _code(response: aiohttp.ClientResponse) -> str:
    return str((await response.json())["errors"][0]["code"])


async def test_dropped_connection_is_resumed_with_range(mirror: Client, fake: FakeRegistry,
                                                        tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drop", path="/blobs/", after=700_000, times=1)
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert await response.read() == data
    ranges = [r.headers.get("Range") for r in fake.requests if "/blobs/" in r.path]
    assert ranges[0] is None
    assert ranges[1] is not None and ranges[1].startswith("bytes=")
    assert len(_blob_files(tmp_path / "cache")) == 1


async def test_connection_dropped_every_time_aborts_every_reader(
        mirror: Client, fake: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drop", path="/blobs/", after=500_000)

    async def pull() -> str:
        response = await mirror.get(f"/v2/app/blobs/{digest}")
        try:
            body = await response.read()
        except aiohttp.ClientPayloadError:
            return "aborted"
        return "ok" if body == data else f"short {response.status} {len(body)}"

    outcomes = await asyncio.gather(*(pull() for _ in range(5)))
    assert all(o == "aborted" or o.startswith("short 5") for o in outcomes), outcomes
    assert "ok" not in outcomes
    assert _blob_files(tmp_path / "cache") == []
    fake.faults.clear()
    again = await mirror.get(f"/v2/app/blobs/{digest}")
    assert await again.read() == data


async def test_wrong_bytes_abort_the_client_and_store_nothing(mirror: Client, fake: FakeRegistry,
                                                              tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="wrong", path="/blobs/")
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert _blob_files(tmp_path / "cache") == []
    text = await (await mirror.get("/metrics")).text()
    assert 'reason="digest_mismatch"' in text


async def test_slow_drip_streams_first_bytes_before_the_end(mirror: Client,
                                                            fake: FakeRegistry) -> None:
    data = os.urandom(1 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=64 << 10, delay=0.03)
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    first = await response.content.readany()
    assert first
    # Upstream has not finished sending: the first bytes came through while it dripped.
    assert fake.count("GET", "/blobs/") == 1
    rest = await response.read()
    assert first + rest == data


async def test_500_gives_unavailable_and_nothing_cached(mirror: Client, fake: FakeRegistry,
                                                        tmp_path: Path) -> None:
    digest = fake.add_blob(b"x" * 1000)
    fake.fault(kind="status", status=500, path="/blobs/")
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert response.status in (502, 503)
    assert await _code(response) == "UNAVAILABLE"
    assert fake.count("GET", "/blobs/") == 2  # one retry, as configured
    assert _blob_files(tmp_path / "cache") == []


async def test_429_with_nothing_cached_is_toomanyrequests_with_retry_after(
        mirror: Client, fake: FakeRegistry) -> None:
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="status", status=429, headers={"Retry-After": "120"}, path="/manifests/")
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 429
    assert await _code(response) == "TOOMANYREQUESTS"
    assert response.headers["Retry-After"] == "120"


async def test_short_retry_after_is_waited_out(mirror: Client, fake: FakeRegistry) -> None:
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="status", status=429, headers={"Retry-After": "0"}, path="/manifests/",
               times=1)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200


async def test_429_while_tag_is_cached_serves_the_cached_tag(
        clock: ManualClock, make_mirror: MirrorFactory,
                                                             fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"})
    digest, _ = fake.add_image("app", "v1", [b"x"])
    await mirror.get("/v2/app/manifests/v1")
    clock.advance(0.06)
    fake.fault(kind="status", status=429, headers={"Retry-After": "3600"}, path="/manifests/")
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    text = await (await mirror.get("/metrics")).text()
    assert 'mirror_stale_served_total{reason="rate_limited"' in text


async def test_upstream_down_serves_stale_tag_and_cached_blobs(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry, upstream: TestServer) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"})
    digest, data = fake.add_image("app", "v1", [b"layer"])
    layer = json.loads(data)["layers"][0]["digest"]
    await mirror.get("/v2/app/manifests/v1")
    await (await mirror.get(f"/v2/app/blobs/{layer}")).read()
    await upstream.close()
    clock.advance(0.06)
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert await (await mirror.get(f"/v2/app/blobs/{layer}")).read() == b"layer"


async def test_upstream_down_with_nothing_cached_is_a_clear_error(
        mirror: Client, upstream: TestServer, tmp_path: Path) -> None:
    await upstream.close()
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 503
    body = await response.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "fake.test" in body["errors"][0]["message"]
    blob = await mirror.get(f"/v2/app/blobs/{sha256(b'nothing')}")
    assert blob.status == 503
    assert cache_files(tmp_path / "cache") == []


async def test_stale_limit_is_respected(
        clock: ManualClock, make_mirror: MirrorFactory, fake: FakeRegistry,
                                        upstream: TestServer) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "10ms", "stale_if_error": "20ms"})
    fake.add_image("app", "v1", [b"x"])
    await mirror.get("/v2/app/manifests/v1")
    await upstream.close()
    clock.advance(0.05)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 503


async def test_html_page_instead_of_manifest(mirror: Client, fake: FakeRegistry,
                                             tmp_path: Path) -> None:
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="html", path="/manifests/")
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 502
    assert await _code(response) == "MANIFEST_INVALID"
    assert cache_files(tmp_path / "cache") == []


async def test_manifest_with_wrong_digest_is_refused(mirror: Client, fake: FakeRegistry,
                                                     tmp_path: Path) -> None:
    digest, _ = fake.add_image("app", "v1", [b"x"])
    fake.manifests[("app", digest)] = (b'{"schemaVersion": 2, "layers": []}',
                                       "application/vnd.oci.image.manifest.v1+json")
    response = await mirror.get(f"/v2/app/manifests/{digest}")
    assert response.status == 502
    assert await _code(response) == "MANIFEST_INVALID"
    assert cache_files(tmp_path / "cache") == []


async def test_truncated_manifest_is_refused(mirror: Client, fake: FakeRegistry,
                                             tmp_path: Path) -> None:
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="drop", path="/manifests/", after=20)
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status in (502, 503)
    assert cache_files(tmp_path / "cache") == []


async def test_manifest_over_4_mib_is_refused(mirror: Client, fake: FakeRegistry,
                                              tmp_path: Path) -> None:
    huge = json.dumps({"schemaVersion": 2, "layers": [], "pad": "x" * (5 << 20)}).encode()
    fake.add_manifest("app", huge, "application/vnd.oci.image.manifest.v1+json", "v1")
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 502
    assert "limit" in (await response.json())["errors"][0]["message"]
    assert cache_files(tmp_path / "cache") == []


async def test_unknown_blob_and_manifest_are_404(mirror: Client, fake: FakeRegistry) -> None:
    blob = await mirror.get(f"/v2/app/blobs/{sha256(b'absent')}")
    assert blob.status == 404
    assert await _code(blob) == "BLOB_UNKNOWN"
    manifest = await mirror.get("/v2/app/manifests/absent")
    assert manifest.status == 404
    assert await _code(manifest) == "MANIFEST_UNKNOWN"


async def test_negative_cache_absorbs_repeated_404s(mirror: Client, fake: FakeRegistry) -> None:
    missing = sha256(b"absent manifest")
    for _ in range(3):
        assert (await mirror.get(f"/v2/app/manifests/{missing}")).status == 404
    assert fake.count("GET", "/manifests/") == 1


async def test_client_that_leaves_does_not_cancel_the_download(
        mirror: Client, fake: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=128 << 10, delay=0.02)
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    await response.content.readany()
    response.close()
    for _ in range(100):
        if len(_blob_files(tmp_path / "cache")) == 1 and not list(
                (tmp_path / "cache" / "tmp").iterdir()):
            break
        await asyncio.sleep(0.05)
    again = await mirror.get(f"/v2/app/blobs/{digest}")
    assert await again.read() == data
    assert fake.count("GET", "/blobs/") == 1


async def test_blob_without_content_length_uses_the_manifest_size(
        mirror: Client, fake: FakeRegistry) -> None:
    layer = os.urandom(1 << 20)
    _, manifest = fake.add_image("app", "v1", [layer])
    digest = json.loads(manifest)["layers"][0]["digest"]
    fake.fault(kind="chunked", path="/blobs/", chunk=64 << 10, delay=0.02)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert response.headers["Content-Length"] == str(len(layer))
    first = await response.content.readany()
    assert first and len(first) < len(layer)
    assert first + await response.read() == layer


async def test_blob_without_content_length_or_manifest_still_has_a_length(
        mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(300_000)
    digest = fake.add_blob(data)
    fake.fault(kind="chunked", path="/blobs/", chunk=64 << 10, delay=0.001)
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert response.headers["Content-Length"] == str(len(data))
    assert await response.read() == data
