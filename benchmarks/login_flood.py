"""A valid login during a flood of wrong passwords (issue 19 item 4), before and after.

The mirror runs as a real process with ``auth`` (htpasswd, bcrypt cost 10, as the issue
measured) from two source trees side by side: the baseline (``--baseline``, e.g. a
checkout of main) and this one. For each:

- ``idle``: valid logins of fresh users (each user once, so every login is a real
  bcrypt check, not a remembered one) from 127.0.0.3, one after another;
- ``flood``: the same while another process keeps 300 connections from 127.0.0.2
  sending wrong passwords for alice (a new password each time) as fast as answers come.

It prints the latency of the valid logins (median and worst), the flood's answers by
status, and the ratios: flood / idle for each tree, and this tree / baseline. Usage::

    .venv/bin/python benchmarks/login_flood.py --baseline /path/to/main [--logins 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import bcrypt
import yaml

HERE = Path(__file__).resolve().parents[1]
FLOOD_CONNECTIONS = 300
COST = 10


def _basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_htpasswd(path: Path, users: int) -> None:
    """alice and bob0..bobN, bcrypt cost 10 (each password is the user's name + "-pw")."""
    names = ["alice", *(f"bob{i}" for i in range(users))]
    path.write_text("".join(
        f"{n}:{bcrypt.hashpw(f'{n}-pw'.encode(), bcrypt.gensalt(COST)).decode()}\n"
        for n in names))


class Mirror:
    """``python -m mirror serve`` from ``tree`` on a free port."""

    def __init__(self, tree: Path, work: Path, htpasswd: Path, workers: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"version": 1, "listen": f"127.0.0.1:{self.port}",
                  "storage": {"path": str(work / "cache")},
                  "upstreams": [{"name": "reg.test", "url": "http://127.0.0.1:1",
                                 "default": True}],
                  "server": {"workers": workers}, "log": {"level": "warning"},
                  "auth": {"htpasswd": str(htpasswd)}, "access": [{"who": ["*"]}]}
        work.mkdir(parents=True, exist_ok=True)
        (work / "mirror.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--config", str(work / "mirror.yaml")],
            env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("the mirror did not become ready")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def valid_logins(url: str, users: list[str]) -> list[float]:
    """Seconds each user's first login takes, one after another, from 127.0.0.3."""
    seconds = []
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for user in users:
            began = time.perf_counter()
            async with session.get(f"{url}/v2/", headers=_basic(user, f"{user}-pw")) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{user}'s valid login got {resp.status}")
            seconds.append(time.perf_counter() - began)
    return seconds


async def flood(url: str) -> Counter[int]:
    """300 connections from 127.0.0.2 sending wrong passwords until stdin closes."""
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(lane: int) -> None:
            attempt = 0
            while not stop.is_set():
                attempt += 1
                headers = _basic("alice", f"wrong-{lane}-{attempt}")
                try:
                    async with session.get(f"{url}/v2/", headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except (TimeoutError, aiohttp.ClientError):
                    statuses[0] += 1

        await asyncio.gather(*(one(i) for i in range(FLOOD_CONNECTIONS)))
    return statuses


def _flood_process(url: str) -> subprocess.Popen[str]:
    """The flood in a process of its own: its client work does not slow the measurement."""
    return subprocess.Popen([sys.executable, __file__, "--flood", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def measure(tree: Path, work: Path, htpasswd: Path, users: list[str],
                  workers: int) -> dict[str, object]:
    """Idle and flooded valid logins against the mirror of ``tree``."""
    mirror = Mirror(tree, work, htpasswd, workers)
    try:
        await mirror.ready()
        half = len(users) // 2
        idle = await valid_logins(mirror.url, users[:half])
        flooding = _flood_process(mirror.url)
        await asyncio.sleep(3)  # the flood's 300 connections are in and checking
        during = await valid_logins(mirror.url, users[half:])
        out, _ = await asyncio.to_thread(flooding.communicate, "")  # stdin closed: stop
        return {"idle": idle, "flood": during, "statuses": out.strip()}
    finally:
        mirror.stop()


def report(results: dict[str, dict[str, object]]) -> None:
    """One table: figures per tree, flood/idle, and this tree against the baseline."""
    rows = []
    for name, result in results.items():
        idle = [float(x) for x in result["idle"]]  # type: ignore[attr-defined]
        during = [float(x) for x in result["flood"]]  # type: ignore[attr-defined]
        rows.append((name, statistics.median(idle), max(idle), statistics.median(during),
                     max(during), str(result["statuses"])))
    print(f"\n{'tree':<10} {'idle p50':>9} {'idle max':>9} {'flood p50':>10} {'flood max':>10}"
          f" {'flood/idle':>11}  flood answers (status: count)")
    for name, idle50, idle_max, flood50, flood_max, statuses in rows:
        print(f"{name:<10} {idle50 * 1000:>7.0f}ms {idle_max * 1000:>7.0f}ms "
              f"{flood50 * 1000:>8.0f}ms {flood_max * 1000:>8.0f}ms {flood50 / idle50:>10.1f}x"
              f"  {statuses}")
    if len(rows) == 2:
        base, this = rows
        print(f"\nthis / baseline: idle p50 {this[1] / base[1]:.2f}x, flood p50 "
              f"{this[3] / base[3]:.3f}x, flood max {this[4] / base[4]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a source tree to compare with (main)")
    parser.add_argument("--logins", type=int, default=5, help="valid logins idle and flooded")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--flood", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:  # the flooding child process
        statuses = asyncio.run(flood(args.flood))
        print(" ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
        return
    work = Path(tempfile.mkdtemp(prefix="login-flood-"))
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, users=4 * args.logins)
    trees = {"this": HERE}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    results = {}
    try:
        for number, (name, tree) in enumerate(trees.items()):
            users = [f"bob{number * 2 * args.logins + i}" for i in range(2 * args.logins)]
            print(f"{name}: {tree}", flush=True)
            results[name] = asyncio.run(measure(tree, work / name, htpasswd, users,
                                                args.workers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
