"""The rollout: a new tag upstream, then N clients pull it at once; sync on and off.

::

    python3 -m benchmarks.rollout                  # 20 clients, 3 x 32 MiB layers, WAN 50MiB/s
    python3 -m benchmarks.rollout --ttfb-only --bandwidth 10MiB --bandwidth 20MiB --ttfb-seconds 10
    python3 -m benchmarks.rollout --ttfb --bandwidth 20MiB --repeat 2   # what README shows
    python3 -m benchmarks.rollout --smoke          # tiny sizes, seconds (CI)

A real Distribution upstream behind the WAN-like throttle (``benchmarks/throttled.py``,
per connection) holds ``bench/rollout:prod``, an index of linux/amd64 and linux/arm64.
For each mode, a fresh mirror (tag TTL 2 s, so clients see a moved tag soon in both
modes) serves one pull of the old digest (steady state), then the tag moves upstream
to new layers and:

- ``off``: the clients pull once the tag TTL has passed: the first ones start the
  upstream downloads, the rest join them.
- ``on``: the mirror's sync loop watches the tag (``interval: 1s``, ``recheck: 0s``,
  linux/amd64, no bandwidth cap): the rollout starts once ``/admin/sync`` reports
  the new digest held (that wait is reported as the lag), as a deployment starts
  some time after CI pushed.

Then every client pulls again (everything cached): the warm pull the rollout is
compared to. Figures: rollout wall time, its ratio to the warm pull, TTFB p99, and
upstream blob requests and bytes during the rollout (from Distribution's access log).

``--ttfb`` adds the second measurement: one client fetching a cached 1 MiB blob in a
loop, its time to first byte while ``POST /admin/warm`` fetches a large image through
the throttle, and idle (before the warm, and as long again after it, so that both
saw the same stretch of a shared machine): p99 of each and the ratio, for no cap and
for each ``--bandwidth``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.__main__ import parse_size
from benchmarks.load import PullClient
from benchmarks.measure import UpstreamMeter, percentile
from tests.support.images import Image, Index, make_image, make_index, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

REPO, TAG = "bench/rollout", "prod"
UPSTREAM = "registry.bench"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Figures:
    """One mode's results."""

    mode: str
    rollout_s: float
    warm_s: float
    ttfb_p99_s: float
    upstream_blob_requests: int
    upstream_bytes: int
    lag_s: float | None

    @property
    def ratio(self) -> float:
        return self.rollout_s / self.warm_s if self.warm_s else float("nan")


def _median(runs: list[Figures]) -> Figures:
    """The median of each figure over repeated runs of one mode."""
    def mid(values: list[float]) -> float:
        return statistics.median(values)

    lags = [r.lag_s for r in runs if r.lag_s is not None]
    return Figures(runs[0].mode, mid([r.rollout_s for r in runs]), mid([r.warm_s for r in runs]),
                   mid([r.ttfb_p99_s for r in runs]),
                   int(max(r.upstream_blob_requests for r in runs)),
                   int(mid([r.upstream_bytes for r in runs])), mid(lags) if lags else None)


def _index(seed: int, layers: int, size: int) -> Index:
    images = [make_image(REPO, TAG, fmt="oci", arch=arch,
                         layers=[make_layer(size, seed * 100 + k * 10 + i)
                                 for i in range(layers)])
              for k, arch in enumerate(["amd64", "arm64"])]
    return make_index(REPO, TAG, images, "oci")


@contextmanager
def _throttle(registry: Registry, rate: float) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.throttled", "127.0.0.1", str(registry.port),
         str(rate)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _mirror(workdir: Path, upstream_url: str, sync: bool,
            bandwidth: int | None = None) -> MirrorProcess:
    config = mirror_config(free_port(), workdir / "cache",
                           [{"name": UPSTREAM, "url": upstream_url, "default": True}])
    config["cache"] = {"tag_ttl": "2s"}
    config["log"] = {"format": "json", "level": "warning"}
    if sync:
        config["sync"] = {"recheck": "0s", "rules": [{
            "name": "rollout", "registry": UPSTREAM, "repositories": [REPO], "tags": [TAG],
            "platforms": ["linux/amd64"], "interval": "1s"}]}
        config["sync"]["bandwidth"] = bandwidth or 0  # 0: no cap
    return MirrorProcess(workdir, config)


def _held(mirror: MirrorProcess, digest: str) -> bool:
    with _DIRECT.open(f"{mirror.url}/admin/sync", timeout=5) as resp:
        status = json.loads(resp.read())
    return any(r.get("held") == digest for r in status.get("records") or [])


async def _pull_all(url: str, clients: int, digest: str) -> tuple[float, list[float]]:
    """Every client pulls linux/amd64 at once; wall time and every TTFB."""
    pullers = [PullClient(url) for _ in range(clients)]
    started = time.perf_counter()
    for client in pullers:
        await client.__aenter__()
    try:
        await asyncio.gather(*(c.pull(REPO, TAG, digest) for c in pullers))
    finally:
        for client in pullers:
            await client.__aexit__()
    return time.perf_counter() - started, [t for c in pullers for t in c.stats.ttfb]


def run_mode(mode: str, registry: Registry, upstream_url: str, workdir: Path,
             args: argparse.Namespace, *, seed: int) -> Figures:
    """One mode: steady state, the tag moves, the rollout, the warm pull."""
    old = _index(seed, args.layers, args.layer_size)
    registry.push(old)
    mirror = _mirror(workdir / mode, upstream_url, sync=mode == "on")
    mirror.start(timeout=30)
    try:
        asyncio.run(_pull_all(mirror.url, 1, old.manifest.digest))
        new = _index(seed + 1, args.layers, args.layer_size)
        registry.push(new)
        moved = time.monotonic()
        lag = None
        if mode == "on":
            deadline = moved + 600
            while not _held(mirror, new.manifest.digest):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sync loop did not warm the new tag in 10 min")
                time.sleep(0.1)
            lag = time.monotonic() - moved
        time.sleep(max(0.0, moved + 2.5 - time.monotonic()))  # past the tag TTL
        with UpstreamMeter(registry) as meter:
            wall, ttfb = asyncio.run(_pull_all(mirror.url, args.clients, new.manifest.digest))
        warm, _ = asyncio.run(_pull_all(mirror.url, args.clients, new.manifest.digest))
    finally:
        mirror.stop()
    return Figures(mode, wall, warm, percentile(ttfb, 0.99), meter.traffic.blob_requests,
                   meter.traffic.bytes, lag)


async def _ttfb_loop(url: str, digest: str, seconds: float) -> list[float]:
    found: list[float] = []
    async with aiohttp.ClientSession(trust_env=False) as session:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.get(f"{url}/v2/{REPO}-ttfb/blobs/{digest}") as resp:
                await resp.content.readany()
                found.append(time.perf_counter() - started)
                await resp.read()
    return found


def run_ttfb(registry: Registry, upstream_url: str, workdir: Path,
             args: argparse.Namespace, bandwidth: int | None) -> tuple[float, float]:
    """TTFB p99 of a cached blob: idle, then during a warm of a large image (a fresh
    mirror each time, so the large image is cold)."""
    small = make_image(f"{REPO}-ttfb", "small", fmt="oci", layers=[make_layer(1 << 20, 9901)])
    pieces = max(1, args.warm_size // (64 << 20))  # random layers of at most 64 MiB each
    large = make_image(f"{REPO}-ttfb", "large", fmt="oci",
                       layers=[make_layer(args.warm_size // pieces, 9902 + i)
                               for i in range(pieces)])
    registry.push(small)
    registry.push(large)
    mirror = _mirror(workdir / f"ttfb-{bandwidth or 0}", upstream_url, sync=True,
                     bandwidth=bandwidth)
    mirror.start(timeout=30)
    try:
        asyncio.run(_pull_all_ref(mirror.url, small))
        digest = small.layers[0].digest
        idle = asyncio.run(_ttfb_loop(mirror.url, digest, args.ttfb_seconds))
        # curl, not `mirror warm`: no second Python process competing for the 2 cores.
        body = json.dumps({"refs": [f"{UPSTREAM}/{REPO}-ttfb:large"]})
        token = (workdir / f"ttfb-{bandwidth or 0}" / "cache" / "admin.token").read_text()
        warm = subprocess.Popen(["curl", "-sS", "--noproxy", "*", "-X", "POST", "-d", body,
                                 "-H", f"Authorization: Bearer {token.strip()}",
                                 f"{mirror.url}/admin/warm"], stdout=subprocess.PIPE)
        started = time.monotonic()
        busy: list[float] = []
        while not busy or warm.poll() is None:  # for as long as the warm runs
            busy += asyncio.run(_ttfb_loop(mirror.url, digest, 0.5))
        seconds = time.monotonic() - started
        out, _ = warm.communicate()
        if b'"failed": []' not in out:
            raise RuntimeError(f"the warm of the large image failed: {out[-300:]!r}")
        # As long again idle, so both figures saw the same stretch of a shared machine.
        idle += asyncio.run(_ttfb_loop(mirror.url, digest, min(seconds, 60.0)))
    finally:
        mirror.stop()
    return percentile(idle, 0.99), percentile(busy, 0.99)


async def _pull_all_ref(url: str, image: Image) -> None:
    async with PullClient(url) as client:
        await client.pull(image.repo, image.tag, image.manifest.digest)


def _table(figures: list[Figures], ttfb: dict[str, tuple[float, float]],
           args: argparse.Namespace) -> str:
    rows: list[str] = []
    if figures:
        rows += [f"rollout: {args.clients} clients pull {REPO}:{TAG} (linux/amd64, "
                 f"{args.layers} layers of {args.layer_size / 2**20:g} MiB) right after the "
                 f"tag moved; upstream throttled to {args.wan_rate / 2**20:g} MiB/s per "
                 "connection", "",
                 "| sync | rollout wall s | warm pull wall s | rollout / warm | TTFB p99 s "
                 "| upstream blob requests | upstream MiB | lag tag moved -> held s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        lag = f"{f.lag_s:.2f}" if f.lag_s is not None else "-"
        rows.append(f"| {f.mode} | {f.rollout_s:.2f} | {f.warm_s:.2f} | {f.ratio:.2f}x | "
                    f"{f.ttfb_p99_s:.3f} | {f.upstream_blob_requests} | "
                    f"{f.upstream_bytes / 2**20:.1f} | {lag} |")
    if ttfb:
        rows += [f"client TTFB p99 of a cached 1 MiB blob, idle and during a warm of a "
                 f"{args.warm_size / 2**20:g} MiB image:", "",
                 "| sync.bandwidth | idle ms | during the warm ms | ratio |",
                 "| --- | --- | --- | --- |"]
        for cap, (idle, busy) in ttfb.items():
            rows.append(f"| {cap} | {idle * 1000:.2f} | {busy * 1000:.2f} | "
                        f"{busy / idle:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run both modes side by side and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--layer-size", type=parse_size, default=32 << 20)
    parser.add_argument("--wan-rate", type=parse_size, default=50 << 20)
    parser.add_argument("--ttfb", action="store_true", help="also measure client TTFB "
                        "during a warm of a large image")
    parser.add_argument("--warm-size", type=parse_size, default=512 << 20)
    parser.add_argument("--ttfb-seconds", type=float, default=5.0,
                        help="how long idle TTFB is sampled")
    parser.add_argument("--bandwidth", type=parse_size, action="append", default=[],
                        help="with --ttfb: measure again with this sync.bandwidth (repeatable)")
    parser.add_argument("--ttfb-only", action="store_true", help="only the TTFB measurement")
    parser.add_argument("--repeat", type=int, default=1, help="runs of both modes (medians)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", type=Path, help="write the table and figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.layers, args.layer_size = 3, 2, 256 << 10
        args.wan_rate, args.warm_size, args.ttfb_seconds = 4 << 20, 2 << 20, 0.5
    workdir = Path(tempfile.mkdtemp(prefix="rollout-"))
    registry = Registry(workdir / "upstream")
    registry.start()
    try:
        with _throttle(registry, args.wan_rate) as upstream_url:
            runs = [[run_mode(mode, registry, upstream_url, workdir / str(r), args,
                              seed=80 + 10 * n + 100 * r)
                     for n, mode in enumerate(("off", "on"))]
                    for r in range(0 if args.ttfb_only else args.repeat)]
            figures = [_median([run[n] for run in runs]) for n in range(2)] if runs else []
            if figures:
                print(_table(figures, {}, args) + "\n", flush=True)
            ttfb: dict[str, tuple[float, float]] = {}
            for cap in [None, *args.bandwidth] if args.ttfb or args.ttfb_only else []:
                label = f"{cap / 2**20:g} MiB/s" if cap else "none"
                ttfb[label] = run_ttfb(registry, upstream_url, workdir, args, cap)
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    table = _table(figures, ttfb, args).replace("|\nclient TTFB", "|\n\nclient TTFB")
    if ttfb:
        print(table[table.index("client TTFB"):])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rollout.md").write_text(table + "\n")
        document: dict[str, Any] = {
            "figures": [f.__dict__ for f in figures], "repeat": args.repeat,
            "ttfb_p99_s": {cap: {"idle": idle, "warming": busy}
                           for cap, (idle, busy) in ttfb.items()}}
        (args.out / "rollout.json").write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
