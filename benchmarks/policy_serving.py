"""Cached images with the signature policy on vs off, as served (issue 22's >= 0.95x).

Three real mirror processes side by side in front of one real Distribution holding an image
signed per cosign's SIGNATURE_SPEC: one with no ``policy:``, one with a keyed ``enforce``
rule that the image passes, and a third with an ``audit:`` trail too. Each is warmed (the
manifest by tag and by digest once, so the verdict is kept), then ``wrk`` asks them in
interleaved rounds (off, on, on+audit, then the other way round: a drift of the shared
machine's load weighs on all alike), ``--repeat`` rounds, for the manifest by digest and
by tag:

- ``lean path``: the default; kept answers are replayed ahead of routing;
- ``full path``: an admin listener is configured, which turns the lean path off, so every
  answer goes through the pull service and the gate (the path with client auth).

Each row prints requests/s (median of the rounds, +- half their range) for off, on and
on+audit, the range of the per-round on/off ratios, and the median of the per-round
ratios to off (paired: the variants of one round ran next to each other). A second table
gives the gate's own cost per answer without HTTP (``PullService.manifest`` in this
process, policy off and on, the least disturbed of interleaved rounds) and the full-path
ratio it implies: the figure a loaded 2-core machine can resolve. Usage::

    .venv/bin/python -m benchmarks.policy_serving [--duration 2] [--repeat 6] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lean import run_wrk
from mirror import config as mirror_config_module
from mirror import log
from mirror.node import Node
from mirror.pull import Repo
from tests.support import cosign_sign as cs
from tests.support.cosign_push import push_legacy
from tests.support.images import make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
VARIANTS = ("off", "on", "on+audit")


def _config(folder: Path, registry: Registry, variant: str, full: bool) -> dict[str, Any]:
    config = mirror_config(free_port(), folder / "cache",
                           [{"name": "registry.test", "url": registry.url, "default": True}])
    config["log"] = {"format": "json", "level": "warning"}  # no access line on either
    if full:
        config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    if variant != "off":
        config["policy"] = {"keys": [{"name": "release", "file": str(folder.parent / "k.pub")}],
                            "rules": [{"repositories": ["acme/*"], "require": ["release"]}]}
    if variant == "on+audit":
        config["audit"] = {"file": str(folder / "audit.jsonl")}
    return config


@dataclass
class Figures:
    """Requests/s of each variant, one figure per round (the rounds interleaved)."""

    rps: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def median(self, variant: str) -> float:
        return statistics.median(self.rps[variant])

    def spread(self, variant: str) -> float:
        """Half the range of the rounds, as a share of the median (+-%)."""
        values = self.rps[variant]
        return (max(values) - min(values)) / 2 / statistics.median(values) * 100

    def ratios(self, variant: str) -> list[float]:
        """``variant / off`` per round (paired: run next to each other)."""
        return [a / b for a, b in zip(self.rps[variant], self.rps["off"], strict=True)]


def measure(duration: int, repeat: int, connections: int,
            paths: tuple[bool, ...] = (False, True),
            calls: int = 0) -> tuple[list[tuple[str, Figures]], dict[str, tuple[float, float]]]:
    """Requests/s per (path, reference) row and variant, one figure per round; and with
    ``calls``, the pull service's own time per manifest answer, policy off and on."""
    rows: list[tuple[str, Figures]] = []
    costs: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        root = Path(tmp)
        key = cs.new_key()
        (root / "k.pub").write_bytes(cs.public_pem(key))
        registry = Registry(root / "registry")
        registry.start()
        try:
            image = make_image("acme/app", "v1", layers=[make_layer(4096, seed=1)], fmt="oci")
            registry.push(image)
            push_legacy(registry, "acme/app", image.manifest.digest, key)
            for full in paths:
                rows += _path_rows(root, registry, image.manifest.digest, full=full,
                                   duration=duration, repeat=repeat, connections=connections)
            if calls:
                costs = asyncio.run(_call_costs(root, registry, image.manifest.digest,
                                                rounds=max(2 * repeat, 15), calls=calls))
        finally:
            registry.stop()
    return rows, costs


async def _call_costs(root: Path, registry: Registry, digest: str, *, rounds: int,
                      calls: int) -> dict[str, tuple[float, float]]:
    """Microseconds per ``PullService.manifest`` answer of a cached image (verdict kept),
    policy off and on, in this process: the least disturbed of interleaved rounds (the
    minimum: a CPU cost only grows with the machine's load), by digest and by tag."""
    nodes = {}
    for variant in ("off", "on"):
        doc = {"version": 1, "storage": {"path": str(root / f"calls-{variant}")},
               "upstreams": [{"name": "registry.test", "url": registry.url, "default": True}],
               "log": {"level": "error"}}
        if variant == "on":
            doc["policy"] = {"keys": [{"name": "release", "file": str(root / "k.pub")}],
                             "rules": [{"repositories": ["acme/*"], "require": ["release"]}]}
        settings = mirror_config_module.parse(doc, env={})
        log.setup(settings.log)  # the table stays readable
        nodes[variant] = Node(settings)
        await nodes[variant].start()
    repo = Repo("registry.test", "acme/app")
    costs: dict[str, tuple[float, float]] = {}
    try:
        for name, ref in (("by digest", digest), ("by tag", "v1")):
            times: dict[str, list[float]] = {"off": [], "on": []}
            for node in nodes.values():
                for _ in range(100):  # warm: the answer and the verdict are kept
                    await node.pull.manifest(repo, ref)
            for round_ in range(rounds):
                for variant in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    pull = nodes[variant].pull
                    started = time.perf_counter()
                    for _ in range(calls):
                        await pull.manifest(repo, ref)
                    times[variant].append((time.perf_counter() - started) / calls * 1e6)
            costs[name] = (min(times["off"]), min(times["on"]))
    finally:
        for node in nodes.values():
            await node.stop()
    return costs


def _path_rows(root: Path, registry: Registry, digest: str, *, full: bool, duration: int,
               repeat: int, connections: int) -> list[tuple[str, Figures]]:
    path = "full path" if full else "lean path"
    mirrors = {v: MirrorProcess(root / f"{path[:4]}-{v}".replace("+", "-"),
                                _config(root / f"{path[:4]}-{v}".replace("+", "-"), registry,
                                        v, full)) for v in VARIANTS}
    try:
        for mirror in mirrors.values():
            mirror.start(timeout=30)
        refs = {"by digest": digest, "by tag": "v1"}
        for ref in refs.values():  # warm: the verdict is kept, the answer too
            for mirror in mirrors.values():
                run_wrk(f"{mirror.url}/v2/acme/app/manifests/{ref}", method="GET",
                        headers=ACCEPT, connections=connections, duration=1)
        figures = {r: Figures() for r in refs}
        for round_ in range(repeat):
            for ref_name, ref in refs.items():
                # A B C, then C B A: a drift of the machine's load over a round weighs
                # on every variant alike, and each round gives paired ratios.
                order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    url = f"{mirrors[variant].url}/v2/acme/app/manifests/{ref}"
                    result = run_wrk(url, method="GET", headers=ACCEPT,
                                     connections=connections, duration=duration)
                    if result.errors:
                        raise RuntimeError(f"{path} {variant} {ref_name}: {result.errors} "
                                           "errors")
                    figures[ref_name].rps[variant].append(result.rps)
        return [(f"{path}, manifest {r}", figures[r]) for r in refs]
    finally:
        for mirror in mirrors.values():
            mirror.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=6, help="interleaved rounds (median)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--path", choices=("lean", "full", "both"), default="both")
    parser.add_argument("--calls", type=int, default=2000,
                        help="pull-service calls per round for the per-answer cost (0: none)")
    args = parser.parse_args()
    started = time.monotonic()
    paths = {"lean": (False,), "full": (True,), "both": (False, True)}[args.path]
    rows, costs = measure(args.duration, args.repeat, args.connections, paths, args.calls)
    print(f"{'case':<30} {'off req/s':>14} {'on req/s':>14} {'on+audit':>14} "
          f"{'on/off range':>12} {'on/off':>7} {'audit/off':>9}")
    for name, fig in rows:
        cells = [f"{fig.median(v):>7.0f} +-{fig.spread(v):>3.0f}%" for v in VARIANTS]
        on = fig.ratios("on")
        print(f"{name:<30} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} "
              f"{min(on):>5.2f}-{max(on):<6.2f} {statistics.median(on):>7.2f} "
              f"{statistics.median(fig.ratios('on+audit')):>9.2f}")
    print(f"({args.repeat} interleaved rounds of {args.duration}s per variant, medians; +-: "
          f"half the range of the rounds; ratios: median of the per-round ratios; "
          f"{args.connections} connections, one worker each; "
          f"{time.monotonic() - started:.0f}s)")
    if costs:
        _print_costs(costs, dict(rows))


def _print_costs(costs: dict[str, tuple[float, float]], rows: dict[str, Figures]) -> None:
    """The gate's own cost per answer, and the ratio it implies on the full path (where
    every answer asks it): served time / (served time + the gate's)."""
    print()
    print(f"{'pull service, manifest':<24} {'off us':>7} {'on us':>7} {'added us':>9} "
          f"{'full path us/answer':>20} {'implied on/off':>14}")
    for name, (off, on) in costs.items():
        full = rows.get(f"full path, manifest {name}")
        served = 1e6 / full.median("off") if full is not None else float("nan")
        print(f"{name:<24} {off:>7.1f} {on:>7.1f} {on - off:>9.1f} {served:>20.0f} "
              f"{served / (served + on - off):>14.3f}")
    print("(in this process, policy off and on, interleaved rounds, the least disturbed "
          "round's time per call; full path us/answer: 1 / the off median above)")


if __name__ == "__main__":
    main()
