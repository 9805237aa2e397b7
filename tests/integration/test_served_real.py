"""One account per answer, with real parts: the full path and the lean path agree.

``skopeo copy`` pulls an image through the mirror (in front of a Distribution with
Docker-Hub-like Bearer tokens) three times. The later copies ask the same manifest
and config requests again, which the lean path answers from memory ahead of routing;
every answer, whichever path gave it, must have exactly one access line, be counted
once in ``mirror_http_requests_total`` and count its body bytes once, summed over
every worker.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PULLS = 3


@pytest.fixture(scope="module")
def served_image(registry_token: Registry) -> Image:
    """``served/app:v1``: two small layers."""
    layers = [make_layer(size, seed=2400 + i) for i, size in enumerate([40_000, 70_000])]
    image = make_image("served/app", "v1", layers=layers, fmt="oci")
    registry_token.push(image)
    return image


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for process in started:
        process.stop()


def _metric_sum(exposition: str, name: str, **labels: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", re.M)
    total = 0.0
    for found, value in pattern.findall(exposition):
        if all(f'{key}="{want}"' in found for key, want in labels.items()):
            total += float(value)
    return total


@pytest.mark.parametrize("workers", [1, 2])
def test_every_answer_of_either_path_is_accounted_once(
        workers: int, registry_token: Registry, served_image: Image,
        mirrors: list[MirrorProcess], tmp_path: Path) -> None:
    upstream = {"name": UPSTREAM, "url": registry_token.url, "default": True}
    config = mirror_config(free_port(), tmp_path / "cache", [upstream])
    config["server"] = {"workers": workers}
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start()
    mirrors.append(mirror)
    image = served_image
    for n in range(_PULLS):
        out = skopeo_copy(f"127.0.0.1:{mirror.port}/{image.repo}:{image.tag}",
                          tmp_path / f"out-{n}")
        assert manifest_digest(out) == image.manifest.digest
        assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}

    with _DIRECT.open(f"{mirror.url}/metrics", timeout=10) as resp:
        exposition = resp.read().decode()
    lines = [r for r in mirror.events("request") if r.get("route") in ("blob", "manifest")]
    ids = [r["request_id"] for r in lines]
    assert len(ids) == len(set(ids))  # one line per answer
    # Both paths answered: each process numbers its lean answers under a prefix of its own.
    assert len({i[:8] for i in ids}) > len({r.get("worker") for r in lines})
    counted = sum(_metric_sum(exposition, "mirror_http_requests_total", route=route)
                  for route in ("blob", "manifest"))
    assert counted == len(lines)
    for route in ("blob", "manifest"):
        for method in ("GET", "HEAD"):
            logged = [r for r in lines if r["route"] == route and r["method"] == method]
            assert _metric_sum(exposition, "mirror_http_requests_total", route=route,
                               method=method) == len(logged)
    body = {b.digest: b.size for b in image.blobs()}
    delivered = sum(body[r["digest"]] for r in lines
                    if r["route"] == "blob" and r["method"] == "GET" and r["status"] == 200)
    delivered += sum(image.manifest.size for r in lines
                     if r["route"] == "manifest" and r["method"] == "GET"
                     and r["status"] == 200)
    assert _metric_sum(exposition, "mirror_served_bytes_total") == delivered
    assert _metric_sum(exposition, "mirror_registry_served_bytes_total") == delivered
    hits = [r for r in lines if r.get("cache") == "hit"]
    assert _metric_sum(exposition, "mirror_cache_results_total", result="hit") == len(hits)
