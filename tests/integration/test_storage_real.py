"""The bounded, crash-safe cache with the mirror as a real process in front of Distribution.

- kill -9 in the middle of a herd download, then a restart: partial files are
  gone, the index agrees with the disk, every client gets the right bytes and
  upstream is asked once.
- a run that pulls three times ``storage.max_size``: bytes on disk, sampled
  all along, stay within the limit plus the blobs being downloaded. The figure
  (peak bytes on disk against the limit) is printed for the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.throttle import ThrottledProxy

pytestmark = pytest.mark.integration

MiB = 1 << 20
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _config(port: int, storage: Path, url: str, **storage_options: Any) -> dict[str, Any]:
    config = mirror_config(port, storage, [{"name": "registry.test", "url": url,
                                            "default": True}])
    config["storage"].update(storage_options)
    return config


@pytest.fixture
def processes() -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for process in started:
        process.stop()


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) \
        if folder.exists() else 0


def _disk_bytes(root: Path) -> int:
    total = 0
    for sub in ("blobs", "manifests", "tmp"):
        try:
            total += _files_bytes(root / sub)
        except FileNotFoundError:  # a file went away while we walked
            continue
    return total


async def _herd(url: str, clients: int, tolerate: bool = False) -> list[str]:
    async def one(session: aiohttp.ClientSession) -> str:
        hasher = hashlib.sha256()
        try:
            async with session.get(url) as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(1 << 20):
                    hasher.update(chunk)
        except (aiohttp.ClientError, ConnectionError):
            if tolerate:
                return "broken"
            raise
        return "sha256:" + hasher.hexdigest()

    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as session:
        return await asyncio.gather(*(one(session) for _ in range(clients)))


def test_kill9_during_herd_download_then_restart_serves_correctly(
        registry_anon: Registry, big_image: Image, processes: list[MirrorProcess],
        tmp_path: Path) -> None:
    storage = tmp_path / "cache"
    layer = big_image.layers[0]
    proxy = ThrottledProxy("127.0.0.1", int(registry_anon.host.split(":")[1]), 16 * MiB)
    proxy.start()
    try:
        first = MirrorProcess(tmp_path / "first", _config(free_port(), storage, proxy.url))
        first.start()
        processes.append(first)
        url = f"{first.url}/v2/{big_image.repo}/blobs/{layer.digest}"
        outcome: list[list[str]] = []
        herd = threading.Thread(target=lambda: outcome.append(
            asyncio.run(_herd(url, 10, tolerate=True))))
        herd.start()
        deadline = time.monotonic() + 30
        while _files_bytes(storage / "tmp") < 16 * MiB:
            assert time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
        first.kill9()
        herd.join(timeout=30)
    finally:
        proxy.stop()
    assert outcome and "broken" in outcome[0]  # the crash cut the clients off
    assert _files_bytes(storage / "tmp") > 0  # and left a partial file behind
    assert not any((storage / "blobs").rglob(layer.digest.split(":")[1]))

    mark = registry_anon.clear_log_mark()
    second = MirrorProcess(tmp_path / "second", _config(free_port(), storage, registry_anon.url))
    second.start()
    processes.append(second)
    started = next(json.loads(line) for line in second.log_text().splitlines()
                   if '"mirror_started"' in line)
    assert started["stale_temp_removed"] >= 1
    url = f"{second.url}/v2/{big_image.repo}/blobs/{layer.digest}"
    assert asyncio.run(_herd(url, 10)) == [layer.digest] * 10
    assert registry_anon.count("GET", path_contains=f"/blobs/{layer.digest}", since=mark) == 1
    second.stop()

    third = MirrorProcess(tmp_path / "third", _config(free_port(), storage, registry_anon.url))
    third.start()
    processes.append(third)
    mark = registry_anon.clear_log_mark()
    url = f"{third.url}/v2/{big_image.repo}/blobs/{layer.digest}"
    assert asyncio.run(_herd(url, 3)) == [layer.digest] * 3
    assert registry_anon.count("GET", path_contains="/blobs/", since=mark) == 0
    deadline = time.monotonic() + 10
    while '"cache_reconciled"' not in third.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reconciled = next(json.loads(line) for line in third.log_text().splitlines()
                      if '"cache_reconciled"' in line)
    assert reconciled["cache_entries"] == 1 and reconciled["adopted"] == 0


def _pull(base: str, image: Image) -> None:
    accept = {"Accept": image.manifest.media_type}
    request = urllib.request.Request(f"{base}/v2/{image.repo}/manifests/{image.tag}",
                                     headers=accept)
    with _DIRECT.open(request, timeout=60) as response:
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
    for blob in image.blobs():
        with _DIRECT.open(f"{base}/v2/{image.repo}/blobs/{blob.digest}", timeout=60) as response:
            assert "sha256:" + hashlib.sha256(response.read()).hexdigest() == blob.digest


def test_pulling_three_times_max_size_stays_within_it(
        registry_anon: Registry, processes: list[MirrorProcess], tmp_path: Path) -> None:
    limit, layer_size, images, parallel = 24 * MiB, 4 * MiB, 18, 3
    pushed = [make_image(f"evict/img{i}", "v1", layers=[make_layer(layer_size, seed=9000 + i)],
                         fmt="docker") for i in range(images)]
    for image in pushed:
        registry_anon.push(image)
    total = sum(b.size for image in pushed for b in image.blobs())
    assert total >= 3 * limit
    storage = tmp_path / "cache"
    mirror = MirrorProcess(tmp_path / "mirror", _config(
        free_port(), storage, registry_anon.url, max_size=limit, high_watermark=0.9,
        low_watermark=0.7))
    mirror.start()
    processes.append(mirror)

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _disk_bytes(storage))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for start in range(0, images, parallel):
            batch = pushed[start:start + parallel]
            threads = [threading.Thread(target=_pull, args=(mirror.url, image))
                       for image in batch]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
    finally:
        stop.set()
        sampler.join()
    final = _disk_bytes(storage)
    print(f"\neviction accuracy: pulled {total / MiB:.1f} MiB through a {limit / MiB:.0f} MiB "
          f"cache; peak on disk {peak[0] / MiB:.2f} MiB ({100 * peak[0] / limit:.1f}% of the "
          f"limit, downloads included); at the end {final / MiB:.2f} MiB")
    assert peak[0] <= limit + parallel * (layer_size + MiB)
    assert final <= limit
    with _DIRECT.open(f"{mirror.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    evictions = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("mirror_cache_evictions_total{"))
    assert evictions > 0
    # Everything still pulls correctly after all that eviction.
    _pull(mirror.url, pushed[0])


def _cache_cli(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mirror", "cache", *args, "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pins_made_while_serving_hold_through_eviction_and_restarts(
        registry_anon: Registry, processes: list[MirrorProcess], tmp_path: Path) -> None:
    limit, layer_size = 12 * MiB, 3 * MiB
    pinned, *others = [
        make_image(f"pins/img{i}", "v1", layers=[make_layer(layer_size, seed=7000 + i)],
                   fmt="docker") for i in range(9)]
    for image in (pinned, *others):
        registry_anon.push(image)
    storage = tmp_path / "cache"
    config = _config(free_port(), storage, registry_anon.url, max_size=limit)
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start()
    processes.append(mirror)
    _pull(mirror.url, pinned)
    out = _cache_cli(mirror.config_path, "pin", f"registry.test/{pinned.repo}:v1")
    assert out.startswith(f"pinned registry.test/{pinned.repo}:v1: 3 item(s)")
    mark = registry_anon.clear_log_mark()
    for image in others:  # 24 MiB through a 12 MiB cache
        _pull(mirror.url, image)
    _pull(mirror.url, pinned)
    assert registry_anon.count("GET", path_contains=f"/{pinned.repo}/", since=mark) == 0
    mirror.stop()

    again = MirrorProcess(tmp_path / "again", config)
    again.start()
    processes.append(again)
    listing = _cache_cli(again.config_path, "ls")
    assert f"registry.test/{pinned.repo}:v1" in listing
    assert all(line.endswith("pinned") for line in listing.splitlines()
               if any(blob.digest in line for blob in pinned.blobs()))
    pinned_bytes = sum(b.size for b in pinned.blobs()) + pinned.manifest.size
    assert f"pinned:      {pinned_bytes / MiB:.1f} MiB" in _cache_cli(again.config_path, "du")
