"""``storage.max_size: auto``, the default, in a real ``mirror serve``: the cap it chose
is in ``mirror_started`` (every worker chooses the same), in ``/metrics`` and in
``mirror cache du``; ``none`` keeps no cap on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.mirrorproc import MirrorProcess, log_events, mirror_config
from tests.support.net import free_port, http_status

pytestmark = pytest.mark.integration


def _expected_cap(path: Path, held: int = 0) -> int:
    disk = os.statvfs(path)
    return min(int(disk.f_blocks * disk.f_frsize * 0.8), disk.f_bavail * disk.f_frsize + held)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_config_without_max_size_logs_the_cap_it_chose(tmp_path: Path, workers: int) -> None:
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": "registry.test", "url": "http://127.0.0.1:9",
                             "default": True}])
    config["server"] = {"workers": workers}
    with MirrorProcess(tmp_path / "run", config) as mirror:
        started = _wait_for_started(mirror, workers)
        with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    expected = _expected_cap(tmp_path)
    for line in started:
        assert line["max_size_from"] == "auto"
        assert abs(int(str(line["max_size"])) - expected) < 64 * 2**20  # free space moves
    sizes = [int(str(line["max_size"])) for line in started]
    assert max(sizes) - min(sizes) < 64 * 2**20  # the workers chose the same cap
    cap = next(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("mirror_cache_max_bytes"))
    assert abs(cap - expected) < 64 * 2**20

    du = subprocess.run([sys.executable, "-m", "mirror", "cache", "du", "--config",
                         str(tmp_path / "run" / "mirror.yaml")], capture_output=True,
                        text=True, timeout=60, check=True).stdout
    assert "limit:" in du and "(auto;" in du


def _wait_for_started(mirror: MirrorProcess, workers: int) -> list[dict[str, object]]:
    """Each worker logs ``mirror_started`` once it is ready (readyz answers with the first)."""
    deadline = time.monotonic() + 20
    while len(started := mirror.events("mirror_started")) < workers:
        assert time.monotonic() < deadline, mirror.log_tail()
        time.sleep(0.1)
    return started


def test_max_size_none_keeps_no_cap(tmp_path: Path) -> None:
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": "registry.test", "url": "http://127.0.0.1:9",
                             "default": True}])
    config["storage"]["max_size"] = "none"
    with MirrorProcess(tmp_path / "run", config) as mirror:
        (started,) = _wait_for_started(mirror, 1)
    assert started["max_size"] is None and started["max_size_from"] == "none"


def test_serve_with_no_config_as_run_sh_starts_it_logs_the_cap(tmp_path: Path) -> None:
    """``bash scripts/run.sh`` is ``mirror serve`` with no config (one worker per core)."""
    port = free_port()
    log_path = tmp_path / "mirror.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}",
             "--storage", str(tmp_path / "mirror-data")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{port}/readyz", timeout=1.0) != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        while not (started := log_events(log_path.read_text(), "mirror_started")):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert started[0]["max_size_from"] == "auto"
    assert abs(int(started[0]["max_size"]) - _expected_cap(tmp_path)) < 64 * 2**20
