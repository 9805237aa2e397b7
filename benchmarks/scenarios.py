"""The scenarios, each run against every target, side by side in every repeat.

One repeat runs, for each target in turn, on a fresh instance each time:

- ``serve``: cold pull of the set by 1 client, warm pull, hot blobs (raw
  sockets for the big one, wrk for the small one), tag resolution (hey for
  HEAD, wrk for GET); memory is sampled during the hot blobs;
- ``cold4``: cold pull of the set by 4 clients;
- ``herd``: N clients at once on the cold large layer, at loopback speed and
  through a throttle at the WAN rate; memory is sampled during the herd.

Every figure is a :class:`Record`; ``client`` says which client produced it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.lean import curl_herd, run_hey, run_raw, run_wrk
from benchmarks.load import PullClient, PullStats
from benchmarks.measure import RssSampler, UpstreamMeter, percentile
from benchmarks.seed import ImageSet, MiB, pulled_bytes
from benchmarks.targets import (
    BARE,
    BASELINE,
    DISTRIBUTION,
    LOCAL_TARGETS,
    MIRROR,
    MIRROR2,
    NGINX,
    SENDFILE,
    SENDFILE2,
    UPSTREAM,
    BareTarget,
    SendfileTarget,
    Target,
    Upstream,
    make_target,
)
from tests.support.images import Image, Index

SCENARIOS = ("cold", "warm", "herd", "hot", "tags", "memory")
PY, WRK, HEY, RAW, CURL, PROC = ("python", "wrk", "hey", "rawsock", "curl+python", "/proc")
_NEEDS_LOGIN = (NGINX, UPSTREAM)  # they pass the client's Authorization to the upstream

# Which targets each scenario applies to (nginx-sendfile has no upstream).
APPLIES: dict[str, tuple[str, ...]] = {
    "cold": (MIRROR, DISTRIBUTION, NGINX, UPSTREAM, MIRROR2),
    "warm": (MIRROR, DISTRIBUTION, NGINX, UPSTREAM, MIRROR2),
    "herd": (MIRROR, DISTRIBUTION, NGINX, UPSTREAM, MIRROR2),
    "hot": (MIRROR, DISTRIBUTION, NGINX, SENDFILE, UPSTREAM, MIRROR2, SENDFILE2, BARE,
            BASELINE),
    "tags": (MIRROR, DISTRIBUTION, NGINX, UPSTREAM, MIRROR2, BASELINE),
    "memory": (MIRROR, DISTRIBUTION, NGINX, SENDFILE, UPSTREAM, MIRROR2, SENDFILE2, BARE),
}


@dataclass(frozen=True)
class RunSettings:
    """How big and how long (from the command line)."""

    repeat: int
    herd_clients: int
    wan_rate: float
    duration: int
    connections: int
    only: frozenset[str]
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Record:
    """One figure set: a scenario case on one target in one repeat."""

    scenario: str
    case: str
    target: str
    repeat: int
    client: str
    metrics: dict[str, float]


@dataclass
class Bench:
    """Everything a scenario needs, and the records collected so far."""

    settings: RunSettings
    upstream: Upstream
    images: ImageSet
    workdir: Path
    log: Callable[[str], None]
    records: list[Record] = field(default_factory=list)
    _serial: int = 0

    def wants(self, scenario: str) -> bool:
        """Whether ``--only`` selects ``scenario``."""
        return not self.settings.only or scenario in self.settings.only

    def add(self, scenario: str, case: str, target: str, repeat: int, client: str,
            **metrics: float) -> None:
        """Keep one record and log it."""
        self.records.append(Record(scenario, case, target, repeat, client, metrics))
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.log(f"  {scenario:5} {case:14} {target:15} {shown}")

    @contextmanager
    def fresh(self, name: str, upstream_url: str | None = None) -> Iterator[Target]:
        """A started target with an empty cache, stopped and deleted afterwards."""
        self._serial += 1
        workdir = self.workdir / f"{self._serial:03d}-{name}"
        target = make_target(name, workdir, upstream_url or self.upstream.reg.url,
                             self.upstream)
        if isinstance(target, SendfileTarget | BareTarget):
            for blob in (self.images.hot_blob, self.images.small_blob):
                target.add_blob(blob.digest, blob.data)
            image = self.images.pull_set[0]
            assert isinstance(image, Image)
            target.add_blob(image.manifest.digest, image.manifest.data,
                            image.manifest.media_type)
        target.start()
        try:
            yield target
        except BaseException:
            target.stop()
            self.log(f"failed on {name}: its logs are kept in {workdir}")
            raise
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def auth(self, target: Target, repo: str) -> dict[str, str]:
        """Authorization for lean clients (wrk, curl) where the target passes it on."""
        return self.upstream.bearer(repo) if target.name in _NEEDS_LOGIN else {}


# --- pulls with the verifying client --------------------------------------


async def _pull_all(url: str, items: list[Image | Index], clients: int) -> list[PullStats]:
    async def one(index: int) -> PullStats:
        shift = index * len(items) // clients  # each client starts elsewhere in the set
        async with PullClient(url) as client:
            for item in items[shift:] + items[:shift]:
                await client.pull(item.repo, item.tag, item.manifest.digest)
            return client.stats

    return list(await asyncio.gather(*(one(i) for i in range(clients))))


def pull_set(bench: Bench, target: Target, clients: int,
             items: list[Image | Index] | None = None) -> dict[str, float]:
    """Pull ``items`` (default: the whole set) with ``clients`` verifying clients."""
    items = items or bench.images.pull_set
    with UpstreamMeter(bench.upstream.reg) as meter:
        started = time.perf_counter()
        stats = asyncio.run(_pull_all(target.url, items, clients))
        wall = time.perf_counter() - started
    got = sum(s.bytes for s in stats)
    up = meter.traffic
    return {"wall_s": wall, "mib_s": got / MiB / wall, "client_mib": got / MiB,
            "upstream_ratio": up.bytes / pulled_bytes(items), "upstream_requests": up.requests,
            "upstream_blob_requests": up.blob_requests,
            "upstream_manifest_requests": up.manifest_requests}


# --- lean clients ------------------------------------------------------------


def _hot_blob(bench: Bench, target: Target, repeat: int) -> None:
    repo, s = bench.images.hot_repo, bench.settings
    hot, small = bench.images.hot_blob, bench.images.small_blob
    for case, blob in ((f"{_size(hot.size)} blob", hot), (f"{_size(small.size)} blob", small)):
        url = f"{target.url}/v2/{repo}/blobs/{blob.digest}"
        # Big bodies: wrk's 8 KiB reads saturate first; raw sockets do not.
        big = blob.size >= MiB
        with RssSampler(target.pid()) as rss, UpstreamMeter(bench.upstream.reg) as meter:
            if big:
                result = run_raw(url, headers=bench.auth(target, repo),
                                 connections=s.connections, duration=s.duration)
            else:
                result = run_wrk(url, method="GET", headers=bench.auth(target, repo),
                                 connections=s.connections, duration=s.duration)
        if bench.wants("hot"):
            bench.add("hot", case, target.name, repeat, RAW if big else WRK, rps=result.rps,
                      mib_s=result.rps * blob.size / MiB, errors=result.errors,
                      upstream_requests=meter.traffic.requests)
        if bench.wants("memory"):
            bench.add("memory", f"hot {case}", target.name, repeat, PROC,
                      peak_rss_mib=rss.peak_mib, hwm_mib=rss.hwm_mib,
                      process_rss_mib=rss.process_max_mib)
    if bench.wants("hot"):
        _hot_manifest(bench, target, repeat)


def _hot_manifest(bench: Bench, target: Target, repeat: int) -> None:
    """A cached manifest by digest, with a client's Accept header, by wrk."""
    image = bench.images.pull_set[0]
    assert isinstance(image, Image)
    url = f"{target.url}/v2/{image.repo}/manifests/{image.manifest.digest}"
    headers = {"Accept": image.manifest.media_type, **bench.auth(target, image.repo)}
    with UpstreamMeter(bench.upstream.reg) as meter:
        result = run_wrk(url, method="GET", headers=headers,
                         connections=bench.settings.connections,
                         duration=bench.settings.duration)
    bench.add("hot", "manifest by digest", target.name, repeat, WRK, rps=result.rps,
              mib_s=result.rps * image.manifest.size / MiB, errors=result.errors,
              upstream_requests=meter.traffic.requests)


def _size(size: int) -> str:
    if size >= MiB:
        return f"{size / MiB:.0f}MiB"
    return f"{size / 1024:.0f}KiB" if size >= 1024 else f"{size}B"


def _tags(bench: Bench, target: Target, repeat: int) -> None:
    item = bench.images.pull_set[0]
    url = f"{target.url}/v2/{item.repo}/manifests/{item.tag}"
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                         "application/vnd.docker.distribution.manifest.v2+json",
               **bench.auth(target, item.repo)}
    for method, tool, client in (("HEAD", run_hey, HEY), ("GET", run_wrk, WRK)):
        with UpstreamMeter(bench.upstream.reg) as meter:
            result = tool(url, method=method, headers=headers,
                          connections=bench.settings.connections,
                          duration=bench.settings.duration)
        bench.add("tags", f"{method} by tag", target.name, repeat, client, rps=result.rps,
                  upstream_requests=meter.traffic.requests, errors=result.errors)


def serve_cycle(bench: Bench, name: str, repeat: int) -> None:
    """Cold pull (1 client), warm pull, hot blobs and tags on one fresh target."""
    with bench.fresh(name) as target:
        if name not in LOCAL_TARGETS:
            items = None if bench.wants("cold") or bench.wants("warm") else [
                bench.images.pull_set[0]]
            figures = pull_set(bench, target, 1, items)
            if bench.wants("cold"):
                bench.add("cold", "1 client", name, repeat, PY, **figures)
            if bench.wants("warm"):
                figures = pull_set(bench, target, 1)
                bench.add("warm", "1 client", name, repeat, PY, wall_s=figures["wall_s"],
                          mib_s=figures["mib_s"],
                          upstream_requests=figures["upstream_requests"],
                          upstream_blob_requests=figures["upstream_blob_requests"])
        if bench.wants("hot") or bench.wants("memory"):
            _hot_blob(bench, target, repeat)
        if name not in LOCAL_TARGETS and bench.wants("tags"):
            _tags(bench, target, repeat)


def cold4_cycle(bench: Bench, name: str, repeat: int) -> None:
    """Cold pull of the set by 4 clients at once on a fresh target."""
    with bench.fresh(name) as target:
        bench.add("cold", "4 clients", name, repeat, PY, **pull_set(bench, target, 4))


@contextmanager
def throttle(bench: Bench, rate: float) -> Iterator[str]:
    """A rate-limiting proxy to the upstream in its own process; yields its URL."""
    reg = bench.upstream.reg
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.throttled", "127.0.0.1", str(reg.port), str(rate)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _verified_blob(client: PullClient, repo: str, digest: str) -> bool:
    """Whether the blob arrived whole; wrong bytes raise VerifyError."""
    try:
        await client.blob(repo, digest)
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"  verifying client: {exc!r}", file=sys.stderr)
        return False
    return True


async def _herd(bench: Bench, target: Target, clients: int) -> tuple[list[float], float, int]:
    large = bench.images.large
    layer = large.layers[0]
    async with PullClient(target.url) as verifier:
        # The verifier resolves the tag and reads the config like any client;
        # the herd is on the layer, which N-1 curl transfers and the verifier
        # request at the same moment.
        await verifier.manifest(large.repo, large.tag, large.manifest.digest)
        await verifier.blob(large.repo, large.config.digest)
        verifier.stats.ttfb.clear()
        url = f"{target.url}/v2/{large.repo}/blobs/{layer.digest}"
        started = time.perf_counter()
        herd = asyncio.to_thread(curl_herd, url, clients - 1, bench.auth(target, large.repo))
        transfers, whole = await asyncio.gather(
            herd, _verified_blob(verifier, large.repo, layer.digest))
        wall = time.perf_counter() - started
    bad = [t for t in transfers if t.exit_code or t.status != 200 or t.size != layer.size]
    for transfer in bad[:3]:
        bench.log(f"  herd on {target.name}: failed transfer {transfer}")
    ttfb = [t.ttfb for t in transfers if t.status == 200] + verifier.stats.ttfb
    return ttfb, wall, len(bad) + (not whole)


def herd_cycle(bench: Bench, name: str, repeat: int, rate: float | None) -> None:
    """N clients on the cold large layer of a fresh target, direct or throttled."""
    clients = bench.settings.herd_clients
    case = f"{clients} clients " + ("WAN" if rate else "loopback")
    with (_maybe_throttle(bench, rate) as upstream_url, bench.fresh(name, upstream_url) as target,
          RssSampler(target.pid()) as rss, UpstreamMeter(bench.upstream.reg) as meter):
        ttfb, wall, failed = asyncio.run(_herd(bench, target, clients))
    unique = pulled_bytes([bench.images.large])
    if bench.wants("herd"):
        bench.add("herd", case, name, repeat, CURL, wall_s=wall,
                  ttfb_p50_s=percentile(ttfb, 0.5), ttfb_p99_s=percentile(ttfb, 0.99),
                  upstream_ratio=meter.traffic.bytes / unique,
                  upstream_blob_requests=meter.traffic.blob_requests, failed_transfers=failed)
    if bench.wants("memory"):
        bench.add("memory", case, name, repeat, PROC, peak_rss_mib=rss.peak_mib,
                  process_rss_mib=rss.process_max_mib,
                  hwm_mib=rss.hwm_mib)


@contextmanager
def _maybe_throttle(bench: Bench, rate: float | None) -> Iterator[str | None]:
    if rate is None:
        yield None
        return
    with throttle(bench, rate) as url:
        yield url


def run_all(bench: Bench) -> list[Record]:
    """Run every selected scenario ``repeat`` times, targets side by side."""
    s = bench.settings
    for repeat in range(s.repeat):
        bench.log(f"repeat {repeat + 1}/{s.repeat}")
        if any(bench.wants(x) for x in ("cold", "warm", "hot", "tags", "memory")):
            for name in s.targets:
                if name not in LOCAL_TARGETS or bench.wants("hot") or bench.wants("memory"):
                    serve_cycle(bench, name, repeat)
        if bench.wants("cold"):
            for name in _applies(s, "cold"):
                cold4_cycle(bench, name, repeat)
        if bench.wants("herd") or bench.wants("memory"):
            for rate in (None, s.wan_rate):
                for name in _applies(s, "herd"):
                    herd_cycle(bench, name, repeat, rate)
    return bench.records


def _applies(settings: RunSettings, scenario: str) -> list[str]:
    return [t for t in settings.targets if t in APPLIES[scenario]]


def as_json(records: list[Record]) -> list[dict[str, Any]]:
    """Records as plain dicts."""
    return [r.__dict__ for r in records]

