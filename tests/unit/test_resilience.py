"""Budgets and outages, end to end: the mirror in front of the fake upstream
while it rate-limits (429 storms, Docker Hub's pull limit), fails (5xx,
refused connections) and recovers. Clients must get cached answers whenever
there are some, TOOMANYREQUESTS (never DENIED) with Retry-After when there are
none, and upstream must not be hammered while it is down."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from yarl import URL

from mirror.clock import ManualClock
from mirror.config import (
    BreakerSettings,
    BudgetSettings,
    Secret,
    StaticCredential,
    UpstreamSettings,
)
from mirror.errors import TooManyRequests, UpstreamUnavailable
from mirror.pull import Repo
from mirror.server.state import NODE
from mirror.upstream import UpstreamClient
from mirror.upstream.guard import UpstreamGuard
from tests.support.fake import FakeRegistry, HubRateLimit
from tests.unit.conftest import MirrorFactory

Client = TestClient[Any, Any]
REGISTRY_NAME = "fake.test"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def transitions(state: str) -> float:
    return sample("mirror_upstream_breaker_transitions_total", registry=REGISTRY_NAME,
                  state=state)


async def _error(response: aiohttp.ClientResponse) -> str:
    return str((await response.json())["errors"][0]["code"])


# --- 429 ---------------------------------------------------------------------------


async def test_429_storm_never_reaches_clients_of_cached_tags_and_stops_asking_upstream(
        clock: ManualClock, make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"},
                               upstream={"breaker": {"failures": 3, "cool_down": "1m"}})
    cached, _ = fake.add_image("app", "v1", [b"one"])
    tags = [f"v{i}" for i in range(2, 12)]
    for tag in tags:
        fake.add_image("app", tag, [tag.encode()])
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    # Docker Hub's pull limit runs out: manifest GETs answer 429, HEADs stay free.
    fake.ratelimit = HubRateLimit(limit=100, remaining=0, retry_after="120")
    gets_before = fake.count("GET", "/manifests/")

    async def pull(reference: str) -> tuple[int, str, str | None]:
        response = await mirror.get(f"/v2/app/manifests/{reference}")
        code = "" if response.status == 200 else await _error(response)
        return response.status, code, response.headers.get("Retry-After")

    # Pulls of tags never seen: TOOMANYREQUESTS with upstream's Retry-After.
    first = [await pull(tag) for tag in tags]
    assert set(first) == {(429, "TOOMANYREQUESTS", "120")}
    # Three 429s opened the breaker: the other pulls failed fast, unasked.
    assert fake.count("GET", "/manifests/") - gets_before == 3
    assert sample("mirror_upstream_breaker_state", registry=REGISTRY_NAME) == 1
    # The storm: the cached tag is answered every time (stale: not even its
    # free HEAD goes out), the others keep getting TOOMANYREQUESTS.
    clock.advance(0.06)
    heads = fake.count("HEAD", "/manifests/")
    storm = await asyncio.gather(*(pull(ref) for ref in ["v1"] * 40 + tags * 4))
    assert all(r == (200, "", None) for r in storm[:40])
    assert all(r[:2] == (429, "TOOMANYREQUESTS") for r in storm[40:])
    assert all(r[2] is not None and 1 <= int(r[2]) <= 120 for r in storm[40:])
    assert fake.count("GET", "/manifests/") - gets_before == 3
    assert fake.count("HEAD", "/manifests/") == heads
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.headers["Docker-Content-Digest"] == cached


async def test_429_on_every_request_serves_the_cached_tag_and_blob(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"})
    digest, data = fake.add_image("app", "v1", [b"layer"])
    layer = json.loads(data)["layers"][0]["digest"]
    await mirror.get("/v2/app/manifests/v1")
    await (await mirror.get(f"/v2/app/blobs/{layer}")).read()
    clock.advance(0.06)
    # The abuse limit: a bare 429 on everything, with no Retry-After.
    fake.fault(kind="status", status=429)
    stale_before = sample("mirror_stale_served_total", registry=REGISTRY_NAME,
                          reason="rate_limited")
    for method in ("HEAD", "GET"):
        response = await mirror.request(method, "/v2/app/manifests/v1")
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
    assert await (await mirror.get(f"/v2/app/blobs/{layer}")).read() == b"layer"
    assert sample("mirror_stale_served_total", registry=REGISTRY_NAME,
                  reason="rate_limited") - stale_before == 2


async def test_tag_moved_upstream_while_pulls_are_limited_serves_the_old_digest(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"})
    old, _ = fake.add_image("app", "v1", [b"old"])
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    new, _ = fake.add_image("app", "v1", [b"new"])  # the tag moves upstream
    fake.ratelimit = HubRateLimit(limit=100, remaining=0)
    clock.advance(0.06)
    # The free HEAD sees the new digest; the GET of it is refused: the old one is served.
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 200 and response.headers["Docker-Content-Digest"] == old
    assert fake.count("HEAD", "/manifests/v1") == 1
    assert fake.count("GET", f"/manifests/{new}") == 1
    fake.ratelimit = None
    clock.advance(0.06)  # past the hold-off (at most the TTL): the tag moves on
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.headers["Docker-Content-Digest"] == new


async def test_429_with_nothing_cached_is_toomanyrequests_with_bounded_retry_after(
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={"max_client_retry_after": "10m"})
    digest = fake.add_blob(b"blob")
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="status", status=429, headers={"Retry-After": "86400"}, path="/manifests/")
    fake.fault(kind="status", status=429, path="/blobs/")  # no Retry-After at all
    manifest = await mirror.get("/v2/app/manifests/v1")
    assert manifest.status == 429
    assert await _error(manifest) == "TOOMANYREQUESTS"
    assert manifest.headers["Retry-After"] == "600"
    blob = await mirror.get(f"/v2/app/blobs/{digest}")
    assert blob.status == 429
    assert await _error(blob) == "TOOMANYREQUESTS"
    assert blob.headers["Retry-After"] == "60"


async def test_token_endpoint_429_is_toomanyrequests_not_denied(
        aiohttp_server: Any) -> None:
    async def registry(request: web.Request) -> web.Response:
        realm = f"http://{request.host}/token"
        return web.Response(status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'})

    async def token(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "30"})

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_route("*", "/v2/{tail:.*}", registry)
    server = await aiohttp_server(app)
    client = UpstreamClient(UpstreamSettings(name="token-429", url=server.make_url("")))
    try:
        with pytest.raises(TooManyRequests) as info:
            async with client.request("GET", "library/nginx", "manifests/latest"):
                pass
    finally:
        await client.close()
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "30"


# --- the circuit breaker -----------------------------------------------------------


async def test_breaker_opens_fails_fast_probes_and_closes(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, upstream={"retries": 0, "breaker": {
        "failures": 2, "window": "10s", "cool_down": "500ms"}})
    fake.add_image("app", "v1", [b"x"])
    # The registry is down, /v2/ included: 5xx that say nothing of its health don't count.
    fake.fault(kind="status", status=503, path="/v2/")
    opened, half, closed = transitions("open"), transitions("half_open"), transitions("closed")
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            assert (await mirror.get("/v2/app/manifests/v1")).status == 502
        assert fake.count("GET", "/manifests/") == 2
        # Open: no request reaches upstream, the client is told when to come back.
        fast = await mirror.get("/v2/app/manifests/v1")
        assert fast.status == 503 and await _error(fast) == "UNAVAILABLE"
        assert fast.headers["Retry-After"] == "1"
        assert "circuit open" in (await fast.json())["errors"][0]["message"]
        assert fake.count("GET", "/manifests/") == 2
        assert sample("mirror_upstream_breaker_state", registry=REGISTRY_NAME) == 1
        # Half-open: the probe fails, the breaker opens again.
        clock.advance(0.55)
        assert (await mirror.get("/v2/app/manifests/v1")).status == 502
        assert fake.count("GET", "/manifests/") == 3
        assert (await mirror.get("/v2/app/manifests/v1")).status == 503
        assert fake.count("GET", "/manifests/") == 3
        # Upstream is back: the next probe succeeds and closes the breaker.
        fake.faults.clear()
        clock.advance(0.55)
        assert (await mirror.get("/v2/app/manifests/v1")).status == 200
        assert sample("mirror_upstream_breaker_state", registry=REGISTRY_NAME) == 0
    assert transitions("open") - opened == 2
    assert transitions("half_open") - half == 2
    assert transitions("closed") - closed == 1
    events = [e["event"] for e in logs if e["event"].startswith("upstream_breaker_")]
    assert events == ["upstream_breaker_open", "upstream_breaker_half_open",
                      "upstream_breaker_open", "upstream_breaker_half_open",
                      "upstream_breaker_closed"]


async def test_only_one_probe_while_half_open(clock: ManualClock, make_mirror: MirrorFactory,
                                              fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, upstream={"retries": 0, "breaker": {
        "failures": 1, "cool_down": "100ms"}})
    for i in range(10):
        fake.add_image("app", f"t{i}", [b"x"])
    fake.fault(kind="status", status=503, path="/v2/", times=2)  # the manifest, then /v2/
    assert (await mirror.get("/v2/app/manifests/t0")).status == 502
    clock.advance(0.15)
    fake.fault(kind="slow", path="/manifests/", delay=0.8)
    statuses = await asyncio.gather(*(mirror.get(f"/v2/app/manifests/t{i}") for i in range(10)))
    assert sorted(s.status for s in statuses) == [200] + [503] * 9
    assert fake.count("GET", "/manifests/") == 2


async def test_outage_with_refused_connections_serves_stale_and_stops_connecting(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry, upstream: TestServer) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"},
                               upstream={"retries": 0, "breaker": {"failures": 2}})
    digests = {}
    for tag in ("a", "b", "c"):
        digests[tag], _ = fake.add_image("app", tag, [tag.encode()])
        assert (await mirror.get(f"/v2/app/manifests/{tag}")).status == 200
    await upstream.close()
    clock.advance(0.06)
    refused = sample("mirror_upstream_errors_total", registry=REGISTRY_NAME, reason="connect")
    for _ in range(3):
        for tag in ("a", "b", "c"):
            response = await mirror.get(f"/v2/app/manifests/{tag}")
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == digests[tag]
    # Two refused connections opened the breaker; the other seven never tried.
    assert sample("mirror_upstream_errors_total", registry=REGISTRY_NAME,
                  reason="connect") - refused == 2
    assert sample("mirror_upstream_breaker_state", registry=REGISTRY_NAME) == 1
    missing = await mirror.get("/v2/app/manifests/never-pulled")
    assert missing.status == 503 and await _error(missing) == "UNAVAILABLE"


async def test_no_retries_once_the_breaker_opens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = UpstreamClient(UpstreamSettings(
        name="refused-once", url=URL(f"http://127.0.0.1:{port}"), retries=3,
        breaker=BreakerSettings(failures=1)))
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            async with client.request("GET", "app", "manifests/v1"):
                pass
    finally:
        await client.close()
    # The real cause, not "circuit open", and no backoff spent on doomed retries.
    assert "Connection refused" in str(info.value)
    assert sample("mirror_upstream_retries_total", registry="refused-once") == 0
    assert sample("mirror_upstream_errors_total", registry="refused-once", reason="connect") == 1


# --- coalescing --------------------------------------------------------------------


async def test_hundred_concurrent_requests_for_a_stale_tag_send_one_head(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "300ms"})
    digest, _ = fake.add_image("app", "v1", [b"x"])
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    clock.advance(0.35)
    # A slow HEAD keeps the revalidation open while all hundred requests arrive.
    fake.fault(kind="slow", path="/manifests/v1", method="HEAD", delay=1.0)
    responses = await asyncio.gather(*(mirror.get("/v2/app/manifests/v1") for _ in range(100)))
    assert all(r.status == 200 for r in responses)
    assert {r.headers["Docker-Content-Digest"] for r in responses} == {digest}
    assert fake.count("HEAD", "/manifests/v1") == 1
    assert fake.count("GET", "/manifests/") == 1  # the first pull only


async def test_failed_revalidation_is_not_repeated_by_every_request_of_the_window(
        clock: ManualClock, make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "1s"},
                               upstream={"retries": 0, "breaker": {"failures": 0}})
    digest, _ = fake.add_image("app", "v1", [b"x"])
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    clock.advance(1.05)
    fake.fault(kind="status", status=503, path="/manifests/v1", method="HEAD")
    for _ in range(20):  # inside one window (1 s: the TTL here; the clock stands still)
        response = await mirror.get("/v2/app/manifests/v1")
        assert response.headers["Docker-Content-Digest"] == digest
    assert fake.count("HEAD", "/manifests/v1") == 1
    clock.advance(1.05)  # the next window asks again
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    assert fake.count("HEAD", "/manifests/v1") == 2


# --- the request budget ------------------------------------------------------------


class Clock:
    """A monotonic clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def budgeted(upstream: TestServer) -> AsyncIterator[tuple[UpstreamClient, Clock]]:
    settings = UpstreamSettings(
        name="budgeted", url=URL(str(upstream.make_url(""))),
        budget=BudgetSettings(rate=4.0, burst=1, client_overdraft=3.0))
    clock = Clock()
    client = UpstreamClient(settings, guard=UpstreamGuard(settings, clock=clock))
    yield client, clock
    await client.close()


async def _status(client: UpstreamClient, background: bool) -> int:
    async with client.request("GET", "app", "manifests/v1", background=background) as resp:
        return resp.status


async def test_background_requests_wait_for_the_budget_while_client_requests_pass(
        budgeted: tuple[UpstreamClient, Clock], fake: FakeRegistry) -> None:
    client, clock = budgeted
    fake.add_image("app", "v1", [b"x"])
    waits = sample("mirror_upstream_budget_waits_total", registry="budgeted")
    background = [asyncio.create_task(_status(client, True)) for _ in range(3)]
    assert await background[0] == 200  # the budget's one token
    # Client requests do not queue behind background work: they use the overdraft.
    assert [await _status(client, False) for _ in range(3)] == [200, 200, 200]
    assert fake.count("GET") == 4
    assert not any(task.done() for task in background[1:])
    for task in background[1:]:
        clock.now += 0.25  # one more budget token
        assert await task == 200
    assert fake.count("GET") == 6
    assert sample("mirror_upstream_budget_waits_total", registry="budgeted") - waits == 2
    assert sample("mirror_upstream_budget_overdrafts_total", registry="budgeted") >= 3


async def test_client_requests_past_the_overdraft_fail_fast(
        upstream: TestServer, fake: FakeRegistry) -> None:
    fake.add_image("app", "v1", [b"x"])
    client = UpstreamClient(UpstreamSettings(
        name="overdrawn", url=URL(str(upstream.make_url(""))),
        budget=BudgetSettings(rate=0.01, burst=2, client_overdraft=0.5)))
    try:
        assert [await _status(client, False) for _ in range(3)] == [200, 200, 200]
        with pytest.raises(TooManyRequests) as info:
            await _status(client, False)
    finally:
        await client.close()
    assert fake.count("GET") == 3
    assert int(info.value.headers["Retry-After"]) >= 1


async def test_budget_refusal_serves_a_cached_tag_stale(clock: ManualClock,
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "50ms"}, upstream={
        "budget": {"rate": "1/h", "burst": 2, "client_overdraft": 0}})
    digest, _ = fake.add_image("app", "v1", [b"x"])
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200  # tag GET + nothing else
    clock.advance(0.06)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200  # the HEAD: budget spent
    clock.advance(0.06)
    response = await mirror.get("/v2/app/manifests/v1")
    assert response.status == 200 and response.headers["Docker-Content-Digest"] == digest
    assert fake.count(contains="/manifests/") == 2
    fake.add_image("app", "v2", [b"y"])
    refused = await mirror.get("/v2/app/manifests/v2")
    assert refused.status == 429 and await _error(refused) == "TOOMANYREQUESTS"


async def test_cache_work_through_the_background_view_waits_where_clients_are_refused(
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={
        "budget": {"rate": "2/s", "burst": 1, "client_overdraft": 0}})
    for tag in ("v1", "v2", "v3"):
        fake.add_image("app", tag, [tag.encode()])
    node = mirror.app[NODE]
    client, clock = node.clients[REGISTRY_NAME], Clock()
    client.guard = UpstreamGuard(node.settings.upstreams[0], clock=clock)
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200  # the one token
    prefetch = asyncio.create_task(
        node.pull.manifest(Repo(REGISTRY_NAME, "app"), "v2", background=True))
    refused = await mirror.get("/v2/app/manifests/v3")
    assert refused.status == 429 and await _error(refused) == "TOOMANYREQUESTS"
    assert not prefetch.done()
    clock.now += 0.5  # the next token
    resolved = await prefetch  # it waited for the token instead of failing
    assert resolved.cache == "miss"
    assert fake.count("GET", "/manifests/v2") == 1
    assert fake.count("GET", "/manifests/v3") == 0


# --- rate-limit headers ------------------------------------------------------------


async def test_docker_hub_ratelimit_headers_become_gauges(make_mirror: MirrorFactory,
                                                         fake: FakeRegistry) -> None:
    mirror = await make_mirror()
    fake.ratelimit = HubRateLimit(limit=100, remaining=80)
    fake.add_image("app", "v1", [b"x"])
    fake.add_image("app", "v2", [b"y"])
    await mirror.get("/v2/app/manifests/v1")
    await mirror.get("/v2/app/manifests/v2")
    text = await (await mirror.get("/metrics")).text()
    labels = f'credential="anonymous",registry="{REGISTRY_NAME}"'
    assert f"mirror_upstream_ratelimit_limit{{{labels}}} 100.0" in text
    assert f"mirror_upstream_ratelimit_remaining{{{labels}}} 78.0" in text
    assert f"mirror_upstream_ratelimit_window_seconds{{{labels}}} 21600.0" in text


async def test_ratelimit_gauges_are_per_credential_and_never_show_the_secret(
        aiohttp_server: Any) -> None:
    passwords = {"bot-a": "s3cret-a", "bot-b": "s3cret-b"}
    remaining = {"bot-a": "0;w=21600", "bot-b": "99;w=21600"}

    async def registry(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        user = next((u for u, p in passwords.items()
                     if header == "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()),
                    None)
        if user is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return web.Response(body=b"{}", headers={"ratelimit-limit": "200;w=21600",
                                                 "ratelimit-remaining": remaining[user]})

    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", registry)
    server = await aiohttp_server(app)
    credentials = tuple(StaticCredential(f"hub-{u[-1]}", u, Secret(p))
                        for u, p in passwords.items())
    client = UpstreamClient(UpstreamSettings(name="hub-creds", url=server.make_url(""),
                                             credentials=credentials))
    try:
        for _ in range(2):  # bot-a reports 0 left: the second request goes as bot-b
            async with client.request("GET", "library/nginx", "manifests/latest") as resp:
                assert resp.status == 200
    finally:
        await client.close()
    assert sample("mirror_upstream_ratelimit_remaining", registry="hub-creds",
                  credential="hub-a") == 0
    assert sample("mirror_upstream_ratelimit_remaining", registry="hub-creds",
                  credential="hub-b") == 99
    assert sample("mirror_upstream_ratelimit_limit", registry="hub-creds",
                  credential="hub-b") == 200
    exposition = "".join(str(m) for m in REGISTRY.collect())
    assert not any(p in exposition for p in passwords.values())
