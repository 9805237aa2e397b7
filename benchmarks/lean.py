"""Lean load generators: what measures throughput without hiding the server.

An aiohttp client on two cores saturates before a good server does, so the
figures of the herd, hot-blob and tag scenarios come from these:

- :func:`curl_herd`: one ``curl --parallel`` process starts every transfer of a
  herd at the same moment and reports time to first byte per transfer.
- :func:`run_wrk`: ``wrk`` with k keep-alive connections and one thread, for
  requests/s of small hot blobs and tags by GET.
- :func:`run_hey`: ``hey`` for HEAD, which wrk cannot measure.
- :func:`run_raw`: raw sockets receiving into a 4 MiB buffer, for big blobs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


@dataclass(frozen=True)
class Transfer:
    """One curl transfer: HTTP status, seconds to first byte and to the end, bytes,
    curl's exit code and error message."""

    status: int
    ttfb: float
    total: float
    size: int
    exit_code: int = 0
    error: str = ""


def curl_herd(url: str, clients: int, headers: dict[str, str],
              timeout: float = 900) -> list[Transfer]:
    """GET ``url`` ``clients`` times at once from one ``curl --parallel`` process.

    Bodies go to /dev/null; each transfer gets its own connection.

    Raises:
        RuntimeError: curl is missing or failed.
    """
    binary = shutil.which("curl")
    if binary is None:
        raise RuntimeError("curl is not on PATH (Debian package: curl)")
    cmd = [binary, "-s", "--noproxy", "*", "--parallel", "--parallel-immediate",
           "--parallel-max", str(clients),
           "-w", "%{http_code} %{time_starttransfer} %{time_total} %{size_download} "
           "%{exitcode} %{errormsg}\\n"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    for _ in range(clients):
        cmd += ["-o", "/dev/null", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    transfers = []
    for line in proc.stdout.splitlines():
        code, ttfb, total, size, exit_code, *message = line.split()
        transfers.append(Transfer(int(code), float(ttfb), float(total), int(size),
                                  int(exit_code), " ".join(message)))
    if len(transfers) != clients:
        raise RuntimeError(f"curl gave {len(transfers)} results ({proc.returncode}): "
                           f"{proc.stderr[-500:]}")
    return transfers


@dataclass(frozen=True)
class WrkResult:
    """What wrk measured."""

    requests: int
    seconds: float
    rps: float
    errors: int


_WRK_SCRIPT = """\
wrk.method = "{method}"
{headers}
"""


def run_wrk(url: str, *, method: str, headers: dict[str, str], connections: int,
            duration: int) -> WrkResult:
    """Run ``wrk -t1 -c<connections> -d<duration>s`` against ``url``.

    Args:
        url: the full URL.
        method: ``GET`` or ``HEAD``.
        headers: request headers (Accept, Authorization).
        connections: keep-alive connections.
        duration: seconds.

    Returns:
        Requests, duration, requests/s and non-2xx plus socket errors.

    Raises:
        RuntimeError: wrk is missing or its output has no summary.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not on PATH (Debian package: wrk)")
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                      for k, v in headers.items())
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "request.lua"
        script.write_text(_WRK_SCRIPT.format(method=method, headers=lines))
        proc = subprocess.run(
            [binary, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
             "-s", str(script), url],
            capture_output=True, text=True, timeout=duration + 60, check=False)
    out = proc.stdout
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}\n{proc.stderr}")
    requests = int(match[1])
    seconds = float(match[2]) / (1000 if match[3] == "ms" else 1)
    errors = 0
    if bad := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(bad[1])
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         out):
        errors += sum(int(sock[i]) for i in range(1, 5))
    return WrkResult(requests, seconds, requests / seconds if seconds else 0.0, errors)


def run_hey(url: str, *, method: str, headers: dict[str, str], connections: int,
            duration: int) -> WrkResult:
    """Run ``hey -c<connections> -z<duration>s -m<method>`` against ``url``.

    wrk cannot measure ``HEAD``: its parser waits for the body that the
    ``Content-Length`` of a HEAD answer announces. hey (Go) can, at a higher
    cost per request on the client side.

    Returns:
        Requests, duration, requests/s and non-200 answers plus errors.

    Raises:
        RuntimeError: hey is missing or its output has no summary.
    """
    binary = shutil.which("hey")
    if binary is None:
        raise RuntimeError("hey is not on PATH (Debian package: hey)")
    cmd = [binary, "-c", str(connections), "-z", f"{duration}s", "-m", method, "-t", "30"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 60,
                          check=False)
    out = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    if proc.returncode != 0 or rps is None or total is None:
        raise RuntimeError(f"hey failed ({proc.returncode}): {out}\n{proc.stderr}")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = sum(n for c, n in codes.items() if c != 200)
    _, _, failures = out.partition("Error distribution:")
    errors += sum(int(n) for n in re.findall(r"\[(\d+)\]", failures))
    return WrkResult(sum(codes.values()), float(total[1]), float(rps[1]), errors)


def _raw_worker(host: str, port: int, request: bytes, deadline: float,
                counts: list[int]) -> None:
    """One keep-alive connection GETting until ``deadline``; counts [ok, errors]."""
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.perf_counter() < deadline:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                got = sock.recv(65536)
                if not got:
                    counts[1] += 1
                    return
                head += got
            header, _, rest = head.partition(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            length = _CONTENT_LENGTH.search(header)
            left = (int(length[1]) if length else 0) - len(rest)
            while left > 0:
                n = sock.recv_into(view, min(left, len(buf)))
                if n == 0:
                    counts[1] += 1
                    return
                left -= n
            counts[0 if status == 200 else 1] += 1


def run_raw(url: str, *, headers: dict[str, str], connections: int,
            duration: int) -> WrkResult:
    """GET ``url`` in a loop on ``connections`` keep-alive sockets, one thread each.

    For big bodies: wrk reads 8 KiB at a time and saturates near 1 GiB/s on
    these machines, before a good server does. These threads receive into a
    4 MiB buffer with ``recv_into`` (which releases the GIL): the client costs
    little more than the kernel's copy.

    Returns:
        Requests completed, duration, requests/s and errors.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
             *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    counts = [[0, 0] for _ in range(connections)]
    started = time.perf_counter()
    deadline = started + duration
    threads = [threading.Thread(target=_raw_worker, args=(host, port, request, deadline, c))
               for c in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ok, errors = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return WrkResult(ok, seconds, ok / seconds, errors)
