"""Load generators: a verifying Python pull client, curl for herds, wrk for throughput.

- :class:`PullClient` (aiohttp) pulls like a real client: manifest by tag with
  the Accept types of Docker and OCI, the linux/amd64 child of an index, then
  config and layers (three at a time) that it does not have yet, logging in to
  a Bearer realm when it gets a 401. It hashes every byte and raises :class:`VerifyError` on a
  mismatch. It is the client of the correctness runs (cold and warm pulls).
- :func:`curl_herd`: one ``curl --parallel`` process starts every transfer of a
  herd at the same moment and reports time to first byte per transfer; a C
  client, so 100 clients of a gigabyte do not saturate Python before the server.
- :func:`run_wrk`: ``wrk`` with k keep-alive connections and one thread, for
  requests/s of small hot blobs and tags by GET; :func:`run_hey` for HEAD;
  :func:`run_raw` (raw sockets, ``recv_into`` a 4 MiB buffer) for big blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tests.support.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


class VerifyError(RuntimeError):
    """A target answered bytes that do not match the digest asked for."""


@dataclass
class PullStats:
    """What one client received."""

    bytes: int = 0
    requests: int = 0
    blobs: int = 0
    ttfb: list[float] = field(default_factory=list)


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PullClient:
    """One client with its own connections and tokens, like one machine pulling.

    Args:
        base_url: the target, ``http://127.0.0.1:PORT``.
        parallel: layers downloaded at once (Docker's default is 3).
    """

    def __init__(self, base_url: str, parallel: int = 3) -> None:
        self.base_url = base_url
        self.parallel = parallel
        self.stats = PullStats()
        self._tokens: dict[str, str] = {}
        self.have: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PullClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.parallel + 1),
            auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _login(self, repo: str, challenge: str) -> None:
        assert self._session is not None
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm")
        params.setdefault("scope", f"repository:{repo}:pull")
        async with self._session.get(realm, params=params) as resp:
            resp.raise_for_status()
            body = await resp.json()
        self._tokens[repo] = body.get("token") or body["access_token"]

    async def _fetch(self, repo: str, path: str, digest: str | None,
                     accept: str | None = None) -> tuple[bytes, str]:
        """GET ``/v2/<repo>/<path>``; hash and count it; return small bodies."""
        assert self._session is not None
        url = f"{self.base_url}/v2/{repo}/{path}"
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            if repo in self._tokens:
                headers["Authorization"] = f"Bearer {self._tokens[repo]}"
            started = time.perf_counter()
            async with self._session.get(url, headers=headers) as resp:
                self.stats.requests += 1
                if resp.status == 401 and repo not in self._tokens:
                    await resp.read()
                    await self._login(repo, resp.headers.get("WWW-Authenticate", ""))
                    continue
                if resp.status != 200:
                    raise VerifyError(f"GET {url}: {resp.status}")
                return await self._body(resp, url, digest, started)
        raise VerifyError(f"GET {url}: still 401 after login")

    async def _body(self, resp: aiohttp.ClientResponse, url: str, digest: str | None,
                    started: float) -> tuple[bytes, str]:
        hasher, kept, size = hashlib.sha256(), bytearray(), 0
        first = True
        async for chunk in resp.content.iter_chunked(1 << 20):
            if first:
                self.stats.ttfb.append(time.perf_counter() - started)
                first = False
            hasher.update(chunk)
            size += len(chunk)
            if size <= 4 << 20:  # manifests and configs are parsed; layers are not kept
                kept += chunk
        got = "sha256:" + hasher.hexdigest()
        if digest is not None and got != digest:
            raise VerifyError(f"GET {url}: content is {got}, expected {digest}")
        self.stats.bytes += size
        return bytes(kept), resp.headers.get("Content-Type", "")

    async def manifest(self, repo: str, reference: str, digest: str) -> bytes:
        """GET a manifest with the Accept types of a real client and verify it."""
        body, _ = await self._fetch(repo, f"manifests/{reference}", digest, ACCEPT)
        return body

    async def blob(self, repo: str, digest: str) -> None:
        """Download and verify one blob, unless this client has it already."""
        if digest in self.have:
            return  # a real client keeps layers it has (shared base layers)
        await self._fetch(repo, f"blobs/{digest}", digest)
        self.have.add(digest)
        self.stats.blobs += 1

    async def pull(self, repo: str, tag: str, expected: str, arch: str = "amd64") -> None:
        """Pull ``repo:tag`` for linux/``arch`` and verify every digest.

        Args:
            repo: repository.
            tag: tag to resolve.
            expected: digest the tag must resolve to.
            arch: the platform picked from an index.

        Raises:
            VerifyError: wrong content or an unexpected status.
        """
        body, media_type = await self._fetch(repo, f"manifests/{tag}", expected, ACCEPT)
        doc: dict[str, Any] = json.loads(body)
        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
            child = next(m for m in doc["manifests"]
                         if m.get("platform", {}).get("architecture") == arch)
            body, _ = await self._fetch(repo, f"manifests/{child['digest']}", child["digest"],
                                        ACCEPT)
            doc = json.loads(body)
        await self.blob(repo, doc["config"]["digest"])
        limit = asyncio.Semaphore(self.parallel)

        async def layer(digest: str) -> None:
            async with limit:
                await self.blob(repo, digest)

        await asyncio.gather(*(layer(d["digest"]) for d in doc["layers"]))


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
