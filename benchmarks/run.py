"""One benchmark run: settings from the command line, seeding, scenarios, report."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

from benchmarks.report import chart, rows, table, write_json
from benchmarks.scenarios import Bench, RunSettings, run_all
from benchmarks.seed import MiB, build, make_plan, pulled_bytes, seed
from benchmarks.targets import ALL_TARGETS, BASELINE, BaselineTarget, Upstream

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def settings_from(args: argparse.Namespace) -> RunSettings:
    """Fill the defaults (full or smoke) into the command line's choices."""
    smoke = bool(args.smoke)

    def pick(value: T | None, full: T, tiny: T) -> T:
        return value if value is not None else (tiny if smoke else full)

    baseline = getattr(args, "baseline_src", None)
    default = ALL_TARGETS if baseline else tuple(t for t in ALL_TARGETS if t != BASELINE)
    targets = tuple(args.targets.split(",")) if args.targets else default
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if BASELINE in targets:
        if baseline is None or not (Path(baseline) / "mirror" / "__init__.py").is_file():
            raise SystemExit(f"{BASELINE} needs --baseline-src DIR, a source tree holding "
                             "mirror/ (e.g. `git archive <commit> | tar -x -C DIR`)")
        BaselineTarget.source = Path(baseline).resolve()
    return RunSettings(
        repeat=pick(args.repeat, 3, 1),
        herd_clients=pick(args.herd_clients, 20, 4),
        wan_rate=float(pick(args.wan_rate, 50 * MiB, 4 * MiB)),
        duration=pick(args.duration, 5, 1),
        connections=pick(args.connections, 4, 2),
        only=frozenset(args.only),
        targets=targets,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Seed, run, report; returns the exit code."""
    settings = settings_from(args)
    large = args.large_size if args.large_size is not None else (
        2 * MiB if args.smoke else 1 << 30)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or ROOT / "benchmarks" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    upstream = Upstream(workdir)
    started = time.monotonic()
    try:
        _log(f"generating images (large layer {large / MiB:.0f} MiB) in {workdir}")
        images = build(make_plan(args.smoke, large), workdir / "seed")
        upstream.start()
        seed(upstream.reg, images)
        _log(f"seeded {len(images.pull_set)} images + large: "
             f"{pulled_bytes(images.pull_set) / MiB:.1f} MiB unique in the set, "
             f"seeding took {time.monotonic() - started:.0f}s")
        bench = Bench(settings, upstream, images, workdir / "targets", _log)
        records = run_all(bench)
    finally:
        upstream.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table_rows = rows(records)
    text = table(table_rows)
    meta = {"command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "settings": settings.__dict__ | {"only": sorted(settings.only)},
            "large_size": large, "smoke": bool(args.smoke), "started": stamp,
            "seconds": round(time.monotonic() - started, 1), "cpus": os.cpu_count(),
            "machine": platform.platform(), "hot_blob_size": images.hot_blob.size,
            "small_blob_size": images.small_blob.size,
            "unique_set_bytes": pulled_bytes(images.pull_set)}
    write_json(out / "results.json", records, table_rows, meta)
    (out / "table.md").write_text(text + "\n")
    note = chart(out / "chart.png", table_rows)
    print(text)
    print(f"\nsmall blob: {images.small_blob.size} B (an image config), hot blob: "
          f"{images.hot_blob.size / 1024:,.0f} KiB; {settings.repeat} repeat(s), medians; "
          f"ratios are medians of per-repeat ours/peer.")
    print(f"results: {out / 'results.json'}, {out / 'table.md'}"
          + (f"; {note}" if note else f", {out / 'chart.png'}"))
    _log(f"done in {time.monotonic() - started:.0f}s")
    return 0

