"""The process model's own figures: resident memory of the supervisor and of an idle
worker against one process, and fresh starts of a two-worker mirror.

::

    python3 -m benchmarks.processes [--starts N] [--workers N]

Each start is a new storage folder and a new port; the mirror's upstream is a closed
port (nothing is pulled: these are idle figures). For every start it records VmRSS of
the one-process mirror (``workers: 1``, the baseline), of the supervisor and of each
worker once every worker has logged ``mirror_started``, and whether a worker died while
starting (``worker_died`` in the log: issue 20's start-up race). It prints one table:
medians, and each figure against the one-process mirror.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _start(folder: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path, int]:
    port = _free_port()
    config = {"version": 1, "listen": f"127.0.0.1:{port}",
              "storage": {"path": str(folder / "cache")},
              "upstreams": [{"name": "registry.test", "url": f"http://127.0.0.1:{_free_port()}",
                             "default": True}],
              "server": {"workers": workers}, "log": {"format": "json"}}
    (folder / "mirror.yaml").write_text(yaml.safe_dump(config))
    log = folder / "mirror.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config",
                                 str(folder / "mirror.yaml")], stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while log.read_text().count('"mirror_started"') < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the mirror did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    while True:  # ready: /readyz answers
        try:
            with _DIRECT.open(f"http://127.0.0.1:{port}/readyz", timeout=2):
                break
        except OSError:
            time.sleep(0.05)
    time.sleep(1.0)  # idle
    return proc, log, port


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def measure(starts: int, workers: int) -> dict[str, list[float]]:
    """Figures of ``starts`` fresh starts (each: one process, then ``workers``)."""
    figures: dict[str, list[float]] = {"one": [], "supervisor": [], "worker": [], "died": [],
                                       "busiest": []}
    with tempfile.TemporaryDirectory(prefix="mirror-processes-") as tmp:
        for n in range(starts):
            one = Path(tmp) / f"one-{n}"
            one.mkdir()
            proc, _, _ = _start(one, 1)
            figures["one"].append(_rss_mib(proc.pid))
            proc.terminate()
            proc.wait(30)
            many = Path(tmp) / f"many-{n}"
            many.mkdir()
            proc, log, port = _start(many, workers)
            figures["supervisor"].append(_rss_mib(proc.pid))
            figures["worker"] += [_rss_mib(child) for child in _children(proc.pid)]
            figures["died"].append(float(log.read_text().count('"worker_died"')))
            figures["busiest"].append(_busiest_share(port, log))
            proc.terminate()
            proc.wait(30)
    return figures


def _busiest_share(port: int, log: Path, connections: int = 16) -> float:
    """16 connections opened at once (as a load tool's keep-alive pool is), one request
    each: the share of them the busiest worker took (1/workers is an even spread)."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for n, sock in enumerate(socks):
        sock.sendall(f"GET /v2/?spread={n} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
    for sock in socks:
        sock.recv(65536)
        sock.close()
    time.sleep(0.5)
    counts: dict[int, int] = {}
    for line in log.read_text().splitlines():
        if '"route":"ping"' in line and '"worker":' in line:
            worker = int(line.split('"worker":', 1)[1].split(",", 1)[0].split("}", 1)[0])
            counts[worker] = counts.get(worker, 0) + 1
    return max(counts.values()) / sum(counts.values()) if counts else 1.0


def table(figures: dict[str, list[float]], workers: int) -> str:
    base = statistics.median(figures["one"])
    rows = [("one process (workers: 1), MiB", statistics.median(figures["one"])),
            ("supervisor, MiB", statistics.median(figures["supervisor"])),
            ("idle worker, MiB (median of all)", statistics.median(figures["worker"])),
            ("idle worker, MiB (largest)", max(figures["worker"]))]
    lines = [f"| figure ({len(figures['one'])} fresh starts, {workers} workers) | value | "
             "/ one process |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value:.1f} | {value / base:.2f}x |" for name, value in rows]
    lines.append(f"| busiest worker's share of 16 connections opened at once | "
                 f"{statistics.median(figures['busiest']):.2f} (even: {1 / workers:.2f}) | - |")
    died = sum(figures["died"])
    lines.append(f"| workers died while starting | {died:.0f} of "
                 f"{len(figures['died']) * workers} | - |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.processes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="fresh starts (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    args = parser.parse_args()
    print(table(measure(args.starts, args.workers), args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
