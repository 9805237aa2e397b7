"""Logs and counters that tell the truth, with real parts.

A cold ``skopeo copy`` through the mirror in front of a Distribution with
Docker-Hub-like Bearer tokens: every blob arrives whole (checked by digest),
so no request line may call one cut, and the bytes the mirror says it served
(``/metrics`` and the status page) must be exactly the bytes skopeo received.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mirror.cache.inventory import human_size
from mirror.version import VERSION
from tests.support.chromium import chromium_binary, dump_dom
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))




@pytest.fixture(scope="module")
def layered_image(registry_token: Registry) -> Image:
    """``truth/app:v1``: three incompressible layers, the last one the largest."""
    layers = [make_layer(size, seed=2100 + i)
              for i, size in enumerate([3 << 20, 5 << 20, 9 << 20])]
    image = make_image("truth/app", "v1", layers=layers, fmt="docker")
    registry_token.push(image)
    return image


def _get(url: str) -> str:
    with _DIRECT.open(url, timeout=10) as resp:
        return str(resp.read().decode())


def metric_sum(exposition: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus exposition."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(exposition))


@pytest.mark.parametrize("workers", [1, 2])
def test_cold_pull_through_bearer_upstream_is_whole_in_logs_and_counters(
        workers: int, registry_token: Registry, layered_image: Image,
        mirrors: Mirrors, tmp_path: Path) -> None:
    mirror = mirrors.start(registry_token.url, workers)
    image = layered_image
    out = skopeo_copy(f"127.0.0.1:{mirror.port}/{image.repo}:{image.tag}", tmp_path / "out")
    assert manifest_digest(out) == image.manifest.digest
    assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}
    body_bytes = sum(b.size for b in image.blobs())

    requests = [r for r in mirror.events("request") if r.get("route") in ("blob", "manifest")]
    blob_lines = [r for r in requests if r["route"] == "blob" and r["method"] == "GET"]
    assert len(blob_lines) == len(image.blobs())
    assert [r for r in requests if r.get("cut") or r.get("error")] == []
    assert all(r["status"] == 200 for r in blob_lines)
    manifest_gets = [r for r in requests if r["route"] == "manifest" and r["method"] == "GET"
                     and r["status"] == 200]
    delivered = body_bytes + image.manifest.size * len(manifest_gets)

    exposition = _get(f"{mirror.url}/metrics")
    assert metric_sum(exposition, "mirror_served_bytes_total") == delivered
    assert metric_sum(exposition, "mirror_registry_served_bytes_total") == delivered
    downloaded = metric_sum(exposition, "mirror_upstream_bytes_total")
    if workers == 1:  # the page sums this process's counters (node-wide: the nodewide work)
        page = _get(f"{mirror.url}/")
        assert f"<span id=served-total>{human_size(delivered)}</span>" in page
        saved = human_size(int(max(delivered - downloaded, 0)))
        assert f"<span id=saved-total>{saved}</span>" in page


@pytest.mark.parametrize("workers", [1, 2])
def test_status_page_of_a_real_node_in_chromium(
        workers: int, registry_token: Registry, layered_image: Image,
        mirrors: Mirrors, tmp_path: Path) -> None:
    if chromium_binary() is None:
        pytest.fail("chromium is not installed (scripts/setup.sh --test installs it)")
    mirror = mirrors.start(registry_token.url, workers, storage={"max_size": "1GiB"})
    image = layered_image
    skopeo_copy(f"127.0.0.1:{mirror.port}/{image.repo}:{image.tag}", tmp_path / "out")
    dom = asyncio.run(dump_dom(f"{mirror.url}/"))
    assert f">{VERSION}<" in dom
    assert f"127.0.0.1:{mirror.port}" in dom
    workers_card = re.search(r"id=\"workers\".*?</div>", dom, re.S)
    assert workers_card is not None and f"<span>{workers}" in workers_card.group(0)
    assert re.search(r"id=\"cache-limit\">1\.0 GiB<", dom)
    assert re.search(r"<svg [^>]*id=\"chart-bytes\"", dom)
    assert "href=\"/metrics\"" in dom


@pytest.mark.parametrize("workers", [1, 2])
def test_every_page_lists_the_problems_of_every_worker(
        workers: int, registry_token: Registry, mirrors: Mirrors) -> None:
    mirror = mirrors.start(registry_token.url, workers)
    bad = [f"/v2/truth/app/manifests/bad!{n}" for n in range(8)]
    for path in bad:  # a new connection each: the kernel spreads them over the workers
        try:
            _get(f"{mirror.url}{path}")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
    # Each worker saves its problems within 2 s: then every page load (whichever worker
    # answers it) lists all of them. Wait for 8 loads in a row that do (a state).
    deadline, in_a_row = time.monotonic() + 30, 0
    while in_a_row < 8:
        assert time.monotonic() < deadline, "the pages never showed every worker's problems"
        page = html.unescape(_get(f"{mirror.url}/"))
        in_a_row = in_a_row + 1 if all(p in page for p in bad) else 0
        if not in_a_row:
            time.sleep(0.2)
