"""``server.workers: 2`` in a real mirror process in front of real Distribution.

Everything that holds for one process holds for the node: a herd through both workers
costs one upstream download (counted in Distribution's access log); a filling worker
killed with SIGKILL is taken over by the other from the bytes it left and restarted by
the supervisor, and every pull completes with the right digest; /metrics sums the
workers; one worker reconciles and evicts.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors
from tests.support.registry import Registry
from tests.support.throttle import ThrottledProxy

pytestmark = pytest.mark.integration

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
StartMirror = Callable[..., MirrorProcess]


@pytest.fixture
def start_mirror(mirrors: Mirrors) -> StartMirror:
    """Start mirrors with two workers, both serving (the herds below want both); all are
    stopped at the end."""
    return functools.partial(mirrors.start, workers=2, timeout=30)


def _lines(mirror: MirrorProcess, event: str) -> list[dict[str, Any]]:
    found = []
    for line in mirror.log_text().splitlines():
        if f'"event":"{event}"' in line.replace(" ", ""):
            found.append(json.loads(line))
    return found


def _workers(mirror: MirrorProcess) -> list[int]:
    assert mirror.pid is not None
    children = Path(f"/proc/{mirror.pid}/task/{mirror.pid}/children").read_text().split()
    return [int(pid) for pid in children]


async def _pull(url: str, clients: int, *, retries: int = 0) -> list[tuple[str, int]]:
    """``clients`` GETs at once, each on its own connection; a cut transfer is asked again
    (what real clients do) up to ``retries`` times. Returns (digest, attempts) each."""
    async def one() -> tuple[str, int]:
        for attempt in range(retries + 1):
            hasher = hashlib.sha256()
            try:
                async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as s, \
                        s.get(url) as response:
                    assert response.status == 200
                    async for chunk in response.content.iter_chunked(1 << 20):
                        hasher.update(chunk)
                return "sha256:" + hasher.hexdigest(), attempt + 1
            except (aiohttp.ClientError, ConnectionError):
                if attempt == retries:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    return await asyncio.gather(*(one() for _ in range(clients)))


def test_herd_through_two_workers_costs_one_upstream_get(
        registry_anon: Registry, big_image: Image, start_mirror: StartMirror) -> None:
    """20 clients on one cold 64 MiB layer, spread over both workers by the kernel. The
    kernel may hand a whole herd to one worker (one listening socket, shared): then a herd
    on another cold layer, up to three, until both workers answered one."""
    proxy = ThrottledProxy("127.0.0.1", int(registry_anon.host.split(":")[1]), 32 << 20)
    proxy.start()
    try:
        mirror = start_mirror(proxy.url)
        for attempt in range(3):
            image = big_image if attempt == 0 else make_image(
                f"big/herd{attempt}", "v1", layers=[make_layer(32 << 20, seed=7700 + attempt)],
                fmt="docker")
            if attempt:
                registry_anon.push(image)
            layer = image.layers[0]
            mark = registry_anon.clear_log_mark()
            results = asyncio.run(_pull(f"{mirror.url}/v2/{image.repo}/blobs/{layer.digest}",
                                        20))
            assert [digest for digest, _ in results] == [layer.digest] * 20
            assert registry_anon.count("GET", path_contains=f"/blobs/{layer.digest}",
                                       since=mark) == 1
            served = [r for r in _lines(mirror, "request") if r.get("digest") == layer.digest]
            if {r["worker"] for r in served} == {0, 1}:  # both workers answered the herd
                assert any(r.get("source") == "worker" for r in served)  # one followed
                break
        else:
            pytest.fail("the kernel gave each of three herds to one worker")
    finally:
        proxy.stop()


def test_kill9_of_the_filling_worker(registry_anon: Registry, start_mirror: StartMirror,
                                     tmp_path: Path) -> None:
    """The worker that downloads is killed mid-download: the other takes the download over
    from the bytes on disk, its clients never notice, the dead one's clients ask again,
    and the supervisor starts a new worker."""
    image = make_image("big/kill", "v1", layers=[make_layer(48 << 20, seed=4848)],
                       fmt="docker")
    registry_anon.push(image)
    layer = image.layers[0]
    proxy = ThrottledProxy("127.0.0.1", int(registry_anon.host.split(":")[1]), 16 << 20)
    proxy.start()
    try:
        mark = registry_anon.clear_log_mark()
        mirror = start_mirror(proxy.url)
        before = _workers(mirror)
        url = f"{mirror.url}/v2/{image.repo}/blobs/{layer.digest}"
        claim = tmp_path / "cache" / "tmp" / "claims" / f"sha256-{layer.digest[7:]}"

        async def herd_and_kill() -> tuple[list[tuple[str, int]], int]:
            herd = asyncio.ensure_future(_pull(url, 12, retries=3))
            holder = await _claim_holder(claim, before)
            await asyncio.sleep(0.5)  # some MiB are on disk by now
            os.kill(holder, signal.SIGKILL)
            return await herd, holder

        results, killed = asyncio.run(herd_and_kill())
        deadline = time.monotonic() + 20
        while (len(_workers(mirror)) < 2 or killed in _workers(mirror)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proxy.stop()
    assert [digest for digest, _ in results] == [layer.digest] * 12
    assert any(attempts == 1 for _, attempts in results)  # the survivor's clients: no retry
    after = _workers(mirror)
    assert len(after) == 2 and killed not in after  # restarted
    taken = _lines(mirror, "fill_taken_over")
    assert len(taken) == 1 and taken[0]["bytes"] > 0
    gets = registry_anon.requests_since(mark)
    blob_gets = [g for g in gets if g.method == "GET" and layer.digest in g.path]
    assert len(blob_gets) == 2  # the first download, and the rest of it (with Range)
    assert _get(url) == layer.data  # published once, verified


async def _claim_holder(claim: Path, pids: list[int], timeout: float = 20) -> int:
    """The worker holding the flock on ``<claim>.claim`` (from /proc/locks)."""
    lock = claim.with_name(claim.name + ".claim")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            inode = lock.stat().st_ino
        except FileNotFoundError:
            await asyncio.sleep(0.02)
            continue
        for line in (await asyncio.to_thread(Path("/proc/locks").read_text)).splitlines():
            match = re.search(r"FLOCK\s+\S+\s+WRITE\s+(\d+)\s+\S+:(\d+)\s", line)
            if match and int(match.group(2)) == inode and int(match.group(1)) in pids:
                return int(match.group(1))
        await asyncio.sleep(0.02)
    raise AssertionError("no worker claimed the download")


def _get(url: str) -> bytes:
    with _DIRECT.open(url, timeout=30) as response:
        body: bytes = response.read()
        return body


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_sum_workers_and_one_worker_reconciles(
        registry_anon: Registry, start_mirror: StartMirror) -> None:
    mirror = start_mirror(registry_anon.url)
    # (not /readyz: a probe of the start may still be queued at a worker that was starting)
    for _ in range(40):  # a new connection each: the kernel spreads them over both workers
        _get(f"{mirror.url}/v2/")
    text = _get(f"{mirror.url}/metrics").decode()
    assert _metric(text, "mirror_http_requests_total", route="ping") == 40
    served = [r for r in _lines(mirror, "request") if r.get("route") == "ping"]
    assert {r["worker"] for r in served} == {0, 1}
    assert len(_lines(mirror, "mirror_started")) == 2
    assert [line["worker"] for line in _lines(mirror, "cache_reconciled")] == [0]


def test_cold_manifests_through_two_workers_cost_one_upstream_get(
        registry_anon: Registry, start_mirror: StartMirror) -> None:
    """20 clients at once on a cold tag, then on a cold manifest by digest."""
    by_tag = make_image("workers/tag", "v1", layers=[make_layer(1024, seed=11)],
                        fmt="oci")
    by_digest = make_image("workers/digest", "v1", layers=[make_layer(1024, seed=12)],
                           fmt="oci")
    for image in (by_tag, by_digest):
        registry_anon.push(image)
    mark = registry_anon.clear_log_mark()
    mirror = start_mirror(registry_anon.url)
    accept = {"Accept": by_tag.manifest.media_type}

    async def herd(path: str) -> list[bytes]:
        async def one() -> bytes:
            async with aiohttp.ClientSession(trust_env=False) as session, \
                    session.get(f"{mirror.url}{path}", headers=accept) as response:
                assert response.status == 200
                return await response.read()
        return await asyncio.gather(*(one() for _ in range(20)))

    tag_bodies = asyncio.run(herd("/v2/workers/tag/manifests/v1"))
    digest_bodies = asyncio.run(herd(f"/v2/workers/digest/manifests/{by_digest.manifest.digest}"))
    assert set(tag_bodies) == {by_tag.manifest.data}
    assert set(digest_bodies) == {by_digest.manifest.data}
    assert registry_anon.count("GET", path_contains="/workers/tag/manifests/", since=mark) == 1
    assert registry_anon.count("GET", path_contains="/workers/digest/manifests/",
                               since=mark) == 1
    served = [r for r in _lines(mirror, "request") if "/workers/" in r.get("path", "")]
    assert {r["worker"] for r in served} == {0, 1}
