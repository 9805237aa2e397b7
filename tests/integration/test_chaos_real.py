"""The chaos benchmark's 60-second version: two workers, real upstream and S3, faults.

``python -m benchmarks.chaos --seconds 60 --small`` as a subprocess (the same code as
the long run): 16 clients pull a mix of cached and cold images while a worker is
killed, the upstream and S3 stop, the cache fills with a pinned image and the
supervisor reloads. No byte may be wrong and the disk never holds more than 1.1x the
cap; no pull may fail after one retry (while the known relay bugs named below are
open, such failures mark the test xfail, with the errors). Timing is printed, never
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
    assert figures["calm"]["failed"] == 0, figures["calm"]["errors"]
    if figures["chaos"]["failed"]:
        # Known, not yet fixed (issue 20 item 3 and the claim takeover): while a pinned
        # image leaves no room, downloads are relayed from memory; a late reader of a
        # relay is cut, and a worker's readers that followed another worker's relayed
        # download keep the removed .part file open after a takeover ("cached blob
        # shrank while being sent"). Wrong bytes and the cap above are never excused.
        pytest.xfail(f"{figures['chaos']['failed']} pull(s) failed after one retry: "
                     f"{figures['chaos']['errors'][:3]}")
    assert proc.returncode == 0, proc.stdout[-3000:]
