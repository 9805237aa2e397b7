"""One node, however many worker processes: its cap, its counts and its figures.

Real mirror processes with ``server.workers`` 1 and 2 in front of real Distribution:

- the cap is the node's: two skopeo clients pull cold images (one with a layer larger
  than the cap) at once; bytes on disk, sampled all along, never pass 1.1x the cap;
- popularity counts pulls, not requests: 300 ``HEAD``s and 300 ``GET``s from one
  client weigh less than three clients' pulls; a ``HEAD`` then a ``GET`` by digest (how
  containerd pulls) counts once;
- figures and decisions are the node's: ``/admin/popular``, the status page's hit
  ratio and most-pulled list, and the sync loop's dry-run plan give the same answer
  whichever worker answers (many new connections reach both).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, verify_dir, write_registries_conf

pytestmark = pytest.mark.integration

MiB = 1 << 20
UPSTREAM = "registry.test"
TOKEN = "nodewide-admin-token"
StartMirror = Callable[..., MirrorProcess]


@pytest.fixture
def start_mirror(mirrors: Mirrors, tmp_path: Path) -> StartMirror:
    """Start mirrors (``workers`` processes, every one serving, an admin token); all
    stopped at the end."""
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    return functools.partial(mirrors.start, timeout=60, admin={"token_file": str(token)})


def _disk_bytes(root: Path) -> int:
    """Bytes of every file under the cache's content and temp folders."""
    total = 0
    for sub in ("blobs", "manifests", "tmp"):
        for path in (root / sub).rglob("*") if (root / sub).exists() else ():
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:  # went away while we walked
                continue
    return total


# --- 20.2: the cap is the node's -----------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_cap_holds_for_the_node_with_workers(registry_anon: Registry, start_mirror: StartMirror,
                                             tmp_path: Path, workers: int) -> None:
    cap = 32 * MiB
    seed = 61_000 + 1000 * workers
    clients: list[list[Image]] = [[], []]
    for client in (0, 1):
        for n in range(6):
            clients[client].append(make_image(
                f"nodewide/cap{workers}-{client}-{n}", "v1", fmt="docker",
                layers=[make_layer(3 * MiB, seed + 100 * client + 2 * n),
                        make_layer(3 * MiB, seed + 100 * client + 2 * n + 1)]))
    clients[0].insert(2, make_image(f"nodewide/cap{workers}-huge", "v1", fmt="docker",
                                    layers=[make_layer(40 * MiB, seed + 999)]))
    for images in clients:
        for image in images:
            registry_anon.push(image)
    pulled = sum(b.size for images in clients for image in images for b in image.blobs())
    assert pulled > 3 * cap
    mirror = start_mirror(registry_anon.url, workers,
                          storage={"max_size": cap, "high_watermark": 0.95,
                                   "low_watermark": 0.8})
    storage = Path(mirror.config["storage"]["path"])
    conf = write_registries_conf(tmp_path / "registries.conf", UPSTREAM,
                                 mirror.url.removeprefix("http://"))

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _disk_bytes(storage))
            time.sleep(0.005)

    def pull_all(client: int) -> None:
        for image in clients[client]:
            out = tmp_path / f"out-{client}-{image.repo.replace('/', '_')}"
            skopeo_copy(f"{UPSTREAM}/{image.repo}:v1", out, registries_conf=conf)
            verify_dir(out)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(pull_all, 0), pool.submit(pull_all, 1)]:
                done.result(timeout=300)
    finally:
        stop.set()
        sampler.join()
    served = {r.get("worker") for r in mirror.events("request")}
    print(f"\nnode-wide cap, {workers} worker(s): pulled {pulled / MiB:.0f} MiB through a "
          f"{cap / MiB:.0f} MiB cap; peak on disk {peak[0] / MiB:.1f} MiB "
          f"({peak[0] / cap:.2f}x the cap); workers that answered: {sorted(map(str, served))}")
    assert peak[0] <= 1.1 * cap, mirror.log_tail()
    assert _disk_bytes(storage) <= cap


# --- 19.3: pulls, not requests -------------------------------------------------------------

async def _manifest(url: str, *, method: str = "GET", source: str = "127.0.0.1",
                    fresh: bool = True) -> tuple[int, str]:
    """One manifest request from ``source`` on a new connection; (status, digest)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=fresh)
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session, \
            session.request(method, url, headers={"Accept": accept}) as response:
        await response.read()
        return response.status, response.headers.get("Docker-Content-Digest", "")


async def _flood(url: str, method: str, count: int) -> None:
    """``count`` requests from one client on one kept-alive connection."""
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0), limit=1)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        for _ in range(count):
            async with session.request(method, url, headers={"Accept": accept}) as response:
                assert response.status == 200
                await response.read()


def _admin(mirror: MirrorProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    """An admin answer on a new connection (so that any worker may answer)."""
    async def ask() -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(trust_env=False,
                                         connector=aiohttp.TCPConnector(force_close=True)) as s:
            method = "POST" if body is not None else "GET"
            async with s.request(method, f"{mirror.url}{path}", headers=headers,
                                 json=body) as response:
                assert response.status == 200, await response.text()
                if response.content_type == "application/json":
                    return await response.json()
                return await response.text()
    return asyncio.run(ask())


def _scores(mirror: MirrorProcess) -> dict[str, float]:
    top = _admin(mirror, "/admin/popular?top=50")["top"]
    return {f"{t['repository']}:{t['tag']}": float(t["score"]) for t in top}


def _until(check: Callable[[], bool], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.3)


@pytest.mark.parametrize("workers", [1, 2])
def test_popularity_counts_pulls_not_requests(registry_anon: Registry,
                                              start_mirror: StartMirror, workers: int) -> None:
    repo = f"nodewide/pop{workers}"
    for n, tag in enumerate(["x", "y", "z", "w"]):
        registry_anon.push(make_image(repo, tag, fmt="docker",
                                      layers=[make_layer(2000 + n, 64_000 + 10 * workers + n)]))
    mirror = start_mirror(registry_anon.url, workers)
    base = f"{mirror.url}/v2/{repo}/manifests"

    async def traffic() -> None:
        await _flood(f"{base}/x", "HEAD", 300)  # revalidations, one client: not pulls
        await _flood(f"{base}/z", "GET", 300)  # one client pulling again and again: once
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):  # three clients pull y
            assert (await _manifest(f"{base}/y", source=source))[0] == 200
        # containerd's way: HEAD the tag, then GET the digest it answered (on its kept
        # connection): one pull of w
        accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0), limit=1)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            async with session.head(f"{base}/w", headers=accept) as response:
                digest = response.headers.get("Docker-Content-Digest", "")
                assert response.status == 200 and digest
            for _ in range(2):
                async with session.get(f"{base}/{digest}", headers=accept) as response:
                    assert response.status == 200
                    await response.read()

    asyncio.run(traffic())
    y, z, w = f"{repo}:y", f"{repo}:z", f"{repo}:w"

    def counted() -> bool:  # by whichever worker answers (each reads the others' counts)
        return all(_scores(mirror).get(y, 0) > 2.9 and _scores(mirror).get(w, 0) > 0.9
                   for _ in range(6))

    _until(counted, "three pulls of y and one of w counted by every worker")
    scores = _scores(mirror)
    assert scores.get(f"{repo}:x", 0) == 0, scores  # HEADs are not pulls
    assert scores[y] > scores.get(z, 0), scores  # three clients outrank one client's flood
    assert scores.get(z, 0) <= workers, scores  # once per client (per worker process)
    assert 0.9 < scores[w] <= workers, scores
    ranked = [key for key in scores if key.startswith(repo)]
    assert ranked[0] == y, scores


# --- 20.6: the node's figures, whichever worker answers ------------------------------------

def _hit_ratio(page: str) -> str:
    found = re.search(rf"data-registry='{re.escape(UPSTREAM)}'>.*?hit-ratio'>([^<]*)<", page)
    assert found is not None, page[:2000]
    return found.group(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_worker_gives_the_nodes_figures_and_plan(
        registry_anon: Registry, start_mirror: StartMirror, workers: int) -> None:
    repo = f"nodewide/fig{workers}"
    image = make_image(repo, "v1", fmt="docker",
                       layers=[make_layer(50_000, 65_000 + workers)])
    registry_anon.push(image)
    mirror = start_mirror(registry_anon.url, workers,
                          sync={"popular": {"top": 5, "interval": "1h"}})
    url = f"{mirror.url}/v2/{repo}/manifests/v1"

    async def pulls() -> None:  # six clients, each on new connections: both workers answer
        for n in range(6):
            assert (await _manifest(url, source=f"127.0.0.{10 + n}"))[0] == 200

    asyncio.run(pulls())
    answered = {r.get("worker") for r in mirror.events("request")
                if r.get("path", "").endswith("/manifests/v1")}
    key = f"{repo}:v1"

    def agreed() -> bool:  # ten answers in a row, from whichever worker, count six pulls
        return all(abs(_scores(mirror).get(key, 0) - 6) < 0.1 for _ in range(10))

    _until(agreed, f"every worker counts the six pulls (answered by workers {answered})")
    pages = [_admin(mirror, "/") for _ in range(10)]
    ratios = {_hit_ratio(page) for page in pages}
    assert len(ratios) == 1, ratios  # the node's hit ratio, not a worker's
    assert ratios != {"n/a"}
    assert all(key in page for page in pages)  # the most-pulled list is the node's
    for _ in range(6):  # the sync loop's plan (mirror sync --once --dry-run) is the node's
        report = _admin(mirror, "/admin/sync", {"dry_run": True})
        refs = [r["ref"] for r in report["results"]]
        assert f"{UPSTREAM}/{key}" in refs, json.dumps(report)
