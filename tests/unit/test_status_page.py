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
from pathlib import Path
from typing import Any

import pytest

from mirror.server.state import NODE
from mirror.server.status import render
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


@pytest.mark.integration
async def test_status_page_in_chromium_while_pulls_run(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    if chromium_binary() is None:
        pytest.fail("chromium is not installed (scripts/setup.sh --test installs it)")
    _digest, manifest = fake.add_image("lib/app", "v1", [b"small layer" * 100])
    slow = fake.add_blob(os.urandom(4096 * KiB))
    fake.fault(kind="drip", path=f"/blobs/{slow}", chunk=64 * KiB, delay=0.5)
    client = await make_mirror(storage={"max_size": "1GiB"})
    state = client.server.app[NODE]

    for _ in range(3):  # the small image: a miss, then hits
        assert (await client.get("/v2/lib/app/manifests/v1")).status == 200
    layer = re.findall(r'"digest": "(sha256:[0-9a-f]{64})"', manifest.decode())[-1]
    for _ in range(2):
        assert len(await (await client.get(f"/v2/lib/app/blobs/{layer}")).read()) == 1100

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
        shot = await screenshot(url, tmp_path / "status.png")
    finally:
        pulling.cancel()
    print(f"status page screenshot: {shot}")  # the artifact's path, shown with -s

    text = html.unescape(dom)
    assert "<title>mirror status</title>" in dom
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
    assert re.search(r"id=\"cache-limit\">1\.0 GiB<", dom)
    assert "mirror" in text
    assert (await asyncio.to_thread(shot.read_bytes))[:8] == b"\x89PNG\r\n\x1a\n"


def _section(dom: str, element_id: str) -> str:
    """The markup of the element with ``element_id`` (a table or a paragraph)."""
    match = re.search(rf"<(table|p) [^>]*id=\"{element_id}\".*?</\1>", dom, re.S)
    assert match is not None, f"no #{element_id} in the page"
    return match.group(0)
