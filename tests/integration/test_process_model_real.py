"""The process model as an operator meets it, with ``server.workers`` 1 and 2, in real
processes in front of real Distribution.

- A second ``mirror serve`` on the same port, or on the same storage folder, exits 2 with
  one line (no silent ``SO_REUSEPORT`` split of the traffic).
- The pid file names the supervisor; ``mirror reload`` signals it (and only it).
- A worker killed with SIGKILL while 16 clients pull in a loop costs only the connections
  it held: every other request, and every retry, succeeds (one listening socket shared).
- With two workers: the admin listener, S3 (moto), the cluster peer API, and bundles
  imported while the workers serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mirror.cluster import sign_token, token_scope
from tests.support.images import Image, Index, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.s3 import MotoS3, s3_config
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Start = Callable[..., MirrorProcess]


@pytest.fixture
def start(mirrors: Mirrors, tmp_path: Path) -> Start:
    """``start(name, registry_url, workers, **config)``: a running mirror in ``name`` (its
    cache in ``name-cache``), stopped at the end; it returns once every worker started."""
    def run(name: str, registry_url: str, workers: int, **extra: Any) -> MirrorProcess:
        return mirrors.start(registry_url, workers, storage_path=tmp_path / f"{name}-cache",
                             workdir=name, timeout=60, **extra)
    return run


def _wait(predicate: Callable[[], bool], mirror: MirrorProcess | None = None,
          timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time"
                                 + (f"; log tail:\n{mirror.log_tail()}" if mirror else ""))
        time.sleep(0.05)


def mirror_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGS``, its output captured."""
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _serve_again(tmp_path: Path, config: dict[str, Any], name: str) -> tuple[int, str]:
    """A second ``mirror serve`` with ``config``: its exit status and stderr (it must exit
    by itself; one that serves is stopped and reported)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the second mirror started and served:\n{out}\n{err}") from None
    return proc.returncode, err


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=30) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _children(mirror: MirrorProcess) -> list[int]:
    assert mirror.pid is not None
    text = Path(f"/proc/{mirror.pid}/task/{mirror.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def _pull_and_verify(mirror: MirrorProcess, item: Image | Index, dest: Path) -> None:
    out = skopeo_copy(f"127.0.0.1:{mirror.port}/{item.repo}:{item.tag}", dest,
                      all_platforms=True)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == {blob.digest: blob.size for blob in item.blobs()}


# --- one mirror per port, one per storage folder ---------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_mirror_on_the_same_port_exits_2(
        registry_anon: Registry, start: Start, tmp_path: Path, workers: int) -> None:
    first = start("first", registry_anon.url, workers)
    config = dict(first.config, storage={"path": str(tmp_path / "other-cache")})
    code, err = _serve_again(tmp_path, config, "second")
    assert code == 2
    assert err.strip() == (f"mirror: cannot listen on "
                           f"127.0.0.1:{first.port}: Address already in use")
    assert _get(f"{first.url}/v2/")[0] == 200  # the first goes on, alone on its port
    assert len(first.events("mirror_started")) == workers


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_mirror_on_the_same_storage_folder_exits_2(
        registry_anon: Registry, start: Start, tmp_path: Path, workers: int) -> None:
    first = start("first", registry_anon.url, workers)
    config = dict(first.config, listen=f"127.0.0.1:{free_port()}")
    code, err = _serve_again(tmp_path, config, "second")
    assert code == 2
    storage = first.config["storage"]["path"]
    assert err.strip() == (f"mirror: config error: storage.path: {storage} is in use by "
                           f"another mirror (pid {first.pid}); one mirror per storage folder")
    assert _get(f"{first.url}/v2/")[0] == 200


# --- workers: auto ---------------------------------------------------------------------

def test_workers_auto_follows_the_cpu_affinity(registry_anon: Registry, tmp_path: Path) -> None:
    """Started on one CPU of the machine, ``workers: auto`` is one process (it counted the
    host's cores before, and started one worker per core)."""
    allowed = os.sched_getaffinity(0)
    upstream = {"name": UPSTREAM, "url": registry_anon.url, "default": True}
    config = mirror_config(free_port(), tmp_path / "cache", [upstream])
    config["server"] = {"workers": "auto"}
    mirror = MirrorProcess(tmp_path / "auto", config)
    os.sched_setaffinity(0, {min(allowed)})  # the mirror inherits it
    try:
        mirror.start(timeout=60)
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        assert _get(f"{mirror.url}/v2/")[0] == 200
        assert _children(mirror) == []  # no supervisor, no workers: one process
        assert mirror.events("workers_started") == []
        assert "worker" not in mirror.events("mirror_started")[0]
    finally:
        mirror.stop()


def test_the_supervisor_is_small(registry_anon: Registry, start: Start) -> None:
    """The supervisor imports only the standard library (it was the whole mirror: 67 MiB
    resident); it keeps the pid that was started, so the pid file stays true."""
    mirror = start("small", registry_anon.url, 2)
    status = Path(f"/proc/{mirror.pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines()
                       if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 25 * 1024
    cmdline = Path(f"/proc/{mirror.pid}/cmdline").read_bytes().split(b"\0")
    assert b"mirror.server.workers" in cmdline
    maps = Path(f"/proc/{mirror.pid}/maps").read_text()
    assert "aiohttp" not in maps and "uvloop" not in maps and "_asyncio" not in maps


# --- pid file and mirror reload ----------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_mirror_reload_signals_the_mirror_of_the_config(
        registry_anon: Registry, start: Start, workers: int) -> None:
    mirror = start("reload", registry_anon.url, workers)
    pid_file = Path(mirror.config["storage"]["path"]) / "mirror.pid"
    assert pid_file.read_text().strip() == str(mirror.pid)  # the supervisor, not a worker
    result = mirror_cli("reload", "--config", mirror.config_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reload: sent SIGHUP to the mirror (pid {mirror.pid})"
    # no TLS here: each process logs the signal and serves on (test_tls_real reloads TLS)
    _wait(lambda: len(mirror.events("sighup_ignored")) == workers, mirror)
    assert _get(f"{mirror.url}/v2/")[0] == 200
    if workers > 1:
        assert len(_children(mirror)) == workers  # no worker died of it
    assert mirror.stop() == 0
    assert not pid_file.exists()  # removed at a clean stop
    result = mirror_cli("reload", "--config", mirror.config_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"mirror: no mirror to reload: {pid_file}: no such "
                                     "file (is `mirror serve` running with this config?)")


def test_reload_refuses_a_stale_pid_file(registry_anon: Registry, start: Start,
                                         tmp_path: Path) -> None:
    """A pid file left by a crash names a process that is not (or no longer) the mirror."""
    pid_file = tmp_path / "run" / "mirror.pid"
    mirror = start("stale", registry_anon.url, 2, server={"workers": 2,
                                                          "pid_file": str(pid_file)})
    assert pid_file.read_text().strip() == str(mirror.pid)
    mirror.kill9()  # the supervisor: the workers follow it (SIGTERM), the file stays
    _wait(lambda: "mirror_stopped" in mirror.log_text() and mirror.log_text().count(
        '"mirror_stopped"') >= 2, mirror)
    assert pid_file.exists()
    result = mirror_cli("reload", "--config", mirror.config_path)
    assert result.returncode == 1
    assert "a stale pid file" in result.stderr and len(result.stderr.splitlines()) == 1


# --- a worker's death costs only what it held ------------------------------------------

def _held_connections(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` among ``pid``'s open files."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            held += 1
    return held


def test_kill9_of_a_worker_under_load_costs_only_its_own_requests(
        registry_anon: Registry, std_images: list[Image | Index], start: Start) -> None:
    """16 clients pull an image in a loop (a new connection per request) for ~20 s; one
    worker is stopped, then killed: the requests lost are at most the connections it
    held, every other request succeeds, and every client's retry succeeds."""
    image = next(i for i in std_images if isinstance(i, Image))
    mirror = start("load", registry_anon.url, 2)
    paths = [f"/v2/{image.repo}/manifests/{image.tag}",
             *(f"/v2/{image.repo}/blobs/{blob.digest}" for blob in image.blobs())]
    expected = {f"/v2/{image.repo}/blobs/{b.digest}": b.digest for b in image.blobs()}
    accept = {"Accept": image.manifest.media_type}
    failures: list[str] = []
    retried_ok = 0
    done = 0

    async def fetch(session: aiohttp.ClientSession, path: str) -> None:
        async with session.get(f"{mirror.url}{path}", headers=accept) as response:
            assert response.status == 200, (path, response.status)
            body = await response.read()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        assert digest == expected.get(path, image.manifest.digest), path

    async def client(stop_at: float) -> None:
        nonlocal retried_ok, done
        connector = aiohttp.TCPConnector(force_close=True)  # a connection per request
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            # aiohttp would silently send a failed GET again once: each failure is counted
            session._retry_connection = False
            while time.monotonic() < stop_at:
                for path in paths:
                    try:
                        await fetch(session, path)
                    except (aiohttp.ClientError, ConnectionError) as exc:
                        failures.append(f"{path}: {exc!r}")
                        await fetch(session, path)  # the retry must succeed
                        retried_ok += 1
                    done += 1

    async def run() -> tuple[int, int]:
        stop_at = time.monotonic() + 20
        clients = asyncio.gather(*(client(stop_at) for _ in range(16)))
        await asyncio.sleep(6)
        victim = _children(mirror)[0]
        os.kill(victim, signal.SIGSTOP)  # it accepts nothing more; what it holds stays
        await asyncio.sleep(1.0)
        held = await asyncio.to_thread(_held_connections, victim, mirror.port)
        before = done
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(1.0)
        assert done > before  # the other worker went on serving meanwhile
        await clients
        return victim, held

    victim, held = asyncio.run(run())
    assert done > 200
    assert len(failures) <= held, (held, failures)
    assert retried_ok == len(failures)
    _wait(lambda: len(_children(mirror)) == 2 and victim not in _children(mirror), mirror)
    assert len(mirror.events("worker_restarted")) == 1


# --- two workers: admin listener, S3, cluster peers, bundles ---------------------------

def test_admin_listener_with_two_workers(registry_anon: Registry, start: Start,
                                         tmp_path: Path) -> None:
    admin_port = free_port()
    (tmp_path / "admin.token").write_text("admin-token-0123456789")
    mirror = start("admin", registry_anon.url, 2,
                   admin={"listen": f"127.0.0.1:{admin_port}",
                          "token_file": str(tmp_path / "admin.token")})
    admin = f"http://127.0.0.1:{admin_port}"
    token = {"Authorization": "Bearer admin-token-0123456789"}
    for _ in range(20):  # a new connection each: both workers answer on both sockets
        assert _get(f"{mirror.url}/metrics")[0] == 404  # not on the clients' port
        assert _get(f"{mirror.url}/v2/")[0] == 200
        assert _get(f"{admin}/metrics")[0] == 401
        assert _get(f"{admin}/v2/", token)[0] == 404  # no registry on the admin port
    status, body = _get(f"{admin}/metrics", token)
    assert status == 200
    pings = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                if line.startswith("mirror_http_requests_total{") and 'route="ping"' in line)
    assert pings == 20  # summed over the workers
    served = {r["worker"] for r in mirror.events("request")}
    assert served == {0, 1}
    # a second mirror on the admin port alone is refused too
    config = dict(mirror.config, listen=f"127.0.0.1:{free_port()}",
                  storage={"path": str(tmp_path / "other-cache")})
    code, err = _serve_again(tmp_path, config, "second")
    assert code == 2 and f"cannot listen on 127.0.0.1:{admin_port}" in err


def test_s3_tier_with_two_workers(registry_anon: Registry, moto_s3: MotoS3,
                                  std_images: list[Image | Index], start: Start,
                                  tmp_path: Path) -> None:
    """Node A (two workers) fills S3; node B (two workers) pulls everything from S3."""
    bucket = moto_s3.new_bucket("workers")
    s3 = s3_config(moto_s3, bucket, tmp_path / "creds", prefix="w")
    node_a = start("a", registry_anon.url, 2, storage={"path": str(tmp_path / "a-cache"),
                                                      "s3": s3})
    for n, item in enumerate(std_images):
        _pull_and_verify(node_a, item, tmp_path / f"a-{n}")
    blobs = {b.digest for item in std_images for b in item.blobs()}
    keys = {f"w/blobs/sha256/{d.split(':')[1]}" for d in blobs}
    _wait(lambda: keys <= set(moto_s3.keys(bucket, "w")), node_a, timeout=60)
    node_a.stop()
    mark = registry_anon.clear_log_mark()
    node_b = start("b", registry_anon.url, 2, storage={"path": str(tmp_path / "b-cache"),
                                                      "s3": s3})
    for n, item in enumerate(std_images):
        _pull_and_verify(node_b, item, tmp_path / f"b-{n}")
    upstream = registry_anon.requests_since(mark)
    assert [e.path for e in upstream if "/blobs/" in e.path] == []
    fills = node_b.events("fill_done")
    assert {f["digest"] for f in fills} == blobs  # each blob once per node, not per worker
    assert {f["source"] for f in fills} == {"s3"}


def test_cluster_peer_api_with_two_workers(registry_anon: Registry, start: Start,
                                           tmp_path: Path) -> None:
    """Two nodes of two workers each: every blob is downloaded from upstream once for the
    region (the other node asks its owner's peer API, answered by either worker)."""
    image = make_image("workers/peers", "v1",
                       layers=[make_layer(256 * 1024, seed=900 + n) for n in range(4)],
                       fmt="oci")
    registry_anon.push(image)
    secret = tmp_path / "peer-secret"
    secret.write_text("a-fleet-secret-for-the-tests")
    port = free_port()
    addresses = ["127.0.0.2", "127.0.0.3"]
    nodes = []
    for address in addresses:
        node = start(f"node-{address}", registry_anon.url, 2, listen=f"{address}:{port}",
                     cluster={"node_id": f"n-{address}", "region": "east",
                              "self_url": f"http://{address}:{port}",
                              "secret_file": str(secret),
                              "peers": [f"http://{a}:{port}" for a in addresses],
                              "header_timeout": "500ms", "health_interval": "300ms"})
        nodes.append(node)
    for node in nodes:  # each worker of each node sees the other node healthy
        _wait(lambda node=node: {e["worker"] for e in node.events("peer_healthy")} == {0, 1},
              node)
    mark = registry_anon.clear_log_mark()
    for n, node in enumerate(nodes):
        out = skopeo_copy(f"{node.host}:{node.port}/{image.repo}:{image.tag}",
                          tmp_path / f"pull-{n}")
        assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}
    for blob in image.blobs():
        assert registry_anon.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
    peer_served = [r for node in nodes for r in node.events("request")
                   if r.get("route") == "peer_blob" or "/_peer/" in r.get("path", "")]
    assert peer_served  # the peer API answered
    # the peer API refuses without a token, from either worker
    blob = image.layers[0].digest
    url = f"{nodes[0].url}/_peer/v2/{image.repo}/blobs/{blob}?ns={UPSTREAM}"
    for _ in range(6):
        assert _get(url)[0] == 401
    audience, path = token_scope(url)  # a token made for this node, method and path
    good = {"Authorization": "Bearer " + sign_token("a-fleet-secret-for-the-tests", "peer",
                                                    time.time() + 30, audience=audience,
                                                    method="GET", path=path)}
    assert _get(url, good)[0] == 200


def test_bundle_imported_while_two_workers_serve(
        registry_anon: Registry, std_images: list[Image | Index], start: Start,
        tmp_path: Path) -> None:
    """Export from a two-worker mirror while it serves; import into another two-worker
    mirror while it serves (its upstream a closed port); both workers then serve every
    imported image."""
    online = start("online", registry_anon.url, 2)
    bundle = tmp_path / "site.tar"
    refs = [f"{item.repo}:{item.tag}" for item in std_images]
    result = mirror_cli("export", "--config", online.config_path, *refs, "-o", bundle, "-q",
                        timeout=300)
    assert result.returncode == 0, result.stderr
    offline = start("offline", f"http://127.0.0.1:{free_port()}", 2,
                    cache={"tag_ttl": "1h"})
    for item in std_images:  # not there yet, and no upstream
        status, _ = _get(f"{offline.url}/v2/{item.repo}/manifests/{item.tag}")
        assert status >= 400
    result = mirror_cli("import", "--config", offline.config_path, bundle, "-q", timeout=300)
    assert result.returncode == 0, result.stderr
    for n, item in enumerate(std_images):
        for attempt in range(2):  # each pull a fresh set of connections over the workers
            _pull_and_verify(offline, item, tmp_path / f"pulled-{n}-{attempt}")
    served = [r for r in offline.events("request") if r.get("route") == "blob"]
    assert {r["worker"] for r in served} == {0, 1}
    assert all(r["status"] == 200 for r in served)

