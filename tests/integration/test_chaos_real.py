"""The chaos benchmark's 60-second version: two workers, real upstream and S3, faults.

``python -m benchmarks.chaos --seconds 60 --small`` as a subprocess (the same code as
the long run): 16 clients pull a mix of cached and cold images while a worker is
killed, the upstream and S3 stop, the cache fills with a pinned image and the
supervisor reloads. No byte may be wrong and the disk never holds more than 1.1x the
cap; no pull may fail after one retry (the relay's late readers and the readers of a
claim taken over, which failed such pulls, are fixed). Timing is printed, never
checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_a_minute_of_chaos_loses_no_pull_and_holds_the_cap(tmp_path: Path) -> None:
    require_binary("docker-registry")
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--seconds", "60", "--small",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=880, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(proc.stdout)
    assert out.exists(), f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    figures = json.loads(out.read_text())
    cap = figures["cap"]
    for name in ("calm", "chaos"):
        phase = figures[name]
        assert phase["mismatches"] == 0, phase
        assert phase["done"] > 0, phase
        assert phase["peak_disk"] <= 1.1 * cap, (name, phase["peak_disk"] / cap)
    assert set(figures["chaos"]["faults"]) == {"kill9", "upstream", "s3", "fill", "sighup"}
    for name in ("calm", "chaos"):
        assert figures[name]["failed"] == 0, (name, figures[name]["errors"])
    assert proc.returncode == 0, proc.stdout[-3000:]
