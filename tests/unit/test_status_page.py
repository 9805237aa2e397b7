"""The status page at ``/``, rendered and loaded in a real headless Chromium while pulls run.

The upstream drips one large blob slowly, so a download is in flight while
the browser loads the page; the test waits for that download to have
received bytes (a state, not a time) before it loads. The screenshot stays
in the test's tmp dir as an artifact (pytest keeps the last three runs).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mirror import config
from mirror.cluster import PeerSet
from mirror.server import status_parts
from mirror.server.charts import Series, bar_chart, line_chart
from mirror.server.history import HISTORY, History, Incidents, SharedIncidents, Totals
from mirror.server.state import NODE
from mirror.server.status import render
from mirror.version import VERSION
from tests.support.chromium import chromium_binary, dump_dom, screenshot
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory

KiB = 1024


async def test_page_escapes_what_clients_named_and_shows_the_budget(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    client = await make_mirror(upstream={"budget": {"rate": "10/s", "burst": 20}})
    state = client.server.app[NODE]
    state.popularity.record("fake.test/<script>alert(1)</script>:v1")
    page = render(state)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert re.search(r"<span class=budget-left>\d+</span> of 20 left at 10/s", page)


def test_history_turns_samples_into_minutes_and_survives_a_counter_reset() -> None:
    now = [1000.0]
    readings = iter([
        Totals(0, hits=0, requests=0, served=0, downloaded=0, upstream_errors=0),
        Totals(0, hits=3, requests=4, served=100, downloaded=40, upstream_errors=1),
        Totals(0, hits=1, requests=2, served=10, downloaded=0, upstream_errors=0),  # reset
        Totals(0, hits=1, requests=2, served=10, downloaded=0, upstream_errors=0),  # now
    ])
    history = History(lambda at: next(readings), clock=lambda: now[0])
    for _ in range(3):
        history.sample()
        now[0] += 60
    minutes = history.minutes()
    assert [m.hit_ratio for m in minutes] == [0.75, 0.5, None]
    assert [m.served for m in minutes] == [100, 10, 0]
    assert [m.upstream_errors for m in minutes] == [1, 0, 0]


def test_charts_are_inline_svg_with_gaps_where_nothing_came() -> None:
    chart = line_chart("c", "Hit ratio <&>", [Series("hits", [50.0, None, 20.0, 30.0], "#0a0")],
                       slots=60, label=lambda v: f"{v:.0f}%", y_max=100.0)
    assert chart.count("<circle") == 1 and chart.count("<polyline") == 1  # split at None
    assert "Hit ratio &lt;&amp;&gt;" in chart and "<script" not in chart
    bars = bar_chart("b", "Errors", Series("errors", [0.0, 3.0, 1.0], "#c00"), slots=60,
                     label=lambda v: f"{v:.0f}")
    assert bars.count("<rect") == 2  # a zero draws nothing


async def test_the_page_lists_the_last_problems_newest_first(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.fault(kind="status", status=503, path="/manifests/")
    client = await make_mirror()
    for tag in ("one", "two"):
        assert (await client.get(f"/v2/lib/app/manifests/{tag}")).status == 502
    assert (await client.get("/v2/lib/app/manifests/Bad!Tag")).status == 400
    page = await (await client.get("/")).text()
    problems = page[page.index("id=incidents"):]
    assert problems.index("Bad!Tag") < problems.index("/two") < problems.index("/one")


@pytest.mark.integration
async def test_status_page_in_chromium_while_pulls_run(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    if chromium_binary() is None:
        pytest.fail("chromium is not installed (scripts/setup.sh --test installs it)")
    _digest, manifest = fake.add_image("lib/app", "v1", [b"small layer" * 100])
    big = fake.add_blob(os.urandom(1024 * KiB))
    slow = fake.add_blob(os.urandom(4096 * KiB))
    fake.fault(kind="drip", path=f"/blobs/{slow}", chunk=64 * KiB, delay=0.5)
    fake.fault(kind="status", status=503, path="/manifests/broken")
    sync = {"rules": [{"name": "base", "registry": "fake.test", "repositories": ["lib/app"],
                       "tags": ["v1"], "interval": "1h"}]}
    client = await make_mirror(storage={"max_size": "1GiB"}, sync=sync)
    state = client.server.app[NODE]
    history = client.server.app[HISTORY]
    start = time.time() - 5 * 60

    # Five minutes of history, sampled by hand between real pulls: misses, then hits.
    layer = re.findall(r'"digest": "(sha256:[0-9a-f]{64})"', manifest.decode())[-1]
    for minute in range(5):
        history.sample(at=start + 60 * minute)
        for _ in range(minute + 1):
            assert (await client.get("/v2/lib/app/manifests/v1")).status == 200
            assert len(await (await client.get(f"/v2/lib/app/blobs/{layer}")).read()) == 1100
        if minute in (1, 3):
            assert len(await (await client.get(f"/v2/lib/app/blobs/{big}")).read()) == 1024 * KiB
        if minute == 2:
            assert (await client.get("/v2/lib/app/manifests/broken")).status == 502

    async def slow_pull() -> Any:
        resp = await client.get(f"/v2/lib/app/blobs/{slow}")
        return await resp.read()

    pulling = asyncio.create_task(slow_pull())
    try:
        for _ in range(400):  # until the download has bytes in (state, not time)
            fills = state.fetcher.fills()
            if fills and fills[0].written > 0:
                break
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the slow download never started")
        url = str(client.make_url("/"))
        dom = await dump_dom(url)
        shot = await screenshot(url, tmp_path / "status.png", size=(1280, 1900))
    finally:
        pulling.cancel()
    print(f"status page screenshot: {shot}")  # the artifact's path, shown with -s
    if os.environ.get("MIRROR_STATUS_SHOT"):  # keep a copy where the operator wants it
        await asyncio.to_thread(shutil.copyfile, shot, os.environ["MIRROR_STATUS_SHOT"])

    text = html.unescape(dom)
    assert "<title>mirror status</title>" in dom
    assert f">{VERSION}<" in dom
    overview = _section(dom, "overview")
    for what in ("Up", "Listening on", "127.0.0.1:5000", "TLS <span id=\"tls\">off", "Workers",
                 "Disk", "free", "cap", "saved"):
        assert what in overview, what
    charts = _section(dom, "charts")
    for chart in ("chart-hit-ratio", "chart-bytes", "chart-errors"):
        assert re.search(rf"<svg [^>]*id=\"{chart}\"", charts), chart
    assert "<polyline" in charts and "<rect" in charts  # lines drawn, an error bar drawn
    body = dom.split("<body>")[1]
    assert "<script" not in body and "src=" not in body and "://" not in body  # self-contained
    registries = _section(dom, "registries")
    assert "fake.test" in registries
    ratio = re.search(r"class=\"n hit-ratio\">([0-9.]+)%<", registries)
    assert ratio is not None and 0 < float(ratio.group(1)) < 100
    downloads = _section(dom, "downloads")
    assert "<progress" in downloads and slow[:19] in downloads and "fake.test" in downloads
    assert "4.0 MiB" in downloads  # the size, known from upstream's Content-Length
    popular = _section(dom, "popular")
    # one client pulled three times: one pull (a client counts once per image and window)
    assert "fake.test/lib/app:v1" in popular and ">1<" in popular
    health = _section(dom, "health")
    assert "closed" in health and "no budget" in health
    sync_rows = _section(dom, "sync")
    assert "base" in sync_rows and "every 1 h" in sync_rows
    problems = _section(dom, "incidents")
    assert "502" in problems and "/v2/lib/app/manifests/broken" in problems
    assert "single node" in _section(dom, "cluster")
    links = _section(dom, "links")
    assert "href=\"/metrics\"" in links and "href=\"/admin/sync\"" in links
    assert re.search(r"id=\"cache-limit\">1\.0 GiB<", dom)
    assert "mirror" in text
    assert (await asyncio.to_thread(shot.read_bytes))[:8] == b"\x89PNG\r\n\x1a\n"


def _section(dom: str, element_id: str) -> str:
    """The markup of the element with ``element_id`` (a table or a paragraph)."""
    match = re.search(rf"<(table|p|div|section|nav) [^>]*id=\"{element_id}\".*?</\1>",
                      dom, re.S)
    assert match is not None, f"no #{element_id} in the page"
    return match.group(0)


def test_workers_share_their_problems_and_the_oldest_start(tmp_path: Path) -> None:
    first, second = Incidents(clock=lambda: 100.0), Incidents(clock=lambda: 200.0)
    first.record(502, "GET", "/v2/a/manifests/1", "upstream answered 503", "10.0.0.1")
    second.record(429, "GET", "/v2/b/manifests/1", "budget spent", "10.0.0.2")
    one = SharedIncidents(tmp_path, 0, started=50.0)
    two = SharedIncidents(tmp_path, 1, started=80.0)
    one.write(first.latest())
    (tmp_path / "w7.json").write_text("{not json")  # a torn file is skipped
    view = two.read(second.latest())  # its own, fresh from memory, and the others' files
    assert view.started == 50.0
    assert [i.status for i in view.incidents] == [429, 502]


def test_peers_and_parents_show_their_health() -> None:
    settings = config.parse(
        {"version": 1, "listen": "127.0.0.2:5000", "storage": {"path": "/tmp/unused"},
         "upstreams": [{"name": "r.test", "url": "http://127.0.0.1:9", "default": True}],
         "cluster": {"secret_env": "S", "peers": ["http://127.0.0.3:5000",
                                                  "http://127.0.0.4:5000"],
                     "parents": ["http://127.0.0.9:5000"]}},
        env={"S": "x" * 32})
    assert settings.cluster is not None and settings.cluster.self_url is not None
    peers = PeerSet(settings.cluster, settings.cluster.self_url)
    peers.succeeded("http://127.0.0.3:5000")
    # The section reads only these three attributes of the node.
    node = SimpleNamespace(peer_set=peers, settings=settings, s3=None)
    section = status_parts.cluster(node)  # type: ignore[arg-type]
    rows = re.findall(r"<tr><td>(\w+)</td><td><code>([^<]+)</code></td><td class=(\w+)>",
                      section)
    assert rows == [("peer", "http://127.0.0.3:5000", "ok"),
                    ("peer", "http://127.0.0.4:5000", "bad"),
                    ("parent", "http://127.0.0.9:5000", "muted")]
