"""Regional fleets as real processes: two regions of three nodes on 127.0.0.2-7 (one port),
a real Distribution upstream behind a throttle, skopeo pulling through every node.

Upstream downloads are counted from Distribution's own access log.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cluster import rendezvous, sign_token, token_scope
from tests.support.dnsserver import DnsServer
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.throttle import ThrottledProxy

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"
SECRET = "a-fleet-secret-for-the-tests"
MiB = 1 << 20
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Fleet:
    """Starts nodes on loopback addresses, all on one port; stops them at the end."""

    def __init__(self, tmp_path: Path, upstream_url: str) -> None:
        self.port = free_port()
        self.started: list[MirrorProcess] = []
        self._tmp = tmp_path
        self._upstream_url = upstream_url
        self._secret = tmp_path / "peer-secret"
        self._secret.write_text(SECRET)

    def __call__(self, region: str, addresses: list[str], parents: tuple[str, ...] = (),
                 **cluster: Any) -> list[MirrorProcess]:
        urls = [f"http://{a}:{self.port}" for a in addresses]
        nodes = []
        for address in addresses:
            config = mirror_config(self.port, self._tmp / f"cache-{address}", [
                {"name": UPSTREAM, "url": self._upstream_url, "default": True}])
            config["listen"] = f"{address}:{self.port}"
            config["cluster"] = {
                "node_id": f"{region}-{address}", "region": region,
                "self_url": f"http://{address}:{self.port}", "secret_file": str(self._secret),
                "peers": urls if "peers_dns" not in cluster else [],
                "parents": list(parents), "header_timeout": "500ms",
                "health_interval": "300ms", **cluster,
            }
            nodes.append(MirrorProcess(self._tmp / f"node-{address}", config))
        for node in nodes:
            node.start()
            self.started.append(node)
        if "peers_dns" not in cluster:  # every node sees the others healthy: the hash is whole
            _wait(lambda: all(_metric(n, "mirror_peer_members", state="healthy")
                              == len(nodes) - 1 for n in nodes))
        return nodes

    def stop(self) -> None:
        for node in self.started:
            node.resume()
            node.stop()


@pytest.fixture(scope="module")
def upstream(registry_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("fleet-registry"))
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture
def throttled(upstream: Registry) -> Iterator[ThrottledProxy]:
    proxy = ThrottledProxy("127.0.0.1", upstream.port, 24 * MiB)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fleet(tmp_path: Path, throttled: ThrottledProxy) -> Iterator[Fleet]:
    """Start nodes: ``fleet(region, addresses, parents=(...), **cluster)``."""
    starter = Fleet(tmp_path, throttled.url)
    yield starter
    starter.stop()


def _image(name: str, size: int, seed: int) -> Image:
    return make_image(name, "v1", layers=[make_layer(size, seed)], fmt="oci")


def _pull(node: MirrorProcess, image: Image, dest: Path) -> dict[str, int]:
    out = skopeo_copy(f"{node.host}:{node.port}/{image.repo}:{image.tag}", dest, timeout=180)
    return verify_dir(out)


def _pull_all(nodes: list[MirrorProcess], image: Image, tmp: Path) -> list[dict[str, int]]:
    results: list[Any] = [None] * len(nodes)

    def run(i: int) -> None:
        try:
            results[i] = _pull(nodes[i], image, tmp / f"pull-{i}-{time.monotonic_ns()}")
        except BaseException as exc:  # reported below, with the node's log
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, BaseException):
            raise AssertionError(f"pull through {node.url} failed: {result}\n"
                                 f"{node.log_tail(30)}") from result
    return results


def _metrics_text(node: MirrorProcess) -> str:
    with _DIRECT.open(f"{node.url}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _metric(node: MirrorProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in _metrics_text(node).splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        sample, _, rest = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if sample == name and labels.items() <= found.items():
            total += float(value)
    return total


def _blob_gets(registry: Registry, digest: str, since: int) -> int:
    return registry.count("GET", f"/blobs/{digest}", since=since)


def _owner(nodes: list[MirrorProcess], digest: str) -> MirrorProcess:
    ranked = rendezvous(digest, [n.url for n in nodes])
    return next(n for n in nodes if n.url == ranked[0])


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_a_layer_pulled_through_six_nodes_at_once_costs_one_upstream_download(
        upstream: Registry, fleet: Fleet, tmp_path: Path) -> None:
    image = _image("fleet/one", 24 * MiB, 801)
    upstream.push(image)
    east = fleet("east", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    west = fleet("west", ["127.0.0.5", "127.0.0.6", "127.0.0.7"], parents=(east[0].url,))
    mark = upstream.clear_log_mark()
    results = _pull_all([*east, *west], image, tmp_path)
    layer = image.layers[0].digest
    assert all(r[layer] == image.layers[0].size for r in results)
    assert _blob_gets(upstream, layer, mark) == 1
    assert _blob_gets(upstream, image.config.digest, mark) == 1
    served = sum(_metric(n, "mirror_peer_served_total", hop="peer", kind="blob") for n in east)
    assert served >= 2
    assert sum(_metric(n, "mirror_peer_served_total", hop="child", kind="blob")
               for n in east) >= 1


def test_the_owner_killed_mid_download_costs_at_most_one_more_download(
        upstream: Registry, fleet: Fleet, tmp_path: Path) -> None:
    image = _image("fleet/kill", 48 * MiB, 802)
    upstream.push(image)
    nodes = fleet("east", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    layer = image.layers[0].digest
    owner = _owner(nodes, layer)
    others = [n for n in nodes if n is not owner]
    mark = upstream.clear_log_mark()
    killer = threading.Thread(target=lambda: (_wait(
        lambda: _metric(owner, "mirror_fills_in_flight") >= 1
        and _metric(owner, "mirror_source_bytes_total", source="upstream") > 4 * MiB),
        owner.kill9()))
    killer.start()
    results = _pull_all(others, image, tmp_path)
    killer.join()
    assert all(r[layer] == image.layers[0].size for r in results)
    assert _blob_gets(upstream, layer, mark) <= 2


def test_the_owner_killed_mid_download_is_resumed_from_the_bytes_held(
        upstream: Registry, fleet: Fleet, tmp_path: Path) -> None:
    """Issue 20 item 10: the next node resumes with ``Range`` from what it streamed from
    the owner, rather than downloading the layer again from its first byte."""
    image = _image("fleet/resume", 128 * MiB, 806)
    upstream.push(image)
    nodes = fleet("east", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    layer = image.layers[0]
    owner = _owner(nodes, layer.digest)
    others = [n for n in nodes if n is not owner]
    mark = upstream.clear_log_mark()
    killer = threading.Thread(target=lambda: (_wait(
        lambda: _metric(owner, "mirror_source_bytes_total", source="upstream") > 24 * MiB,
        timeout=60), owner.kill9()))
    killer.start()
    results = _pull_all(others, image, tmp_path)
    killer.join()
    assert all(r[layer.digest] == layer.size for r in results)
    gets = [e for e in upstream.requests_since(mark)
            if e.method == "GET" and layer.digest in e.path]
    assert [e.status for e in gets].count(200) == 1, gets  # resumed, never started over
    # What upstream sent beyond the layer: the bytes in flight to the owner when it died
    # (socket buffers on both sides of the link, and what its followers had not read yet:
    # up to about 14 MiB here, whatever the layer's size). Starting over costs the layer.
    assert sum(e.bytes for e in gets) - layer.size <= 20 * MiB, gets


def test_a_range_on_a_miss_is_served_through_the_owner(
        upstream: Registry, fleet: Fleet) -> None:
    """Issue 23: a lazy client's footer read on a node that is not the owner: the node asks
    the owner for the range, the owner asks upstream for it, while the one full download
    (the owner's, streamed to the node) goes on."""
    image = _image("fleet/lazy", 48 * MiB, 807)
    upstream.push(image)
    nodes = fleet("east", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    layer = image.layers[0]
    owner = _owner(nodes, layer.digest)
    node = next(n for n in nodes if n is not owner)
    whole = _DIRECT.open(f"{upstream.url}/v2/{image.repo}/blobs/{layer.digest}").read()
    mark = upstream.clear_log_mark()
    request = urllib.request.Request(
        f"{node.url}/v2/{image.repo}/blobs/{layer.digest}?ns={UPSTREAM}",
        headers={"Range": "bytes=-51"})
    with _DIRECT.open(request, timeout=60) as resp:
        assert resp.status == 206 and resp.read() == whole[-51:]
    for served in (node, owner):
        assert _metric(served, "mirror_ranged_reads_total", result="ok") >= 1
    _wait(lambda: _metric(owner, "mirror_fills_in_flight") == 0, timeout=60)
    gets = [e for e in upstream.requests_since(mark)
            if e.method == "GET" and layer.digest in e.path]
    assert [e.status for e in gets].count(200) == 1, gets  # one full download, the owner's
    assert sum(e.bytes for e in gets) <= 1.05 * layer.size


def test_a_peer_that_serves_wrong_bytes_is_quarantined_and_the_pull_succeeds(
        upstream: Registry, fleet: Fleet, tmp_path: Path) -> None:
    image = _image("fleet/wrong", 3 * MiB, 803)
    upstream.push(image)
    nodes = fleet("east", ["127.0.0.2", "127.0.0.3"])
    layer = image.layers[0]
    owner = _owner(nodes, layer.digest)
    other = next(n for n in nodes if n is not owner)
    _pull(owner, image, tmp_path / "owner")
    stored = Path(owner.config["storage"]["path"]) / "blobs" / "sha256" / \
        layer.digest[7:9] / layer.digest[7:]
    stored.write_bytes(b"x" * layer.size)  # bit rot on the owner's disk, same size
    url = f"{other.url}/v2/{image.repo}/blobs/{layer.digest}"
    # Either the fill starts over from upstream before the client read a byte, or the client
    # is cut before its last byte and its retry goes straight past the peer.
    body = None
    for _ in range(2):
        try:
            with _DIRECT.open(url, timeout=30) as resp:
                body = resp.read()
            break
        except (http.client.HTTPException, urllib.error.URLError, OSError):
            continue
    assert body == layer.data
    assert _metric(other, "mirror_peer_quarantines_total") == 1
    assert _metric(other, "mirror_source_fills_total", source="peer", result="rejected") == 1
    results = _pull(other, image, tmp_path / "other")
    assert results[layer.digest] == layer.size


def test_a_blocked_peer_is_passed_over_and_comes_back(
        upstream: Registry, fleet: Fleet, tmp_path: Path) -> None:
    image = _image("fleet/blocked", 2 * MiB, 804)
    upstream.push(image)
    nodes = fleet("east", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    layer = image.layers[0].digest
    owner = _owner(nodes, layer)
    others = [n for n in nodes if n is not owner]
    owner.pause()
    try:
        results = _pull_all(others, image, tmp_path)
        assert all(r[layer] == image.layers[0].size for r in results)
        _wait(lambda: all(_metric(n, "mirror_peer_members", state="healthy") == 1
                          for n in others))
    finally:
        owner.resume()
    _wait(lambda: all(_metric(n, "mirror_peer_members", state="healthy") == 2 for n in others))


def test_membership_follows_dns(upstream: Registry, fleet: Fleet) -> None:
    dns = DnsServer("mirror-peers.fleet.test")
    dns.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    dns.start()
    try:
        options = {"peers_dns": {"name": "mirror-peers.fleet.test", "port": fleet.port,
                                 "nameserver": dns.nameserver, "interval": "500ms"}}
        nodes = fleet("east", list(dns.addresses), **options)

        def healthy(count: int, among: list[MirrorProcess]) -> bool:
            return all(_metric(n, "mirror_peer_members", state="healthy") == count
                       for n in among)

        _wait(lambda: healthy(2, nodes))
        # A node added to the DNS answer joins every node's hash ...
        dns.addresses.append("127.0.0.5")
        nodes += fleet("east", ["127.0.0.5"], **options)
        _wait(lambda: healthy(3, nodes))
        # ... and one taken out of it (scaled down) leaves it within seconds.
        dns.addresses.remove("127.0.0.3")
        nodes[1].stop()
        rest = [n for n in nodes if n.host != "127.0.0.3"]
        _wait(lambda: healthy(2, rest))
        assert all(_metric(n, "mirror_peer_members", state="known") == 2 for n in rest)
    finally:
        dns.stop()


def test_the_peer_api_refuses_without_a_token_and_serves_digests_only(
        upstream: Registry, fleet: Fleet) -> None:
    image = _image("fleet/api", 64 * 1024, 805)
    upstream.push(image)
    node = fleet("east", ["127.0.0.2"])[0]
    mark = upstream.clear_log_mark()
    blob = f"{node.url}/_peer/v2/{image.repo}/blobs/{image.layers[0].digest}?ns={UPSTREAM}"
    for headers in ({}, {"Authorization": "Bearer nonsense"},
                    _peer_auth(blob, secret="another-secret-entirely"),
                    _peer_auth(blob, expires=-5),
                    _peer_auth(blob, method="HEAD"),  # made for a HEAD, used for a GET
                    _peer_auth(blob.replace(node.url, "http://127.0.0.9:1")),  # another node
                    _peer_auth(blob.replace("blobs", "manifests"))):  # another path
        status, body = _status(blob, headers)
        assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED"
    manifest = f"{node.url}/_peer/v2/{image.repo}/manifests/v1?ns={UPSTREAM}"
    assert _status(manifest, _peer_auth(manifest))[0] == 404
    tags = f"{node.url}/_peer/v2/{image.repo}/tags/list?ns={UPSTREAM}"
    assert _status(tags, _peer_auth(tags))[0] == 404
    elsewhere = f"{node.url}/_peer/v2/x/blobs/{image.layers[0].digest}?ns=elsewhere.example.com"
    status, body = _status(elsewhere, _peer_auth(elsewhere))
    assert status == 404 and body["errors"][0]["code"] == "NAME_UNKNOWN"
    assert upstream.count(since=mark) == 0  # nothing above reached the upstream
    assert _status(blob, _peer_auth(blob))[0] == 200


def _peer_auth(url: str, method: str = "GET", *, secret: str = SECRET,
               expires: float = 30) -> dict[str, str]:
    """The Authorization header of a peer token made for ``method`` on ``url``."""
    audience, path = token_scope(url)
    token = sign_token(secret, "peer", time.time() + expires, audience=audience,
                       method=method, path=path)
    return {"Authorization": f"Bearer {token}"}


def _status(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with _DIRECT.open(request, timeout=30) as resp:
            return resp.status, None
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None
