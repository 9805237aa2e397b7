"""The sync loop on a node in front of the in-process fake upstream, on a manual clock:
what one pass fetches, what an unchanged tag costs, and the faults a real registry cannot
be made to show (429 mid-sync, an outage, a cut mid-blob, a rate-limit floor)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from mirror.bundle.export import Planner
from mirror.clock import ManualClock
from mirror.node import Node
from mirror.oci import Digest
from mirror.pull import Repo
from mirror.server.app import create_app
from mirror.server.state import NODE
from mirror.sync import SyncService
from tests.support.fake import OCI_INDEX, OCI_MANIFEST, FakeRegistry, HubRateLimit
from tests.support.net import free_port
from tests.unit.conftest import mirror_settings

APP = Repo("fake.test", "app")
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SyncFactory = Callable[..., Awaitable[tuple[Node, SyncService]]]
WATCH = {"name": "app", "registry": "fake.test", "repositories": ["app"], "tags": ["v1"],
         "platforms": ["linux/amd64"]}


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_sync(tmp_path: Path, upstream: TestServer,
                    clock: ManualClock) -> AsyncIterator[SyncFactory]:
    """A started node and a sync service over it whose loop is not running: the test
    runs passes itself (``run_once``)."""
    nodes: list[Node] = []

    async def start(sync: dict[str, Any] | None = None, **overrides: Any) -> tuple[Node,
                                                                                     SyncService]:
        url = str(upstream.make_url("")).rstrip("/")
        settings = mirror_settings(tmp_path / "cache", url, sync=sync or {"rules": [WATCH]},
                                   **overrides)
        assert settings.sync is not None
        node = Node(dataclasses.replace(settings, sync=None), clock=clock)
        await node.start()
        nodes.append(node)
        service = SyncService(settings.sync, node.pull, node.router, clients=node.clients,
                              index=node.store.index, popularity=node.popularity,
                              state_path=tmp_path / "cache" / "sync" / "state.json", clock=clock)
        await service.load()
        return node, service

    yield start
    for node in nodes:
        await node.stop()


def _multi_arch(fake: FakeRegistry, tag: str, seed: bytes) -> dict[str, list[str]]:
    """An index under ``tag`` with an amd64 and an arm64 image; their blob digests."""
    amd, amd_body = fake.add_image("app", None, [seed + b"-amd-1", seed + b"-amd-2"])
    arm, arm_body = fake.add_image("app", None, [seed + b"-arm"], arch="arm64")
    fake.add_index("app", tag, [(amd, amd_body, "amd64"), (arm, arm_body, "arm64")])
    blobs = {arch: [d["digest"] for d in [json.loads(body)["config"],
                                          *json.loads(body)["layers"]]]
             for arch, body in (("amd64", amd_body), ("arm64", arm_body))}
    return blobs


def _held(node: Node, digests: list[str]) -> list[bool]:
    return [node.store.blob_path(Digest.parse(d)).exists() for d in digests]


async def test_one_pass_warms_the_selected_platform_and_an_unchanged_tag_costs_one_head(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    blobs = _multi_arch(fake, "v1", b"one")
    node, sync = await make_sync()
    report = await sync.run_once()
    assert report["counts"] == {"warmed": 1}
    assert all(_held(node, blobs["amd64"])) and not any(_held(node, blobs["arm64"]))
    assert fake.count("GET", "/blobs/") == 3
    pins = node.store.index.pins()
    assert all(any(s.startswith("warm-until:") for s in pins[d]) for d in blobs["amd64"])

    clock.advance(120)  # past `recheck`: the tag is asked again
    fake.requests.clear()
    report = await sync.run_once()
    assert report["counts"] == {"present": 1}
    assert [(r.method, r.path) for r in fake.requests] == [("HEAD", "/v2/app/manifests/v1")]

    fresh = _multi_arch(fake, "v1", b"two")  # the tag moves upstream
    clock.advance(120)
    lag_before = _metric("mirror_sync_lag_seconds_count")
    report = await sync.run_once()
    assert report["counts"] == {"warmed": 1}
    assert all(_held(node, fresh["amd64"])) and not any(_held(node, fresh["arm64"]))
    assert _metric("mirror_sync_lag_seconds_count") == lag_before + 1
    record = sync.records["fake.test/app:v1"]
    assert record.held == record.digest and record.result == "warmed"


async def test_dry_run_counts_what_would_be_fetched_and_fetches_no_blob(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    _multi_arch(fake, "v1", b"dry")
    _, sync = await make_sync()
    report = await sync.run_once(dry_run=True)
    assert report["counts"] == {"planned": 1}
    assert report["results"][0]["missing_blobs"] == 3
    assert report["missing_bytes"] > 0
    assert fake.count("GET", "/blobs/") == 0
    assert not sync.records


async def test_semver_rule_and_a_missing_repository_do_not_stop_the_rest(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    for tag in ("1.9", "1.25.3", "1.26.0-rc1", "2.0", "latest", "v1.27"):
        fake.add_image("app", tag, [tag.encode()])
    rules = [{"name": "gone", "registry": "fake.test", "repositories": ["nothing/here"],
              "tags": [{"semver": ">=1"}]},
             {"name": "semver", "registry": "fake.test", "repositories": ["app"],
              "tags": [{"semver": ">=1.25 <2"}]}]
    _, sync = await make_sync({"rules": rules})
    report = await sync.run_once()
    results = {r["ref"]: r for r in report["results"]}
    assert set(results) == {"fake.test/nothing/here", "fake.test/app:v1.27",
                            "fake.test/app:1.25.3"}
    assert "repository not found" in results["fake.test/nothing/here"]["reason"]
    assert results["fake.test/app:v1.27"]["result"] == "warmed"
    assert fake.count("GET", "/tags/list") == 2


async def test_429_mid_sync_pauses_until_retry_after_then_resumes(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    blobs = _multi_arch(fake, "v1", b"limited")
    layer = blobs["amd64"][1]
    fake.fault(kind="status", path=f"/blobs/{layer}", status=429, times=1,
               headers={"Retry-After": "120"})
    node, sync = await make_sync()
    report = await sync.run_once()
    assert report["counts"] == {"deferred": 1}
    assert sync.budget.paused("fake.test") > 0

    clock.advance(30)  # still paused: nothing is asked upstream at all
    fake.requests.clear()
    assert (await sync.run_once())["counts"] == {"deferred": 1}
    assert fake.requests == []

    clock.advance(100)
    assert (await sync.run_once())["counts"] == {"warmed": 1}
    assert all(_held(node, blobs["amd64"]))


async def test_outage_during_a_sync_fails_the_reference_and_clients_are_still_served(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    _multi_arch(fake, "v1", b"outage")
    node, sync = await make_sync()
    assert (await sync.run_once())["counts"] == {"warmed": 1}
    fake.fault(kind="status", status=503)  # everything fails from now on
    clock.advance(120)
    report = await sync.run_once()  # the tag is answered stale: what is held stays held
    assert report["counts"] == {"present": 1}
    resolved = await node.pull.manifest(APP, "v1")
    assert resolved.cache in ("hit", "stale")


async def test_ratelimit_floor_stops_fetching_but_not_checking(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    _multi_arch(fake, "v1", b"floor")
    fake.ratelimit = HubRateLimit(limit=100, remaining=5)
    _, sync = await make_sync({"rules": [WATCH], "ratelimit_floor": 10})
    report = await sync.run_once()
    assert report["counts"] == {"deferred": 1}
    assert "ratelimit floor" in report["results"][0]["reason"]
    assert fake.count("GET", "/blobs/") == 0


async def test_a_warm_cut_by_a_restart_resumes_with_only_what_is_missing(
        make_sync: SyncFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    blobs = _multi_arch(fake, "v1", b"restart" * 1000)
    cut = blobs["amd64"][1]
    fake.fault(kind="drop", path=f"/blobs/{cut}", after=100, times=10)
    node, sync = await make_sync()
    report = await sync.run_once()
    assert report["counts"] == {"failed": 1}
    assert _held(node, blobs["amd64"]) == [True, False, True]  # nothing half-published
    await node.stop()

    fake.faults.clear()
    fake.requests.clear()
    node, sync = await make_sync()  # the restart: same storage, records read back
    assert sync.records["fake.test/app:v1"].result == "failed"
    assert (await sync.run_once())["counts"] == {"warmed": 1}
    assert fake.count("GET", "/blobs/") == 1 and fake.count("GET", cut) == 1
    assert all(_held(node, blobs["amd64"]))
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no temp file left behind


async def test_popular_keeps_the_most_pulled_tags_warm(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    _multi_arch(fake, "v1", b"pop")
    fake.add_image("app", "v2", [b"v2-layer"])
    fake.add_image("app", "v3", [b"v3-layer"])
    node, sync = await make_sync({"popular": {"top": 2}})
    for tag, pulls in (("v1", 3), ("v2", 2), ("v3", 1)):
        resolved = await node.pull.manifest(APP, tag)
        for client in range(pulls):
            node.popularity.tag_pulled("fake.test", "app", tag, resolved.manifest,
                                       f"client-{client}")
    report = await sync.run_once()
    assert sorted(r["ref"] for r in report["results"]) == ["fake.test/app:v1",
                                                           "fake.test/app:v2"]
    assert report["counts"] == {"warmed": 2}


async def test_pulls_are_counted_and_shown_at_the_admin_api(
        make_mirror: Any, fake: FakeRegistry) -> None:
    _multi_arch(fake, "v1", b"admin")
    mirror = await make_mirror()
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    for _ in range(2):
        index = await (await mirror.get("/v2/app/manifests/v1", headers=accept)).json()
    arm = next(m["digest"] for m in index["manifests"]
               if m["platform"]["architecture"] == "arm64")
    assert (await mirror.get(f"/v2/app/manifests/{arm}")).status == 200
    popular = await (await mirror.get("/admin/popular?top=5")).json()
    # one client pulled twice: one pull (a client counts once per image and window)
    assert popular["top"] == [{"registry": "fake.test", "repository": "app", "tag": "v1",
                               "score": 1.0}]
    assert popular["platforms"] == {"fake.test/app": {"linux/arm64": 1.0}}
    assert (await mirror.get("/admin/popular?top=x")).status == 400

    status = await (await mirror.get("/admin/sync")).json()
    assert status["enabled"] is False


async def test_admin_warm_streams_progress_and_lists_failures(
        make_mirror: Any, fake: FakeRegistry, tmp_path: Path) -> None:
    blobs = _multi_arch(fake, "v1", b"warm")
    mirror = await make_mirror()
    assert (await mirror.post("/admin/warm", json={"refs": ["app:v1"]})).status == 401
    local = (tmp_path / "cache" / "admin.token").read_text().strip()
    token = {"Authorization": f"Bearer {local}"}  # the node's own, as `mirror warm` sends
    response = await mirror.post("/admin/warm", headers=token, json={
        "refs": ["app:v1", "app:nope", "Not A Ref"], "platforms": ["linux/arm64"]})
    assert response.status == 200
    events = [json.loads(line) for line in (await response.text()).splitlines()]
    end = events[-1]
    assert end["event"] == "end"
    assert sorted(f["ref"] for f in end["failed"]) == ["Not A Ref", "fake.test/app:nope"]
    assert [e["event"] for e in events if e.get("ref") == "fake.test/app:v1"] == [
        "plan", "blob", "blob", "done"]
    assert fake.count("GET", blobs["arm64"][1]) == 1 and fake.count("GET", blobs["amd64"][1]) == 0
    bad = await mirror.post("/admin/warm", headers=token, json={"refs": "app:v1"})
    assert bad.status == 400


async def test_referrers_are_warmed_when_the_rule_says_so(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    image, image_body = fake.add_image("app", "signed", [b"signed-layer"])
    signature = fake.add_blob(b"a signature")
    empty = fake.add_blob(b"{}")
    artifact = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIG,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty,
                   "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": signature, "size": 11}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image, "size": len(image_body)},
    }).encode()
    artifact_digest = fake.add_manifest("app", artifact, OCI_MANIFEST)
    referrers = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": artifact_digest, "size": len(artifact),
         "artifactType": SIG}]}).encode()
    # Distribution 2.8 has no referrers API: the referrers tag schema answers.
    fake.add_manifest("app", referrers, OCI_INDEX, tag=image.replace(":", "-"))
    rule = {**WATCH, "tags": ["signed"]}
    node, sync = await make_sync({"rules": [rule]})
    await sync.run_once()
    assert not node.store.blob_path(Digest.parse(signature)).exists()

    sync.settings = dataclasses.replace(
        sync.settings, rules=(dataclasses.replace(sync.settings.rules[0], referrers=True),))
    clock.advance(120)
    report = await sync.run_once()
    assert report["counts"] == {"warmed": 1}
    assert node.store.blob_path(Digest.parse(signature)).exists()
    assert report["results"][0]["manifests"] == 2


async def test_warm_pins_expire_and_upstream_requests_are_counted_as_sync(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    blobs = _multi_arch(fake, "v1", b"pins")
    before = _metric("mirror_upstream_requests_by_caller_total", registry="fake.test",
                     caller="sync")
    node, sync = await make_sync({"rules": [{**WATCH, "protect": "1h"}]})
    await sync.run_once()
    spent = _metric("mirror_upstream_requests_by_caller_total", registry="fake.test",
                    caller="sync") - before
    assert spent == len(fake.requests)  # every request of the pass, blob fills included
    pinned = node.store.index.pins()
    assert set(blobs["amd64"]) <= set(pinned)
    assert node.store.index.sweep_expired(clock.time() + 3599) == 0
    assert node.store.index.sweep_expired(clock.time() + 3601) == 5  # index, manifest, 3 blobs
    assert not set(blobs["amd64"]) & set(node.store.index.pins())


async def test_the_node_runs_the_loop_only_when_sync_is_configured(
        make_mirror: Any, fake: FakeRegistry, tmp_path: Path) -> None:
    blobs = _multi_arch(fake, "v1", b"loop")
    mirror = await make_mirror(sync={"rules": [WATCH]})
    node = mirror.server.app[NODE]
    state = tmp_path / "cache" / "sync" / "state.json"
    for _ in range(250):  # the loop's first pass runs at start, and saves its records
        if state.is_file():
            break
        await asyncio.sleep(0.02)
    assert node.sync.records["fake.test/app:v1"].result == "warmed"
    assert all(_held(node, blobs["amd64"]))
    assert json.loads(state.read_text())["records"][0]["ref"] == "fake.test/app:v1"


async def test_a_paced_fill_paces_every_chunk_while_no_client_reads_it(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    data = bytes(range(256)) * 12_000  # about 3 MiB: several chunks
    digest = fake.add_blob(data)
    node, _ = await make_sync()
    paced: list[int] = []

    async def pace(size: int) -> None:
        paced.append(size)

    await node.pull.fetch_blob(APP, Digest.parse(digest), pace=pace)
    assert sum(paced) == len(data) and len(paced) > 1
    assert node.store.blob_path(Digest.parse(digest)).read_bytes() == data


async def test_a_429_on_a_tag_list_defers_the_rule_without_asking_again(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    fake.add_image("app", "1.0", [b"one"])
    fake.fault(kind="status", path="/tags/list", status=429, times=1,
               headers={"Retry-After": "300"})
    rule = {"name": "semver", "registry": "fake.test", "repositories": ["app"],
            "tags": [{"semver": ">=1"}]}
    _, sync = await make_sync({"rules": [rule]})
    assert (await sync.run_once())["counts"] == {"deferred": 1}
    fake.requests.clear()
    clock.advance(60)
    assert (await sync.run_once())["counts"] == {"deferred": 1}
    assert fake.requests == []
    clock.advance(300)
    assert (await sync.run_once())["counts"] == {"warmed": 1}


async def test_ticks_follow_the_schedule_and_the_off_peak_windows(
        make_sync: SyncFactory, fake: FakeRegistry, clock: ManualClock) -> None:
    _multi_arch(fake, "v1", b"tick")
    # The manual clock starts at 1,000,000 s after the epoch: 13:46 UTC.
    rule = {**WATCH, "interval": "10m"}
    _, sync = await make_sync({"rules": [rule], "off_peak": ["22:00-06:00"]})
    assert await sync.tick() is None  # due, but outside the window: skipped to its next time
    assert fake.requests == []
    clock.advance(9 * 3600)  # 22:46 UTC: inside the window
    report = await sync.tick()
    assert report is not None and report["counts"] == {"warmed": 1}
    fake.requests.clear()
    clock.advance(60)
    assert await sync.tick() is None  # not due again before 10 minutes
    assert fake.requests == []
    clock.advance(600)
    report = await sync.tick()
    assert report is not None and report["counts"] == {"present": 1}


async def test_the_admin_api_wants_the_admin_token_when_one_is_set(
        make_mirror: Any, tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("a-long-enough-admin-token")
    mirror = await make_mirror(admin={"token_file": str(token)})
    assert (await mirror.get("/admin/popular")).status == 401
    assert (await mirror.post("/admin/warm", json={"refs": ["app:v1"]})).status == 401
    bearer = {"Authorization": "Bearer a-long-enough-admin-token"}
    ok = await mirror.get("/admin/popular", headers=bearer)
    assert ok.status == 200


async def test_a_region_warms_what_its_parent_pulls_most(
        make_sync: SyncFactory, fake: FakeRegistry, tmp_path: Path,
        aiohttp_client: Any, upstream: TestServer, *, clock: ManualClock) -> None:
    """The parent's clients pull app:v2 most; the child region's next sync pass warms it
    (and the parent's list is read through the peer API with a peer token)."""
    fake.add_image("app", "v1", [b"v1-layer"])
    fake.add_image("app", "v2", [b"v2-layer"])
    secret = tmp_path / "peer-secret"
    secret.write_text("a-secret-for-the-parent-test")
    url = str(upstream.make_url("")).rstrip("/")
    port = free_port()  # the parent's URL is what the child's peer tokens are made for
    parent_settings = mirror_settings(tmp_path / "parent", url, cluster={
        "secret_file": str(secret), "region": "us", "self_url": f"http://127.0.0.1:{port}"})
    parent = await aiohttp_client(create_app(parent_settings, clock=clock),
                                  server_kwargs={"port": port})
    # One client here: it pulls v2 (again and again: one pull) and only checks v1 (HEAD:
    # not a pull).
    for _ in range(3):
        assert (await parent.get("/v2/app/manifests/v2")).status == 200
    assert (await parent.head("/v2/app/manifests/v1")).status == 200
    parent_url = str(parent.make_url("")).rstrip("/")
    node, sync = await make_sync({"popular": {"top": 1}}, cluster={
        "secret_file": str(secret), "region": "eu", "parents": [parent_url]})
    assert node.parents is not None
    sync.parents_popular = node.parents.popular
    report = await sync.run_once()
    assert [r["ref"] for r in report["results"]] == ["fake.test/app:v2"]
    assert report["counts"] == {"warmed": 1}
    unauthenticated = await parent.get("/_peer/popular")
    assert unauthenticated.status == 401


def _lazy_index(fake: FakeRegistry) -> dict[str, bytes]:
    """An index under ``v1``: amd64 and arm64 images, a SOCI index beside them (platform
    unknown/unknown) and arm64's BuildKit attestation; each one's manifest body."""
    amd, amd_body = fake.add_image("app", None, [b"lazy-amd"])
    arm, arm_body = fake.add_image("app", None, [b"lazy-arm"], arch="arm64")
    soci, soci_body = fake.add_image("app", None, [b"a ztoc"])
    attest, attest_body = fake.add_image("app", None, [b"an arm64 provenance"])
    unknown = {"os": "unknown", "architecture": "unknown"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": amd, "size": len(amd_body),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": arm, "size": len(arm_body),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": OCI_MANIFEST, "digest": soci, "size": len(soci_body),
         "artifactType": "application/vnd.amazon.soci.index.v2+json", "platform": unknown},
        {"mediaType": OCI_MANIFEST, "digest": attest, "size": len(attest_body),
         "platform": unknown, "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                              "vnd.docker.reference.digest": arm}},
    ]}
    fake.add_manifest("app", json.dumps(index).encode(), OCI_INDEX, tag="v1")
    return {"amd": amd_body, "arm": arm_body, "soci": soci_body, "attest": attest_body}


def _layer(body: bytes) -> str:
    return str(json.loads(body)["layers"][0]["digest"])


async def test_platform_filter_keeps_what_is_not_a_platform_image(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    """Issue 23: a SOCI index bundled in the image index (an artifact beside the images)
    is warmed with the selected platform; another platform and its BuildKit attestation
    (platform unknown/unknown) are not."""
    bodies = _lazy_index(fake)
    node, sync = await make_sync()
    report = await sync.run_once()
    assert report["counts"] == {"warmed": 1}
    assert _held(node, [_layer(bodies["amd"]), _layer(bodies["soci"])]) == [True, True]
    assert _held(node, [_layer(bodies["arm"]), _layer(bodies["attest"])]) == [False, False]


async def test_export_platform_filter_keeps_what_is_not_a_platform_image(
        make_sync: SyncFactory, fake: FakeRegistry) -> None:
    """The same filter in ``mirror export --platform``."""
    bodies = _lazy_index(fake)
    node, _ = await make_sync()
    planner = Planner(node.pull, node.router, platforms=["linux/amd64"])
    await planner.add("fake.test/app:v1")
    blobs = planner.plan.blobs
    assert _layer(bodies["amd"]) in blobs and _layer(bodies["soci"]) in blobs
    assert _layer(bodies["arm"]) not in blobs and _layer(bodies["attest"]) not in blobs
