"""Logs, headers and CLI lines that tell the truth (issue 21), in process.

The real-process proof of the accounting of completed responses is
tests/integration/test_truth_real.py (skopeo through a Bearer-token Distribution).
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

import structlog

from mirror import config, metrics
from mirror.cache.inventory import Inventory
from mirror.server.figures import total
from mirror.server.history import INCIDENT_LOG
from mirror.server.state import NODE
from mirror.sync.rules import rule_fingerprint
from mirror.sync_cli import _print_report, _print_status, _summary, warn_if_rules_differ
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory

KiB = 1024



def _dripping_blob(fake: FakeRegistry, size: int, delay: float) -> tuple[bytes, str]:
    """A random blob upstream sends in 64 KiB chunks, ``delay`` s apart."""
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path=f"/blobs/{digest}", chunk=64 * KiB, delay=delay)
    return data, digest

async def test_an_upstream_503_is_logged_at_warning_and_listed_as_a_problem(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    fake.fault(kind="status", status=503, path="/manifests/")
    client = await make_mirror()
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/v2/lib/app/manifests/v1")
    assert response.status == 502  # upstream's 503, passed on as a bad gateway
    lines = [e for e in logs if e["event"] == "request"]
    assert [e["log_level"] for e in lines] == ["warning"]
    problems = client.server.app[INCIDENT_LOG].latest()
    assert [(p.status, p.path) for p in problems] == [(502, "/v2/lib/app/manifests/v1")]
    assert problems[0].error  # why, as the log line says


async def test_a_warm_that_upstream_503s_is_logged_at_warning(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    fake.fault(kind="status", status=503, path="/blobs/")  # the tag checks out, blobs fail
    client = await make_mirror()
    with structlog.testing.capture_logs() as logs:
        [result] = await client.server.app[NODE].sync.warm_refs(["fake.test/lib/app:v1"])
    assert result.result == "failed" and "503" in result.reason
    assert [e["log_level"] for e in logs if e["event"] == "warm_done"] == ["warning"]


async def test_a_hit_is_logged_at_info_and_a_404_is_no_problem(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    client = await make_mirror()
    with structlog.testing.capture_logs() as logs:
        assert (await client.get("/v2/lib/app/manifests/v1")).status == 200
        assert (await client.get("/v2/lib/app/manifests/nope")).status == 404
    assert {e["log_level"] for e in logs if e["event"] == "request"} == {"info"}
    assert client.server.app[INCIDENT_LOG].latest() == []


async def test_a_blob_streamed_while_it_downloads_carries_its_request_id(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    data, digest = _dripping_blob(fake, 512 * KiB, delay=0.01)
    client = await make_mirror()
    with structlog.testing.capture_logs() as logs:
        response = await client.get(f"/v2/lib/app/blobs/{digest}")
        body = await response.read()
        lines = await _request_lines(logs)
    assert body == data
    line = lines[0]
    assert line["cache"] == "miss"  # streamed from the fill, headers sent before the end
    assert response.headers["X-Request-Id"] == line["request_id"]
    supplied = await client.get(f"/v2/lib/app/blobs/{digest}",
                                headers={"X-Request-Id": "trace-42"})
    assert supplied.headers["X-Request-Id"] == "trace-42"


async def test_served_bytes_count_what_went_out_even_when_the_client_leaves_early(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    data, digest = _dripping_blob(fake, 2048 * KiB, delay=0.05)
    client = await make_mirror()
    state = client.server.app[NODE]
    before = total(metrics.SERVED_BYTES)
    response = await client.get(f"/v2/lib/app/blobs/{digest}")
    await response.content.readexactly(128 * KiB)
    response.close()  # a client that hangs up part way
    for _ in range(400):  # until the fill is over (state, not time)
        if not state.fetcher.fills():
            break
        await asyncio.sleep(0.025)
    served = total(metrics.SERVED_BYTES) - before
    assert 0 < served < len(data)  # what went out, not the whole blob, not nothing


async def test_an_image_pulled_after_an_evict_elsewhere_is_stored_again(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer" * 1000])
    client = await make_mirror()
    node = client.server.app[NODE]
    layer = list(fake.blobs)  # every blob of the image: config and layer

    async def pull() -> None:
        await _pull_whole(client, "lib/app", "v1", layer)

    await pull()
    await pull()  # now the lean path answers from memory
    inventory = Inventory(node.settings.storage, lambda _t: ("fake.test", "lib/app", "v1"))
    try:
        await asyncio.to_thread(inventory.evict, "fake.test/lib/app:v1")  # `mirror cache evict`
        assert await asyncio.to_thread(inventory.images) == []
        await pull()  # answered from memory (what is not held there is fetched again)
        await node._changed_elsewhere()  # what the server does when it notices (10 s at most)
        await _fills_published(node)
        [row] = await asyncio.to_thread(inventory.images)
        assert row.reference == "fake.test/lib/app:v1" and row.state == "complete", row
        await asyncio.to_thread(inventory.pin, "fake.test/lib/app:v1")
    finally:
        inventory.close()


async def test_a_pull_while_the_server_restores_after_an_eviction_is_stored_too(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    """The memory copies go before the restore, not after: a pull answered while the
    server writes back what it served is kept (it was once served from memory and
    stored by nobody, so ``cache ls`` never listed it)."""
    fake.add_image("lib/app", "v1", [b"layer" * 1000])
    client = await make_mirror()
    node = client.server.app[NODE]
    layer = list(fake.blobs)

    async def pull() -> None:
        await _pull_whole(client, "lib/app", "v1", layer)

    await pull()
    await pull()
    inventory = Inventory(node.settings.storage, lambda _t: ("fake.test", "lib/app", "v1"))
    restore = node.tags.keep_pointing_to

    async def pull_then_restore(held: Any, digests: set[str]) -> int:
        await pull()  # the pull lands in the middle of the server's restore
        return await restore(held, digests)

    node.tags.keep_pointing_to = pull_then_restore  # type: ignore[method-assign]
    try:
        await asyncio.to_thread(inventory.evict, "fake.test/lib/app:v1")
        await node._changed_elsewhere()
        await _fills_published(node)
        [row] = await asyncio.to_thread(inventory.images)
        assert row.reference == "fake.test/lib/app:v1" and row.state == "complete", row
    finally:
        inventory.close()


async def _pull_whole(client: Any, repository: str, tag: str, blobs: list[str]) -> None:
    """A pull as a client makes it: the manifest, then every blob, each body read."""
    paths = [f"/v2/{repository}/manifests/{tag}",
             *(f"/v2/{repository}/blobs/{digest}" for digest in blobs)]
    for path in paths:
        response = await client.get(path)
        assert response.status == 200
        await response.read()


async def _fills_published(node: Any) -> None:
    """Until no download is under way: what was fetched again is published (a state)."""
    for _ in range(400):
        if not node.fetcher.fills():
            return
        await asyncio.sleep(0.025)


async def _request_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request lines, once the handler has written one (it ends after the client read)."""
    for _ in range(200):
        lines = [e for e in logs if e["event"] == "request"]
        if lines:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError("no request line was logged")


def _settings(rules: list[dict[str, Any]]) -> config.Settings:
    return config.parse({"version": 1, "listen": "127.0.0.1:5000",
                         "storage": {"path": "/tmp/unused"},
                         "upstreams": [{"name": "r.test", "url": "http://127.0.0.1:9",
                                        "default": True}],
                         "sync": {"rules": rules}}, env={})


def test_sync_status_never_prints_ratelimit_remaining_none(capsys: Any) -> None:
    _print_status({"enabled": True, "rules": [],
                   "registries": {"r.test": {"ratelimit_remaining": None},
                                  "hub": {"ratelimit_remaining": 87}}})
    out = capsys.readouterr().out
    assert "None" not in out
    assert "r.test: no rate limit reported yet" in out and "hub: ratelimit-remaining 87" in out


def test_a_dry_run_says_present_for_images_already_held(capsys: Any) -> None:
    _print_report({"dry_run": True, "counts": {"present": 1, "planned": 1},
                   "missing_bytes": 2048, "results": [
                       {"ref": "r.test/a:1", "result": "present", "present_bytes": 4096,
                        "platforms": ["linux/amd64"]},
                       {"ref": "r.test/b:1", "result": "planned", "missing_bytes": 2048}]})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("present") and "r.test/a:1 [linux/amd64]" in lines[0]
    assert "all 4.0 KiB held" in lines[0] and "to fetch" not in lines[0]
    assert lines[1].startswith("planned") and "2.0 KiB to fetch" in lines[1]


def test_warm_names_the_platforms_it_fetched() -> None:
    out = io.StringIO()
    _summary([{"ref": "r.test/a:1", "result": "warmed", "fetched_bytes": 1024,
               "platforms": ["linux/arm64"]},
              {"ref": "r.test/b:1", "result": "present"}], out)
    text = out.getvalue()
    assert "warmed: r.test/a:1 [linux/arm64] 1.0 KiB fetched" in text
    assert "present: r.test/b:1 [single-platform image] already held" in text


def test_sync_warns_when_the_server_runs_other_rules() -> None:
    rule = {"name": "base", "registry": "r.test", "repositories": ["a"], "tags": ["1"]}
    mine = _settings([rule])
    assert mine.sync is not None
    same = {"rules": [{"name": "base", "fingerprint": rule_fingerprint(mine.sync.rules[0])},
                      {"name": "popular"}]}
    out = io.StringIO()
    assert not warn_if_rules_differ(same, mine, "http://s", out)
    assert out.getvalue() == ""
    other = _settings([{**rule, "tags": ["2"]}])
    assert warn_if_rules_differ(same, other, "http://s", out)
    assert "differing: base" in out.getvalue() and "--local" in out.getvalue()
    out = io.StringIO()
    assert warn_if_rules_differ({"rules": []}, mine, "http://s", out)
    assert "differing: base" in out.getvalue()
