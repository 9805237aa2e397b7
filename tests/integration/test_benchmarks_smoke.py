"""The benchmarks' smoke mode, so that they never rot.

It runs ``python -m benchmarks --smoke`` as a subprocess (the same code as a
full run, tiny sizes) and checks that every scenario produced figures for
every target it applies to and that no client accepted wrong bytes (the
verifying client raises on any digest mismatch, failing the run). It never
checks timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import SHOWN
from benchmarks.scenarios import APPLIES, SCENARIOS
from benchmarks.targets import BASELINE
from tests.conftest import require_binary

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_smoke_run_has_figures_for_every_scenario_and_target(tmp_path: Path) -> None:
    for binary in ("docker-registry", "nginx", "wrk", "hey", "curl"):
        require_binary(binary)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-setup", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=580, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    doc = json.loads((out / "results.json").read_text())
    records = doc["records"]
    for scenario in SCENARIOS:
        for target in APPLIES[scenario]:
            if target == BASELINE:  # runs only with --baseline-src
                continue
            mine = [r for r in records if r["scenario"] == scenario and r["target"] == target]
            assert mine, f"no figures for {scenario} on {target}"
            for record in mine:
                for metric in SHOWN[scenario]:
                    value = record["metrics"].get(metric)
                    assert value is not None and not math.isnan(value), (scenario, target,
                                                                         metric, record)
    # No herd transfer through the mirror was cut (a cut one got no wrong bytes, but
    # a client that must retry is a failure of the mirror).
    for record in records:
        if record["scenario"] == "herd" and record["target"] in ("mirror", "mirror-2w"):
            assert record["metrics"].get("failed_transfers", 0) == 0, record
    # The verifying client read every byte of the set (it raises on a wrong digest).
    unique = doc["meta"]["unique_set_bytes"] / 2**20
    for record in records:
        if record["scenario"] == "cold":
            assert record["metrics"]["client_mib"] >= unique * 0.99, record
    assert "mirror/distribution" in proc.stdout and "mirror-2w/mirror" in proc.stdout
    assert (out / "table.md").read_text().startswith("| scenario")
    assert (out / "chart.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_rollout_smoke_run_with_sync_asks_upstream_for_no_blob(tmp_path: Path) -> None:
    require_binary("docker-registry")
    out = tmp_path / "rollout"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.rollout", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    figures = {f["mode"]: f for f in json.loads((out / "rollout.json").read_text())["figures"]}
    assert figures["off"]["upstream_blob_requests"] > 0
    assert figures["on"]["upstream_blob_requests"] == 0
    assert figures["on"]["lag_s"] is not None
    assert "| sync |" in proc.stdout


@pytest.mark.timeout(300)
def test_bundle_benchmark_smoke_has_every_figure(tmp_path: Path) -> None:
    for binary in ("docker-registry", "skopeo"):
        require_binary(binary)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bundle", "--sizes", "4MiB", "--repeat", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    records = json.loads((out / "results.json").read_text())
    cases = {(r["step"], r["case"], r["tool"]) for r in records}
    assert cases == {("export", "cold", "mirror"), ("export", "cold", "skopeo"),
                     ("export", "warm", "mirror"), ("export", "warm", "skopeo"),
                     ("export", ".zst warm", "mirror"), ("import", "tar", "mirror"),
                     ("import", ".zst", "mirror"), ("import", "tar", "skopeo")}
    assert all(r["mib_s"] > 0 and r["rss_mib"] > 0 for r in records)


@pytest.mark.timeout(300)
def test_lazy_benchmark_smoke_has_every_target(tmp_path: Path) -> None:
    for binary in ("docker-registry", "containerd", "ctr-remote"):
        require_binary(binary)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lazy", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "upstream directly", "mirror", "Distribution proxy"]
    mirror = rows[1].split("|")
    assert mirror[6].strip() == "206/206/206"  # never the whole blob for a lazy read


def test_processes_benchmark_prints_its_table() -> None:
    """``python -m benchmarks.processes --starts 1``: resident memory, spread and deaths."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.processes", "--starts", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert float(rows["supervisor, MiB"]) > 0
    assert rows["workers died while starting"] == "0 of 2"


@pytest.mark.timeout(300)
def test_policy_serving_benchmark_prints_every_row() -> None:
    """``python -m benchmarks.policy_serving``: policy off, on and on with audit, side by
    side, on the lean and the full path, with the ratios."""
    require_binary("docker-registry")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.policy_serving", "--duration", "1", "--repeat",
         "1", "--connections", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line for line in proc.stdout.splitlines() if "manifest by" in line]
    assert [r.split(",")[0] for r in rows] == ["lean path"] * 2 + ["full path"] * 2
    assert all(float(r.split()[-1]) > 0 and float(r.split()[-2]) > 0 for r in rows)


def test_countersign_benchmark_prints_both_rows() -> None:
    """``python -m benchmarks.countersign``: upstream's ``.sig`` vs countersigned, first
    and kept, with the ratios."""
    require_binary("docker-registry")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.countersign", "--images", "2", "--duration", "1",
         "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| first", "| kept"))]
    assert len(rows) == 2
    assert all(float(r.split("|")[-2].strip().rstrip("x")) > 0 for r in rows)
