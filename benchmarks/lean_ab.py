"""The lean path before and after a change, interleaved: small hot answers per second.

::

    python3 -m benchmarks.lean_ab --baseline-src DIR [--rounds 8] [--duration 2]

One mirror of this tree, one of ``DIR`` (e.g. ``git archive <commit> | tar -x -C DIR``)
and the bare aiohttp handler (:mod:`benchmarks.bare`) run at once in front of a real
Distribution holding one small image. Each is asked once for the image's config blob
(696 B class), its manifest by digest and its manifest by tag (the full path keeps the
answers), then, in every round, ``wrk -t1 -c<connections> -d<duration>s`` GETs each of
them against each target in turn (the order rotates every round). On a shared, noisy
machine the load swings within seconds, so each round's figures are taken side by side
and the tables show the medians of the per-round ratios: requests per second, and
the server process's CPU time (``/proc/<pid>/stat``) per request answered, which the
load of other work on the machine disturbs much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from benchmarks.lean import run_wrk
from benchmarks.targets import BareTarget
from tests.support.images import make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
UPSTREAM = "registry.test"
THIS, BASE, BARE = "mirror", "mirror-base", "bare-aiohttp"


def _get(url: str, headers: dict[str, str]) -> None:
    request = urllib.request.Request(url, headers=headers)
    with _DIRECT.open(request, timeout=30) as resp:
        resp.read()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mirror(work: Path, name: str, upstream: str, source: Path | None) -> MirrorProcess:
    config = mirror_config(free_port(), work / name / "cache",
                           [{"name": UPSTREAM, "url": upstream, "default": True}])
    config["server"] = {"workers": 1}
    return MirrorProcess(work / name, config, source=source)


Figures = dict[str, dict[str, list[float]]]


def measure(baseline: Path, rounds: int, duration: int, connections: int,
            work: Path) -> tuple[Figures, Figures]:
    """Requests/s, and server CPU microseconds per request, per case, target and round."""
    registry = Registry(work / "upstream")
    registry.start()
    image = make_image("lean/app", "v1", layers=[make_layer(4096, seed=2401)], fmt="oci")
    registry.push(image)
    accept = {"Accept": image.manifest.media_type}
    paths = {"config blob": f"/v2/{image.repo}/blobs/{image.config.digest}",
             "manifest by digest": f"/v2/{image.repo}/manifests/{image.manifest.digest}",
             "manifest by tag": f"/v2/{image.repo}/manifests/{image.tag}"}
    mirrors = {THIS: _mirror(work, THIS, registry.url, None),
               BASE: _mirror(work, BASE, registry.url, baseline)}
    bare = BareTarget(work / BARE, registry.url)
    bare.add_blob(image.config.digest, image.config.data)
    bare.add_blob(image.manifest.digest, image.manifest.data, image.manifest.media_type)
    urls: dict[str, Callable[[str], str | None]] = {
        THIS: lambda p: mirrors[THIS].url + p, BASE: lambda p: mirrors[BASE].url + p,
        BARE: lambda p: None if p.endswith(image.tag) else bare.url + p}
    figures: Figures = {c: {t: [] for t in urls} for c in paths}
    cpu: Figures = {c: {t: [] for t in urls} for c in paths}
    pids: dict[str, Callable[[], int | None]] = {
        THIS: lambda: mirrors[THIS].pid, BASE: lambda: mirrors[BASE].pid, BARE: bare.pid}
    try:
        for process in mirrors.values():
            process.start()
        bare.start()
        for url_of in urls.values():
            for path in paths.values():
                url = url_of(path)
                if url is not None:
                    for _ in range(2):  # fetched, then answered from the cache and kept
                        _get(url, accept)
        order = list(urls)
        for n in range(rounds):
            turn = order[n % len(order):] + order[:n % len(order)]
            for case, path in paths.items():
                for target in turn:
                    url = urls[target](path)
                    if url is None:
                        continue
                    pid = pids[target]()
                    assert pid is not None
                    used = _cpu_seconds(pid)
                    result = run_wrk(url, method="GET", headers=accept,
                                     connections=connections, duration=duration)
                    used = _cpu_seconds(pid) - used
                    if result.errors:
                        raise RuntimeError(f"{target} {case}: {result.errors} errors")
                    figures[case][target].append(result.rps)
                    cpu[case][target].append(used / max(result.requests, 1) * 1e6)
            print(f"round {n + 1}/{rounds}: " + ", ".join(
                f"{case} {t}={figures[case][t][-1]:,.0f}"
                for case in paths for t in urls if figures[case][t]), flush=True)
    finally:
        bare.stop()
        for process in mirrors.values():
            process.stop()
        registry.stop()
    return figures, cpu


def _ratio(figures: dict[str, list[float]], a: str, b: str) -> str:
    pairs = [x / y for x, y in zip(figures[a], figures[b], strict=False) if y]
    return f"{statistics.median(pairs):.2f}x" if pairs else "-"


def table(figures: Figures, metric: str) -> str:
    """Medians per target, and the medians of the per-round ratios."""
    lines = [f"| case | {THIS} {metric} | {BASE} {metric} | {BARE} {metric} | {THIS}/{BASE} | "
             f"{THIS}/{BARE} | {BASE}/{BARE} |", "|---|---|---|---|---|---|---|"]
    for case, by_target in figures.items():
        medians = [f"{statistics.median(v):,.1f}" if v else "-" for v in by_target.values()]
        lines.append(f"| {case} | {' | '.join(medians)} | {_ratio(by_target, THIS, BASE)} | "
                     f"{_ratio(by_target, THIS, BARE)} | {_ratio(by_target, BASE, BARE)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lean_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True,
                        help="a source tree holding mirror/ (the 'before')")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if not (args.baseline_src / "mirror" / "__init__.py").is_file():
        parser.error(f"{args.baseline_src} holds no mirror/ package")
    with tempfile.TemporaryDirectory(prefix="lean-ab-") as tmp:
        figures, cpu = measure(args.baseline_src.resolve(), args.rounds, args.duration,
                               args.connections, Path(tmp))
    print(table(figures, "req/s ↑"))
    print()
    print(table(cpu, "server CPU µs/request ↓"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
