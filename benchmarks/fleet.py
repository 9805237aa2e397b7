"""Regional fleet benchmark: one large layer served by six nodes, fleet against independents.

::

    python3 -m benchmarks.fleet                  # 1 GiB layer, upstream at 50 MiB/s
    python3 -m benchmarks.fleet --size 64MiB     # quicker
    python3 -m benchmarks.fleet --smoke          # 8 MiB, a few seconds

Side by side in one run, against one real Distribution behind a throttled
connection (per connection, like a WAN link):

- ``one node``: a single mirror's cold pull of the layer (the baseline);
- ``fleet``: two regions of three nodes (127.0.0.2-4 and 127.0.0.5-7, one port),
  the second region's parent being the first; one client per node at once;
- ``independent``: six mirrors that know nothing of each other, one client each.

Figures: wall time until every node's client has the whole verified layer, the
ratio to one node's cold pull, and upstream bytes per unique byte (from the
upstream's access log).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.onelayer import (
    add_layer_options,
    layer_bytes_sent,
    throttled_upstream,
    work_folder,
)
from benchmarks.seed import _upload_file, write_layer
from tests.support.images import make_image
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port

MiB = 1 << 20
SECRET = "benchmark-fleet-secret"
EAST = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
WEST = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]


def _node(work: Path, address: str, port: int, upstream: str,
          cluster: dict[str, Any] | None) -> MirrorProcess:
    config = mirror_config(port, work / f"cache-{address}-{port}", [
        {"name": "registry.test", "url": upstream, "default": True}])
    config["listen"] = f"{address}:{port}"
    config["log"] = {"format": "json", "level": "warning"}
    if cluster is not None:
        config["cluster"] = {"self_url": f"http://{address}:{port}",
                             "secret_file": str(work / "secret"), **cluster}
    return MirrorProcess(work / f"node-{address}-{port}", config)


def _start(nodes: list[MirrorProcess]) -> list[MirrorProcess]:
    for node in nodes:
        node.start(timeout=30)
    return nodes


def fleet_nodes(work: Path, upstream: str) -> list[MirrorProcess]:
    port = free_port()
    urls = [f"http://{a}:{port}" for a in EAST]
    east = [_node(work, a, port, upstream, {"region": "east", "node_id": f"east-{a}",
                                             "peers": urls}) for a in EAST]
    west_urls = [f"http://{a}:{port}" for a in WEST]
    west = [_node(work, a, port, upstream, {"region": "west", "node_id": f"west-{a}",
                                             "peers": west_urls, "parents": [urls[0]]})
            for a in WEST]
    return _start([*east, *west])


def one_node(work: Path, upstream: str) -> list[MirrorProcess]:
    return _start([_node(work, EAST[0], free_port(), upstream, None)])


def independent_nodes(work: Path, upstream: str) -> list[MirrorProcess]:
    port = free_port()
    return _start([_node(work, a, port, upstream, None) for a in [*EAST, *WEST]])


async def _get(session: aiohttp.ClientSession, url: str, digest: str) -> None:
    hasher = hashlib.sha256()
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
        async for chunk in resp.content.iter_chunked(MiB):
            hasher.update(chunk)
    if "sha256:" + hasher.hexdigest() != digest:
        raise RuntimeError(f"{url}: wrong bytes")


async def pull_everywhere(nodes: list[MirrorProcess], repo: str, digest: str) -> float:
    """Seconds until every node's client has the verified layer."""
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                     auto_decompress=False) as session:
        started = time.perf_counter()
        await asyncio.gather(*(_get(session, f"{n.url}/v2/{repo}/blobs/{digest}", digest)
                               for n in nodes))
        return time.perf_counter() - started


def run(size: int, rate: float, work: Path) -> list[tuple[str, float, float, float]]:
    (work / "secret").write_text(SECRET)
    rows = []
    with throttled_upstream(work, rate) as (registry, proxy):
        with (work / "layer.tar.gz").open("wb") as out:
            layer = write_layer(size, 77, out)
        image = make_image("bench/fleet", "v1", layers=[layer], fmt="docker")
        _upload_file(registry, image.repo, layer, work / "layer.tar.gz")
        registry.push(image)
        baseline = 0.0
        cases: list[tuple[str, Callable[[Path, str], list[MirrorProcess]]]] = [
            ("one node", one_node), ("fleet", fleet_nodes), ("independent", independent_nodes)]
        for name, make in cases:
            nodes = make(work, proxy.url)
            try:
                mark = registry.clear_log_mark()
                seconds = asyncio.run(pull_everywhere(nodes, image.repo, layer.digest))
                fetched = layer_bytes_sent(registry, mark, layer.digest)
            finally:
                for node in nodes:
                    node.stop()
            baseline = baseline or seconds
            rows.append((name, seconds, seconds / baseline, fetched / layer.size))
            print(f"fleet: {name}: {seconds:.2f} s", file=sys.stderr)
    return rows


def table(rows: list[tuple[str, float, float, float]], size: int, rate: float) -> str:
    lines = [f"layer {size / MiB:.0f} MiB, upstream {rate / MiB:.0f} MiB/s per connection, "
             "six nodes", "",
             "| case | nodes | time to all s | x one node's cold pull | upstream/unique bytes |",
             "| --- | --- | --- | --- | --- |"]
    for name, seconds, ratio, per_unique in rows:
        nodes = 1 if name == "one node" else 6
        lines.append(f"| {name} | {nodes} | {seconds:.2f} | {ratio:.2f}x | {per_unique:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.fleet")
    add_layer_options(parser, "1GiB", smoke=8 * MiB)
    args = parser.parse_args(argv)
    size = 8 * MiB if args.smoke else args.size
    with work_folder(args.workdir, "fleet-bench-") as work:
        rows = run(size, args.rate, work)
    print(table(rows, size, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
