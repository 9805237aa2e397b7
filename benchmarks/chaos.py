"""The chaos run: a two-worker mirror under load while its parts fail, one after another.

::

    python3 -m benchmarks.chaos --minutes 10          # what benchmarks/README.md shows
    python3 -m benchmarks.chaos --minutes 2           # a short run
    python3 -m benchmarks.chaos --seconds 60 --small  # the test suite's version (48 MiB cap)

A real Distribution upstream, moto's S3 server as the shared tier, and the mirror with
``server.workers: 2`` and a cap (300 MiB; ``--small``: 48 MiB). ``--clients`` clients
(16) pull in a loop, each pull a fresh verifying client (:class:`PullClient`): an image
picked at random from a set about twice the cap, so that pulls are a mix of cached and
cold (eviction makes them cold again). A pull that fails is tried once more; it counts
as failed only if that fails too. A wrong digest is a mismatch whatever the retry does.

Two phases with the same clients, side by side in one run: **calm** (no fault, a third
of the time, at least 20 s) and **chaos**, where every ``--fault-every`` seconds (6)
one of these happens, in turn:

- ``kill9``: SIGKILL to a worker (the supervisor starts it again);
- ``upstream``: Distribution stopped (SIGSTOP) for 5 s;
- ``s3``: the S3 server stopped for 10 s;
- ``fill``: an image of about 90 % of the cap warmed and pinned (``POST /admin/warm``,
  ``sync.protect: 15s``): the cache is full of pinned content until the pins expire;
- ``sighup``: SIGHUP to the supervisor (reload).

Figures per phase: pulls done and failed (after one retry), digest mismatches, pulls
per second, peak bytes on disk against the cap (sampled every 10 ms), upstream bytes
against the unique bytes pulled, and per worker resident memory and open files at the
phase's start and end. Ratios: chaos against calm. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.__main__ import parse_size
from benchmarks.load import PullClient, VerifyError
from benchmarks.measure import UpstreamMeter
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.s3 import MotoS3, s3_config

MiB = 1 << 20
UPSTREAM = "registry.chaos"
TOKEN = "chaos-admin-token"
FAULTS = ("kill9", "upstream", "s3", "fill", "sighup")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    seconds: float = 0.0
    done: int = 0
    retried: int = 0
    failed: int = 0
    mismatches: int = 0
    peak_disk: int = 0
    peak_parts: dict[str, int] = field(default_factory=dict)  # the peak, by folder
    upstream_bytes: int = 0
    unique_bytes: int = 0
    faults: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    workers_start: dict[str, dict[str, int]] = field(default_factory=dict)
    workers_end: dict[str, dict[str, int]] = field(default_factory=dict)
    pulled: set[str] = field(default_factory=set)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "pulled"}


@dataclass
class Setup:
    """The parts of a run."""

    registry: Registry
    s3: MotoS3
    mirror: MirrorProcess
    images: list[Image]
    pin: Image
    cap: int


def _images(cap: int, small: bool) -> tuple[list[Image], Image]:
    """A set of about twice the cap (two layers each, a shared base), and the pin image."""
    layer = 2 * MiB if small else 8 * MiB
    count = max(8, int(2 * cap / layer))
    base = make_layer(layer // 2, seed=80_000)
    images = [make_image(f"chaos/img{n}", "v1", fmt="docker" if n % 2 else "oci",
                         layers=[base, make_layer(layer, seed=80_001 + n)])
              for n in range(count)]
    pin = make_image("chaos/pinned", "v1", fmt="docker",
                     layers=[make_layer(int(cap * 0.3), seed=81_000 + n) for n in range(3)])
    return images, pin


def _start(workdir: Path, cap: int, small: bool) -> Setup:
    registry = Registry(workdir / "registry")
    registry.start()
    images, pin = _images(cap, small)
    for image in [*images, pin]:
        registry.push(image)
    s3 = MotoS3(workdir / "moto")
    s3.start()
    bucket = s3.new_bucket("chaos")
    token = workdir / "admin-token"
    token.write_text(TOKEN)
    config = mirror_config(free_port(), workdir / "cache",
                           [{"name": UPSTREAM, "url": registry.url, "default": True}])
    config["server"] = {"workers": 2}
    config["storage"].update(max_size=cap, s3=s3_config(s3, bucket, workdir / "s3",
                                                        redirect=False))
    config["admin"] = {"token_file": str(token)}
    config["sync"] = {"protect": "15s"}
    config["log"] = {"format": "json", "level": "warning"}
    mirror = MirrorProcess(workdir / "mirror", config)
    mirror.start(timeout=60)
    return Setup(registry, s3, mirror, images, pin, cap)


def _stop(setup: Setup) -> None:
    for part in (setup.mirror, setup.s3, setup.registry):
        try:
            part.stop()
        except Exception as exc:  # stop the others whatever happens
            print(f"stop failed: {exc}", file=sys.stderr)


# --- what is watched ---------------------------------------------------------------------

def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children (the workers)."""
    try:
        return [int(p) for p in
                Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    except OSError:
        return []


def process_figures(pid: int) -> dict[str, int]:
    """Resident memory (KiB) and open files of a process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return {}
    return {"rss_kib": rss, "fds": fds}


def workers_figures(mirror: MirrorProcess) -> dict[str, dict[str, int]]:
    """Memory and files of every worker, by pid."""
    assert mirror.pid is not None
    return {str(pid): process_figures(pid) for pid in worker_pids(mirror.pid)}


def disk_bytes(root: Path) -> int:
    """Bytes of the files under the cache's content and temp folders."""
    return sum(disk_parts(root).values())


def disk_parts(root: Path) -> dict[str, int]:
    """Bytes of the files under the cache's content and temp folders, by folder
    (``blobs``, ``manifests``, and each folder of ``tmp``)."""
    parts: dict[str, int] = {}
    for sub in ("blobs", "manifests", "tmp"):
        folder = root / sub
        for path in folder.rglob("*") if folder.exists() else ():
            try:
                if path.is_file():
                    name = sub if sub != "tmp" else f"tmp/{path.relative_to(folder).parts[0]}"
                    parts[name] = parts.get(name, 0) + path.stat().st_size
            except (OSError, IndexError):
                continue
    return parts


class DiskSampler:
    """The peak of :func:`disk_bytes` while running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self.peak_parts: dict[str, int] = {}  # what the disk held at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = disk_parts(self.root)
            if sum(parts.values()) > self.peak:
                self.peak, self.peak_parts = sum(parts.values()), parts
            time.sleep(0.01)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the clients -------------------------------------------------------------------------

async def _pull_once(url: str, image: Image) -> None:
    async with PullClient(url) as client:
        await asyncio.wait_for(client.pull(image.repo, "v1", image.manifest.digest), 120)


async def _client(url: str, images: list[Image], phase: Phase, deadline: float,
                  rng: random.Random) -> None:
    while time.monotonic() < deadline:
        image = rng.choice(images)
        for attempt in (1, 2):
            try:
                await _pull_once(url, image)
            except VerifyError as exc:
                phase.mismatches += "content is" in str(exc)
                error: BaseException = exc
            except Exception as exc:  # counted (TimeoutError included)
                error = exc
            else:
                phase.done += 1
                phase.pulled.add(image.repo)
                break
            if attempt == 1:
                phase.retried += 1
                await asyncio.sleep(0.5)
            else:
                phase.failed += 1
                phase.errors.append(f"{image.repo}: {type(error).__name__}: {error}"[:300])


# --- the faults --------------------------------------------------------------------------

def _signal(pid: int | None, signum: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _warm(mirror: MirrorProcess, ref: str) -> None:
    request = urllib.request.Request(
        f"{mirror.url}/admin/warm", data=json.dumps({"refs": [ref]}).encode(), method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=120) as response:
        response.read()


async def _fault(name: str, setup: Setup) -> None:
    mirror = setup.mirror
    if name == "kill9":
        pids = worker_pids(mirror.pid or 0)
        if pids:
            _signal(random.choice(pids), signal.SIGKILL)
    elif name in ("upstream", "s3"):
        pid = setup.registry.pid if name == "upstream" else setup.s3.pid
        _signal(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5 if name == "upstream" else 10)
        finally:
            _signal(pid, signal.SIGCONT)
    elif name == "fill":
        await asyncio.to_thread(_warm, mirror, f"{UPSTREAM}/{setup.pin.repo}:v1")
    elif name == "sighup":
        _signal(mirror.pid, signal.SIGHUP)


async def _faults(setup: Setup, phase: Phase, every: float, deadline: float) -> None:
    """One fault every ``every`` seconds, in turn; a long one (a stop, a warm) overlaps
    the next rather than delaying it."""
    async def one(name: str) -> None:
        try:
            await _fault(name, setup)
        except Exception as exc:  # a fault that fails is reported, not fatal
            phase.errors.append(f"fault {name}: {type(exc).__name__}: {exc}"[:300])

    running = []
    turn = 0
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        name = FAULTS[turn % len(FAULTS)]
        turn += 1
        phase.faults.append(name)
        running.append(asyncio.ensure_future(one(name)))
    await asyncio.gather(*running)


# --- a phase -----------------------------------------------------------------------------

def run_phase(setup: Setup, name: str, *, seconds: float, clients: int, every: float,
              seed: int) -> Phase:
    """Run the clients for ``seconds`` (with faults when ``every`` > 0) and measure."""
    phase = Phase(name)
    storage = Path(setup.mirror.config["storage"]["path"])
    phase.workers_start = workers_figures(setup.mirror)
    started = time.monotonic()
    deadline = started + seconds

    async def run() -> None:
        rngs = [random.Random(seed * 1000 + n) for n in range(clients)]
        work = [_client(setup.mirror.url, setup.images, phase, deadline, rng) for rng in rngs]
        if every > 0:
            work.append(_faults(setup, phase, every, deadline))
        await asyncio.gather(*work)

    with DiskSampler(storage) as disk, UpstreamMeter(setup.registry) as meter:
        asyncio.run(run())
        time.sleep(1.0)  # the upstream's log settles; workers finish their last writes
    phase.seconds = time.monotonic() - started
    phase.peak_disk = disk.peak
    phase.peak_parts = disk.peak_parts
    phase.upstream_bytes = meter.traffic.bytes
    by_repo = {image.repo: image for image in [*setup.images, setup.pin]}
    blobs = {b.digest: b.size for repo in phase.pulled for b in by_repo[repo].blobs()}
    if "fill" in phase.faults:
        blobs.update({b.digest: b.size for b in setup.pin.blobs()})
    phase.unique_bytes = sum(blobs.values())
    phase.workers_end = workers_figures(setup.mirror)
    return phase


# --- the report --------------------------------------------------------------------------

def _rows(calm: Phase, chaos: Phase, cap: int) -> list[tuple[str, float, float]]:
    def rss(figures: dict[str, dict[str, int]]) -> float:
        return max((f.get("rss_kib", 0) for f in figures.values()), default=0) / 1024

    def fds(figures: dict[str, dict[str, int]]) -> float:
        return max((f.get("fds", 0) for f in figures.values()), default=0)

    def rate(phase: Phase) -> float:
        return phase.done / phase.seconds if phase.seconds else 0.0

    def amplification(phase: Phase) -> float:
        return phase.upstream_bytes / phase.unique_bytes if phase.unique_bytes else 0.0

    return [
        ("pulls done", calm.done, chaos.done),
        ("pulls per second", rate(calm), rate(chaos)),
        ("pulls retried once", calm.retried, chaos.retried),
        ("pulls failed after one retry", calm.failed, chaos.failed),
        ("digest mismatches", calm.mismatches, chaos.mismatches),
        ("peak disk / cap", calm.peak_disk / cap, chaos.peak_disk / cap),
        ("upstream / unique bytes", amplification(calm), amplification(chaos)),
        ("worker RSS at start, max MiB", rss(calm.workers_start), rss(chaos.workers_start)),
        ("worker RSS at end, max MiB", rss(calm.workers_end), rss(chaos.workers_end)),
        ("worker open files at start, max", fds(calm.workers_start), fds(chaos.workers_start)),
        ("worker open files at end, max", fds(calm.workers_end), fds(chaos.workers_end)),
    ]


def report(calm: Phase, chaos: Phase, cap: int) -> str:
    """The table: each figure calm and under chaos, and their ratio."""
    lines = [f"| figure | calm ({calm.seconds:.0f} s) | chaos ({chaos.seconds:.0f} s) | "
             "chaos / calm |", "|---|---:|---:|---:|"]
    for label, before, after in _rows(calm, chaos, cap):
        ratio = f"{after / before:.2f}" if before else "-"
        lines.append(f"| {label} | {before:.4g} | {after:.4g} | {ratio} |")
    lines.append(f"\nfaults: {', '.join(chaos.faults) or 'none'}; cap {cap / MiB:.0f} MiB")
    for phase in (calm, chaos):
        where = ", ".join(f"{name} {size / MiB:.0f}" for name, size in
                          sorted(phase.peak_parts.items(), key=lambda item: -item[1]))
        lines.append(f"{phase.name} peak disk, MiB: {where or '-'}")
    for phase in (calm, chaos):
        for error in phase.errors[:10]:
            lines.append(f"{phase.name} error: {error}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="length of the chaos phase")
    length.add_argument("--seconds", type=float, help="length of the chaos phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cap", type=parse_size, default=None,
                        help="storage.max_size (default 300MiB; --small: 48MiB)")
    parser.add_argument("--fault-every", type=float, default=6.0, help="seconds between faults")
    parser.add_argument("--small", action="store_true", help="small images and cap (tests)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--workdir", type=Path, help="keep the servers' data and logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run calm then chaos and print the table; 1 if a pull failed or bytes were wrong."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 2)
    cap = args.cap or (48 * MiB if args.small else 300 * MiB)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mirror-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup = _start(workdir, cap, args.small)
    try:
        calm = run_phase(setup, "calm", seconds=max(20.0, seconds / 3), clients=args.clients,
                         every=0, seed=1)
        chaos = run_phase(setup, "chaos", seconds=seconds, clients=args.clients,
                          every=args.fault_every, seed=2)
    finally:
        _stop(setup)
    print(report(calm, chaos, cap))
    if args.json is not None:
        args.json.write_text(json.dumps({"cap": cap, "calm": calm.as_json(),
                                         "chaos": chaos.as_json()}, indent=2))
    if args.workdir is None:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    bad = chaos.failed or chaos.mismatches or calm.failed or calm.mismatches
    return 1 if bad or chaos.peak_disk > 1.1 * cap else 0


if __name__ == "__main__":
    sys.exit(main())
