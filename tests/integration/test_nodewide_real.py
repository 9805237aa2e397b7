"""One node, however many worker processes: its cap, its counts and its figures.

Real mirror processes with ``server.workers`` 1 and 2 in front of real Distribution:

- the cap is the node's: two skopeo clients pull cold images (one with a layer larger
  than the cap) at once; bytes on disk, sampled all along, never pass 1.1x the cap;
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, verify_dir, write_registries_conf

pytestmark = pytest.mark.integration

MiB = 1 << 20
UPSTREAM = "registry.test"
TOKEN = "nodewide-admin-token"
StartMirror = Callable[..., MirrorProcess]


@pytest.fixture
def start_mirror(tmp_path: Path) -> Iterator[StartMirror]:
    """Start mirrors (``workers`` processes, an admin token); all stopped at the end."""
    started: list[MirrorProcess] = []

    def start(registry_url: str, workers: int, **extra: Any) -> MirrorProcess:
        token = tmp_path / "admin-token"
        token.write_text(TOKEN)
        config = mirror_config(free_port(), tmp_path / "cache",
                               [{"name": UPSTREAM, "url": registry_url, "default": True}])
        config["server"] = {"workers": workers}
        config["admin"] = {"token_file": str(token)}
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        process = MirrorProcess(tmp_path / f"mirror-{len(started)}", config)
        process.start(timeout=60)
        started.append(process)
        deadline = time.monotonic() + 60
        while len(process.events("mirror_started")) < workers:  # every worker serves
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.05)
        return process

    yield start
    for process in started:
        process.stop()


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
