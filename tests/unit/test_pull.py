"""The pull API in process, in front of a fake upstream: protocol behaviour."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from mirror.clock import ManualClock
from tests.support.fake import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    sha256,
)
from tests.unit.conftest import MirrorFactory, cache_files

Client = TestClient[Any, Any]
ALL_TYPES = f"{OCI_INDEX}, {DOCKER_LIST}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"


async def test_ping(mirror: Client) -> None:
    response = await mirror.get("/v2/")
    assert response.status == 200
    assert await response.json() == {}
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_is_byte_exact_and_head_has_get_headers(
        mirror: Client, fake: FakeRegistry) -> None:
    digest, data = fake.add_image("app", "v1", [b"layer"])
    get = await mirror.get("/v2/app/manifests/v1", headers={"Accept": ALL_TYPES})
    assert get.status == 200
    assert await get.read() == data
    head = await mirror.head("/v2/app/manifests/v1", headers={"Accept": ALL_TYPES})
    for name in ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag"):
        assert head.headers[name] == get.headers[name], name
    assert get.headers["Content-Type"] == OCI_MANIFEST
    assert get.headers["Content-Length"] == str(len(data))
    assert get.headers["Docker-Content-Digest"] == digest


async def test_every_accept_line_is_read(mirror: Client, fake: FakeRegistry) -> None:
    fake.add_image("app", "v1", [b"layer"], media_type=DOCKER_MANIFEST)
    headers = [("Accept", OCI_MANIFEST), ("Accept", DOCKER_MANIFEST)]
    response = await mirror.get("/v2/app/manifests/v1", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == DOCKER_MANIFEST


async def test_oci_index_not_accepted_is_manifest_unknown(mirror: Client,
                                                          fake: FakeRegistry) -> None:
    child, body = fake.add_image("app", None, [b"a"])
    fake.add_index("app", "multi", [(child, body, "amd64")])
    response = await mirror.get("/v2/app/manifests/multi",
                                headers={"Accept": DOCKER_MANIFEST})
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_docker_list_not_accepted_gives_linux_amd64_child(mirror: Client,
                                                                fake: FakeRegistry) -> None:
    amd, amd_body = fake.add_image("app", None, [b"a"], DOCKER_MANIFEST, "amd64")
    arm, arm_body = fake.add_image("app", None, [b"b"], DOCKER_MANIFEST, "arm64")
    fake.add_index("app", "multi", [(arm, arm_body, "arm64"), (amd, amd_body, "amd64")],
                   media_type=DOCKER_LIST)
    response = await mirror.get("/v2/app/manifests/multi", headers={"Accept": DOCKER_MANIFEST})
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == amd
    assert await response.read() == amd_body


async def test_second_pull_never_reaches_upstream_for_content(mirror: Client,
                                                              fake: FakeRegistry) -> None:
    digest, data = fake.add_image("app", "v1", [b"layer-one", b"layer-two"])
    document = json.loads(data)
    blobs = [document["config"]["digest"]] + [layer["digest"] for layer in document["layers"]]
    for _ in range(2):
        assert (await mirror.get("/v2/app/manifests/v1")).status == 200
        assert (await mirror.get(f"/v2/app/manifests/{digest}")).status == 200
        for blob in blobs:
            response = await mirror.get(f"/v2/app/blobs/{blob}")
            assert sha256(await response.read()) == blob
    assert fake.count("GET", "/blobs/") == len(blobs)
    assert fake.count("GET", "/manifests/") == 1


async def test_tag_inside_ttl_is_answered_locally_and_revalidated_after(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "200ms"})
    fake.add_image("app", "v1", [b"x"])
    await mirror.get("/v2/app/manifests/v1")
    await mirror.get("/v2/app/manifests/v1")
    assert fake.count(contains="/manifests/v1") == 1
    clock.advance(0.25)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    assert fake.count("HEAD", "/manifests/v1") == 1
    assert fake.count("GET", "/manifests/v1") == 1


async def test_moved_tag_is_followed_after_ttl(clock: ManualClock, make_mirror: MirrorFactory,
                                               fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "100ms"})
    fake.add_image("app", "v1", [b"old"])
    await mirror.get("/v2/app/manifests/v1")
    new_digest, _ = fake.add_image("app", "v1", [b"new"])
    clock.advance(0.15)
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.headers["Docker-Content-Digest"] == new_digest


async def test_concurrent_stale_tag_requests_cause_one_head(
        clock: ManualClock, make_mirror: MirrorFactory,
                                                            fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "100ms"})
    fake.add_image("app", "v1", [b"x"])
    await mirror.get("/v2/app/manifests/v1")
    clock.advance(0.15)
    responses = await asyncio.gather(*(mirror.get("/v2/app/manifests/v1") for _ in range(100)))
    assert {r.status for r in responses} == {200}
    assert fake.count("HEAD", "/manifests/v1") == 1


async def test_blob_herd_makes_one_upstream_request(mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(3 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=256 << 10, delay=0.01)

    async def pull() -> bytes:
        response = await mirror.get(f"/v2/app/blobs/{digest}")
        assert response.status == 200
        return await response.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(body == data for body in bodies)
    assert fake.count("GET", "/blobs/") == 1


async def test_range_on_cached_and_in_flight_blob(mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(1 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=128 << 10, delay=0.02)
    in_flight = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=1000-"})
    assert in_flight.status == 206
    assert in_flight.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert await in_flight.read() == data[1000:]
    cached = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert cached.status == 206
    assert cached.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert await cached.read() == data[10:20]
    bad = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert bad.status == 416
    assert bad.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_blob_head_matches_get(mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(2 << 20)
    digest = fake.add_blob(data)
    cold_head = await mirror.head(f"/v2/app/blobs/{digest}")
    get = await mirror.get(f"/v2/app/blobs/{digest}")
    await get.read()
    warm_head = await mirror.head(f"/v2/app/blobs/{digest}")
    for head in (cold_head, warm_head):
        assert head.status == 200
        for name in ("Content-Length", "Docker-Content-Digest", "Content-Type", "ETag"):
            assert head.headers[name] == get.headers[name], name
    assert get.headers["Content-Length"] == str(len(data))


async def test_small_cached_blob_served_from_memory(mirror: Client, fake: FakeRegistry) -> None:
    digest = fake.add_blob(b"tiny config")
    assert await (await mirror.get(f"/v2/app/blobs/{digest}")).read() == b"tiny config"
    response = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=5-"})
    assert response.status == 206
    assert await response.read() == b"config"


async def test_routing_modes_reach_the_same_upstream(mirror: Client, fake: FakeRegistry) -> None:
    digest, _ = fake.add_image("org/app", "v1", [b"x"])
    for path in ("/v2/org/app/manifests/v1", "/v2/org/app/manifests/v1?ns=fake.test",
                 "/v2/fake.test/org/app/manifests/v1", "/fake/v2/org/app/manifests/v1",
                 "/v2/fake/org/app/manifests/v1"):
        response = await mirror.get(path)
        assert response.status == 200, path
        assert response.headers["Docker-Content-Digest"] == digest
    ns = await mirror.get("/v2/org/app/manifests/v1?ns=fake.test")
    assert ns.headers["OCI-Namespace"] == "fake.test"


async def test_unconfigured_registry_is_refused_without_a_connection(
        mirror: Client, fake: FakeRegistry) -> None:
    for path in ("/v2/app/manifests/v1?ns=evil.example.com", "/evil/v2/app/manifests/v1"):
        response = await mirror.get(path)
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    conflict = await mirror.get("/fake/v2/app/manifests/v1?ns=docker.io")
    assert conflict.status == 404
    assert fake.requests == []


async def test_tags_list_paginates_and_rewrites_link(mirror: Client, fake: FakeRegistry) -> None:
    fake.add_image("org/app", "v1", [b"x"])
    response = await mirror.get("/v2/org/app/tags/list?n=1")
    assert response.status == 200
    assert (await response.json())["tags"] == ["v1"]
    assert "n=1" in fake.requests[-1].path
    missing = await mirror.get("/v2/org/nothing/tags/list")
    assert missing.status == 404


async def test_referrers_without_the_api_upstream_is_an_empty_index(
        mirror: Client, fake: FakeRegistry) -> None:
    digest = sha256(b"subject")
    response = await mirror.get(f"/v2/app/referrers/{digest}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert (await response.json())["manifests"] == []


async def test_push_and_delete_are_unsupported(mirror: Client) -> None:
    for method, path in (("POST", "/v2/app/blobs/uploads/"), ("PUT", "/v2/app/manifests/v1"),
                         ("DELETE", f"/v2/app/blobs/{sha256(b'x')}"),
                         ("PATCH", "/v2/app/blobs/uploads/abc")):
        response = await mirror.request(method, path)
        assert response.status == 405, (method, path)
        assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_bad_input_gets_oci_errors_and_touches_nothing(mirror: Client,
                                                             fake: FakeRegistry,
                                                             tmp_path: Path) -> None:
    cases = {
        "/v2/App/manifests/v1": "NAME_INVALID",
        "/v2/a..b/manifests/v1": "NAME_INVALID",
        "/v2/%2e%2e/%2e%2e/etc/manifests/v1": "NOT_FOUND",  # normalized away by aiohttp
        "/v2/app/manifests/-bad": "TAG_INVALID",
        "/v2/app/manifests/" + "t" * 129: "TAG_INVALID",
        "/v2/app/blobs/sha256:xyz": "DIGEST_INVALID",
        "/v2/app/blobs/sha256:" + "A" * 64: "DIGEST_INVALID",
        "/v2/app/blobs/md5:" + "a" * 32: "DIGEST_INVALID",
        "/v2/app/blobs/..%2f..%2fetc": "NOT_FOUND",  # normalized away by aiohttp
        "/v2/app/tags/list?n=abc": "PAGINATION_NUMBER_INVALID",
    }
    for path, code in cases.items():
        response = await mirror.get(path)
        body = await response.json()
        assert body["errors"][0]["code"] == code, (path, body)
        assert 400 <= response.status < 500
    assert fake.requests == []
    assert cache_files(tmp_path / "cache") == []


async def test_if_none_match_gives_304(mirror: Client, fake: FakeRegistry) -> None:
    digest, _ = fake.add_image("app", "v1", [b"x"])
    response = await mirror.get("/v2/app/manifests/v1", headers={"If-None-Match": f'"{digest}"'})
    assert response.status == 304


async def test_metrics_and_health(mirror: Client, fake: FakeRegistry) -> None:
    digest = fake.add_blob(b"some bytes")
    await mirror.get(f"/v2/app/blobs/{digest}")
    text = await (await mirror.get("/metrics")).text()
    assert "mirror_cache_results_total" in text
    assert "mirror_upstream_requests_total" in text
    assert (await mirror.get("/healthz")).status == 200
    assert (await mirror.get("/readyz")).status == 200
