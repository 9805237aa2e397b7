"""Issue 19 items 2, 4 and 7: admin behind access, logins a flood cannot bend, /v2/ challenges.

The mirror runs as a real process (``server.workers`` 1 and 2: every admin answer is
the node's) in front of a real Distribution, with ``auth``: alice is an operator
(``auth.admin_groups``) who may pull only ``public/*``; bob may pull everything but is
no operator; anonymous clients may pull ``public/base``. skopeo and podman pull with
and without credentials. Upstream requests are counted in Distribution's access log:
a refused admin request never reaches it. The client-left test uses the in-process
fake upstream, whose blobs drip slowly, so a warm is still running when its client
leaves.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.dockerd import Dockerd
from tests.support.fake import FakeRegistry
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.podman import PodmanError, podman_binary, podman_pull
from tests.support.registry import Registry, write_htpasswd
from tests.support.skopeo import (
    SkopeoError,
    manifest_digest,
    skopeo_copy,
    verify_dir,
    write_auth_json,
)

pytestmark = pytest.mark.integration

USERS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
WORKERS = [pytest.param(1, id="workers1"), pytest.param(2, id="workers2")]


@dataclass
class Upstream:
    registry: Registry
    private: Image
    public: Image
    htpasswd: Path


@pytest.fixture(scope="module")
def upstream(registry_bin: str, htpasswd_bin: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    work = tmp_path_factory.mktemp("admin")
    registry = Registry(work / "registry")
    registry.start()
    private = make_image("private/app", "v1", fmt="oci",
                         layers=[make_layer(200_000, seed=1901), make_layer(900, seed=1902)])
    public = make_image("public/base", "v1", fmt="docker", layers=[make_layer(3000, seed=1903)])
    for item in (private, public):
        registry.push(item)
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, USERS, htpasswd_bin)
    try:
        yield Upstream(registry, private, public, htpasswd)
    finally:
        registry.stop()


def _config(up: Upstream, storage: Path, workers: int, *, auth: bool = True,
            operators: bool = False) -> dict[str, Any]:
    """Without ``operators``, a config today's main reads too (no new keys)."""
    config = mirror_config(free_port(), storage, [
        {"name": up.registry.host, "url": up.registry.url, "default": True}])
    config["server"] = {"workers": workers}
    if auth:
        config["auth"] = {"htpasswd": str(up.htpasswd), "anonymous": True,
                          "groups": {"ops": ["alice"]}}
        if operators:
            config["auth"]["admin_groups"] = ["ops"]
        config["access"] = [
            {"who": ["user:alice"], "repositories": ["public/*"]},
            {"who": ["user:bob"], "repositories": ["*"]},
            {"who": ["anonymous"], "repositories": ["public/base"]},
        ]
    return config


def _running(config: dict[str, Any], workdir: Path) -> Iterator[MirrorProcess]:
    process = MirrorProcess(workdir, config)
    process.start(timeout=30)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(params=WORKERS)
def mirror(request: pytest.FixtureRequest, upstream: Upstream,
           tmp_path: Path) -> Iterator[MirrorProcess]:
    """alice, bob and anonymous; nobody is an operator."""
    yield from _running(_config(upstream, tmp_path / "cache", request.param),
                        tmp_path / "mirror")


@pytest.fixture(params=WORKERS)
def ops_mirror(request: pytest.FixtureRequest, upstream: Upstream,
               tmp_path: Path) -> Iterator[MirrorProcess]:
    """alice is an operator (group ops in auth.admin_groups), who may pull public/*."""
    yield from _running(_config(upstream, tmp_path / "cache", request.param, operators=True),
                        tmp_path / "mirror")


def _basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def _call(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
          body: bytes | None = None, source: str = "127.0.0.1") -> tuple[int, dict[str, str],
                                                                         bytes]:
    """One request from ``source`` (an address of 127.0.0.0/8): status, headers, body."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60, source_address=(source, 0))
    try:
        conn.request(method, "/" + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _warm(mirror: MirrorProcess, refs: list[str], headers: dict[str, str]) -> tuple[int, bytes]:
    status, _, body = _call(f"{mirror.url}/admin/warm", "POST", body=json.dumps(
        {"refs": refs}).encode(), headers={"Content-Type": "application/json", **headers})
    return status, body


def _error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


# --- item 2: admin actions want an operator, and each ref the caller's rights ----------------
def test_a_user_cannot_warm_what_they_may_not_pull_nor_read_the_pages(
        mirror: MirrorProcess, upstream: Upstream) -> None:
    private = f"{upstream.registry.host}/{upstream.private.repo}:v1"
    alice, bob = _basic("alice", USERS["alice"]), _basic("bob", USERS["bob"])
    mark = upstream.registry.clear_log_mark()
    status, body = _warm(mirror, [private], alice)  # outside her rules (public/*)
    assert status == 403 and _error_code(body) == "DENIED"
    assert _warm(mirror, [private], bob)[0] == 403  # may pull it, but is no operator
    assert _warm(mirror, [private], {})[0] == 401
    assert _call(f"{mirror.url}/admin/sync", "POST", body=b"{}", headers=alice)[0] == 403
    assert upstream.registry.requests_since(mark) == []  # nothing asked upstream
    for path in ("/", "/metrics", "/admin/popular", "/admin/sync"):  # item 7
        assert _call(mirror.url + path, headers=bob)[0] == 403, path
        assert _call(mirror.url + path)[0] == 401, path


def test_admin_actions_want_an_operator_and_each_ref_the_callers_rights(
        ops_mirror: MirrorProcess, upstream: Upstream) -> None:
    mirror = ops_mirror
    private = f"{upstream.registry.host}/{upstream.private.repo}:v1"
    public = f"{upstream.registry.host}/{upstream.public.repo}:v1"
    bob, alice = _basic("bob", USERS["bob"]), _basic("alice", USERS["alice"])
    mark = upstream.registry.clear_log_mark()
    status, body = _warm(mirror, [private], bob)  # may pull it, but is no operator
    assert status == 403 and _error_code(body) == "DENIED"
    assert _warm(mirror, [private], {})[0] == 401
    status, body = _warm(mirror, [public, private], alice)  # an operator, not for private/*
    assert status == 403 and b"private/app" in body
    status, _, _ = _call(f"{mirror.url}/admin/sync", "POST", body=b"{}", headers=bob)
    assert status == 403
    assert upstream.registry.requests_since(mark) == []  # nothing asked upstream
    status, body = _warm(mirror, [public], alice)
    assert status == 200, body
    end = json.loads(body.splitlines()[-1])
    assert end["event"] == "end" and end["failed"] == []
    assert [r["result"] for r in end["results"]] == ["warmed"]
    fetched = {e.path for e in upstream.registry.requests_since(mark) if e.method == "GET"}
    assert any(upstream.public.layers[0].digest in p for p in fetched)
    assert not any("private" in p for p in fetched)


def test_admin_requests_are_bounded(ops_mirror: MirrorProcess, upstream: Upstream) -> None:
    mirror = ops_mirror
    alice = _basic("alice", USERS["alice"])
    ref = f"{upstream.registry.host}/{upstream.public.repo}:v1"
    mark = upstream.registry.clear_log_mark()
    status, body = _warm(mirror, [ref] * 101, alice)
    assert status == 400 and b"refs" in body
    huge = json.dumps({"refs": [ref], "pad": "x" * 40_000}).encode()
    status, _, body = _call(f"{mirror.url}/admin/warm", "POST", body=huge, headers=alice)
    assert status == 413 and _error_code(body) == "SIZE_INVALID"
    assert upstream.registry.requests_since(mark) == []


# --- item 7: pages for operators only; one warning when open ----------------------------------
def test_pages_and_admin_reads_want_the_admin_role(ops_mirror: MirrorProcess) -> None:
    mirror = ops_mirror
    bob, alice = _basic("bob", USERS["bob"]), _basic("alice", USERS["alice"])
    for path in ("/", "/metrics", "/admin/popular", "/admin/sync"):
        assert _call(mirror.url + path, headers=bob)[0] == 403, path
        assert _call(mirror.url + path)[0] == 401, path
        assert _call(mirror.url + path, headers=alice)[0] == 200, path
    assert mirror.events("open_without_auth") == []


@pytest.mark.parametrize("workers", WORKERS)
def test_an_open_mirror_warns_once_and_admin_actions_want_the_local_token(
        upstream: Upstream, tmp_path: Path, workers: int) -> None:
    config = _config(upstream, tmp_path / "cache", workers, auth=False)
    ref = f"{upstream.registry.host}/{upstream.public.repo}:v1"
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        mark = upstream.registry.clear_log_mark()
        status, body = _warm(mirror, [ref], {})
        assert status == 401 and _error_code(body) == "UNAUTHORIZED"
        assert _warm(mirror, [ref], {"Authorization": "Bearer guessed-token"})[0] == 401
        assert _call(f"{mirror.url}/admin/sync", "POST", body=b"{}")[0] == 401
        assert upstream.registry.requests_since(mark) == []
        assert _call(f"{mirror.url}/")[0] == 200  # open, as the warning says
        done = subprocess.run([sys.executable, "-m", "mirror", "warm", ref, "--config",
                               str(mirror.config_path)], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 of 1 image(s) held" in done.stdout
        token = (tmp_path / "cache" / "admin.token")
        assert token.stat().st_mode & 0o077 == 0  # readable by the node's user only
    warnings = mirror.events("open_without_auth")
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert "upstream credentials" in warnings[0]["detail"]


# --- item 2: a warm whose client left is cancelled, unless detached ---------------------------
@pytest.mark.parametrize("workers", WORKERS)
async def test_a_warm_whose_client_left_is_cancelled_unless_detached(
        aiohttp_server: Any, tmp_path: Path, workers: int) -> None:
    fake = FakeRegistry()
    fake.add_image("slow", "v1", [b"first-layer-0123", b"second-layer-456"])
    # Not the same config blob as slow's (the same for the same platform): what a detached
    # warm does is this test's point, not following the fill of a cancelled one.
    fake.add_image("kept", "v1", [b"kept-layer-01234", b"kept-layer-56789"], arch="arm64")
    fake.fault(kind="drip", path="/blobs/", method="GET", chunk=1, delay=0.1)
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("")).rstrip("/")
    config = mirror_config(free_port(), tmp_path / "cache", [
        {"name": "fake.test", "url": url, "default": True, "retries": 0}])
    config["server"] = {"workers": workers}
    mirror = MirrorProcess(tmp_path / "mirror", config)
    await asyncio.to_thread(mirror.start, 30)
    token = (tmp_path / "cache" / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as session:
            leaving = await session.post(f"{mirror.url}/admin/warm", headers=headers,
                                         json={"refs": ["fake.test/slow:v1"]})
            assert leaving.status == 200
            async with asyncio.timeout(30):
                await fake.wait_for(lambda: fake.count("GET", "/blobs/") >= 1)
            leaving.close()  # the client hangs up while the layers drip
            await _logged(mirror, "admin_warm_cancelled")
            detached = await session.post(f"{mirror.url}/admin/warm", headers=headers,
                                          json={"refs": ["fake.test/kept:v1"], "detach": True})
            assert detached.status == 200
            await detached.content.readline()  # under way; then this client hangs up too
            detached.close()
        await _logged(mirror, "warm_done", "kept")
    finally:
        mirror.stop()
    done = mirror.events("warm_done")
    assert [e["result"] for e in done if "kept" in e["ref"]] == ["warmed"]
    assert not [e for e in done if "slow" in e["ref"]]  # cancelled: never finished
    cancelled = mirror.events("admin_warm_cancelled")
    assert len(cancelled) == 1 and cancelled[0]["refs"] == 1


async def _logged(mirror: MirrorProcess, event: str, needle: str = "",
                  seconds: float = 60) -> None:
    """Wait until the mirror's log has ``event`` (with ``needle`` in its ``ref``)."""
    try:
        async with asyncio.timeout(seconds):
            for _ in iter(int, 1):
                if [e for e in mirror.events(event) if needle in str(e.get("ref", ""))]:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no {event} {needle} in {seconds} s; the mirror's log ends:\n"
                             + mirror.log_tail()) from None


# --- item 7: /v2/ challenges, anonymous stays possible, users get their rights ----------------
def test_v2_challenges_so_clients_with_credentials_get_their_rights(
        mirror: MirrorProcess, upstream: Upstream, tmp_path: Path) -> None:
    status, headers, _ = _call(f"{mirror.url}/v2/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert _call(f"{mirror.url}/v2/", headers=_basic("", ""))[0] == 200  # ":" is anonymous
    public = f"/v2/{upstream.public.repo}/manifests/v1"
    assert _call(mirror.url + public)[0] == 200  # anonymous where the rules allow
    assert _call(mirror.url + public, headers=_basic("", ""))[0] == 200
    host = f"127.0.0.1:{mirror.port}"
    # bob may pull private/app, anonymous may not: skopeo sends bob's credentials now.
    dest = skopeo_copy(f"{host}/{upstream.private.repo}:v1", tmp_path / "bob",
                       src_creds=("bob", USERS["bob"]))
    assert manifest_digest(dest) == upstream.private.manifest.digest
    assert verify_dir(dest) == {b.digest: b.size for b in upstream.private.blobs()}
    dest = skopeo_copy(f"{host}/{upstream.public.repo}:v1", tmp_path / "anon")
    assert manifest_digest(dest) == upstream.public.manifest.digest
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|authentication required"):
        skopeo_copy(f"{host}/{upstream.private.repo}:v1", tmp_path / "anon-private")
    if podman_binary() is None:
        pytest.fail("podman is not installed (scripts/setup.sh --test installs it)")
    auth = write_auth_json(tmp_path / "auth.json", host, "bob", USERS["bob"])
    ref = f"{host}/{upstream.private.repo}:v1"
    assert podman_pull(ref, tmp_path / "podman", authfile=auth) == \
        upstream.private.manifest.digest
    with pytest.raises(PodmanError, match=r"(?i)unauthorized|authentication required"):
        podman_pull(ref, tmp_path / "podman-anon")


# --- item 4: a flood of wrong passwords is limited and does not lock others out ---------------
async def _login_statuses(url: str, source: str, headers: list[dict[str, str]]
                          ) -> list[tuple[int, str | None]]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(header: dict[str, str]) -> tuple[int, str | None]:
            async with session.get(url, headers=header) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After")

        return list(await asyncio.gather(*(one(h) for h in headers)))


@pytest.mark.parametrize("workers", WORKERS)
async def test_a_wrong_password_flood_is_limited_and_others_still_log_in(
        upstream: Upstream, tmp_path: Path, workers: int) -> None:
    config = _config(upstream, tmp_path / "cache", workers)  # 10 per address, 20 per user
    mirror = MirrorProcess(tmp_path / "mirror", config)
    await asyncio.to_thread(mirror.start, 30)
    url = f"{mirror.url}/v2/{upstream.public.repo}/manifests/v1"
    try:
        flood = [_basic("alice", f"wrong-{i}") for i in range(120)]
        results = await _login_statuses(url, "127.0.0.2", flood)
        statuses = [s for s, _ in results]
        # Each worker checks at most per_address of them; the rest never reach bcrypt.
        assert 1 <= statuses.count(401) <= 10 * workers
        assert statuses.count(429) == 120 - statuses.count(401)
        assert all(after is not None and int(after) >= 1 for s, after in results if s == 429)
        # bob, from another address, logs in while the flood goes on.
        during = asyncio.ensure_future(_login_statuses(url, "127.0.0.2", flood))
        bob = await _login_statuses(url, "127.0.0.3", [_basic("bob", USERS["bob"])])
        await during
        assert bob == [(200, None)]
        # alice's own account: wrong passwords from many addresses hit the per-user limit.
        spread = []
        for i in range(20 * workers + 1):
            spread += await _login_statuses(url, f"127.0.0.{10 + i}", [_basic("alice", f"x{i}")])
            if spread[-1][0] == 429:
                break
        assert spread[-1][0] == 429 and spread[-1][1] is not None
    finally:
        mirror.stop()
    assert any(e["scope"] == "address" for e in mirror.events("login_limit_reached"))
    assert "alice-secret-1" not in mirror.log_text() and "wrong-1" not in mirror.log_text()


# --- item 7: Docker's registry-mirrors pulls anonymously, and still does -----------------------
@pytest.fixture(scope="module")
def docker_hub(registry_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A Distribution standing in for Docker Hub, holding ``library/small``."""
    registry = Registry(tmp_path_factory.mktemp("hub"))
    registry.start()
    try:
        registry.push(make_image("library/small", "v1", fmt="docker",
                                 layers=[make_layer(5000, seed=1990)]))
        yield registry
    finally:
        registry.stop()


def test_docker_registry_mirrors_still_pulls_anonymously(
        upstream: Upstream, docker_hub: Registry, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.fail("dockerd (root) is needed: scripts/setup.sh --test installs docker.io")
    config = mirror_config(free_port(), tmp_path / "cache", [
        {"name": "docker.io", "url": docker_hub.url, "default": True}])
    config["auth"] = {"htpasswd": str(upstream.htpasswd), "anonymous": True}
    config["access"] = [{"who": ["anonymous"], "registries": ["docker.io"],
                         "repositories": ["library/*"]}]
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start(timeout=30)
    daemon = Dockerd(tmpfs_size="1g", daemon_config={
        "registry-mirrors": [mirror.url],
        "insecure-registries": [f"127.0.0.1:{mirror.port}"]})
    try:
        daemon.start()
        daemon.run("pull", "small:v1", timeout=180)
        pulled = daemon.run("image", "inspect", "--format", "{{json .RepoDigests}}",
                            "small:v1").stdout
        assert "sha256:" in pulled
    finally:
        daemon.stop()
        mirror.stop()
    requests = [e for e in mirror.events("request") if "docker/" in e["user_agent"]]
    # Its ping is not challenged (a Basic challenge would send it to Docker Hub) ...
    assert any(e["path"] == "/v2/" and e["status"] == 200 for e in requests)
    # ... and it pulls as anonymous, where the rules allow.
    assert any("/manifests/" in e["path"] and e["status"] == 200
               and e.get("user") == "anonymous" for e in requests)
