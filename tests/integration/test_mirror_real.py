"""The tests of record: the mirror as a real process in front of real Distribution.

skopeo (a real client) pulls every kind of image through the mirror, by tag
and by digest, in each routing mode, and every digest is checked. Upstream
requests are counted from Distribution's own access log.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.containerd import Containerd
from tests.support.images import Blob, Image, Index, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import (
    child_manifests,
    manifest_digest,
    skopeo_copy,
    verify_dir,
    write_registries_conf,
)
from tests.support.throttle import ThrottledProxy

pytestmark = pytest.mark.integration

UPSTREAM_NAME = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
StartMirror = Callable[..., MirrorProcess]


@pytest.fixture
def start_mirror(mirrors: Mirrors) -> StartMirror:
    """Start mirrors in front of a registry (alias ``reg``); all are stopped at the end."""
    return functools.partial(mirrors.start, upstream=UPSTREAM_NAME, aliases=["reg"])


def _flat(root: Path, label: str) -> Path:
    return root / label.replace("/", "_")


def _expected_blobs(item: Image | Index) -> dict[str, int]:
    return {blob.digest: blob.size for blob in item.blobs()}


def _pull_and_verify(ref: str, item: Image | Index, dest: Path,
                     registries_conf: Path | None = None) -> None:
    out = skopeo_copy(ref, dest, all_platforms=True, registries_conf=registries_conf)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == _expected_blobs(item)
    children = item.children if isinstance(item, Index) else []
    assert child_manifests(out) == {c.manifest.digest: c.manifest.size for c in children}


@pytest.mark.parametrize("auth", ["anonymous", "bearer"])
def test_skopeo_pulls_every_image_by_tag_and_digest_and_second_pull_is_local(
        auth: str, request: pytest.FixtureRequest, start_mirror: StartMirror,
        std_images: list[Image | Index], tmp_path: Path) -> None:
    registry: Registry = request.getfixturevalue(
        "registry_anon" if auth == "anonymous" else "registry_token")
    mirror = start_mirror(registry.url)
    host = f"127.0.0.1:{mirror.port}"
    for item in std_images:
        _pull_and_verify(f"{host}/{item.repo}:{item.tag}", item,
                         _flat(tmp_path, f"tag-{item.repo}"))
        _pull_and_verify(f"{host}/{item.repo}@{item.manifest.digest}", item,
                         _flat(tmp_path, f"digest-{item.repo}"))
    mark = registry.clear_log_mark()
    for item in std_images:
        _pull_and_verify(f"{host}/{item.repo}:{item.tag}", item,
                         _flat(tmp_path, f"again-{item.repo}"))
        _pull_and_verify(f"{host}/{item.repo}@{item.manifest.digest}", item,
                         _flat(tmp_path, f"again-digest-{item.repo}"))
    assert registry.count(path_contains="/blobs/", since=mark) == 0
    assert registry.count(path_contains="/manifests/", since=mark) == 0


def test_cold_pull_fetches_each_blob_once(registry_anon: Registry, start_mirror: StartMirror,
                                          std_images: list[Image | Index],
                                          tmp_path: Path) -> None:
    mark = registry_anon.clear_log_mark()
    mirror = start_mirror(registry_anon.url)
    item = next(i for i in std_images if isinstance(i, Index))
    _pull_and_verify(f"127.0.0.1:{mirror.port}/{item.repo}:{item.tag}", item, tmp_path / "out")
    blob_gets = [e.path for e in registry_anon.requests_since(mark)
                 if e.method == "GET" and "/blobs/" in e.path]
    assert sorted(blob_gets) == sorted(set(blob_gets))
    assert len(blob_gets) == len(_expected_blobs(item))


@pytest.mark.parametrize("mode", ["path-prefix", "default"])
def test_skopeo_through_registries_conf_mirror(mode: str, registry_anon: Registry,
                                               start_mirror: StartMirror,
                                               std_images: list[Image | Index],
                                               tmp_path: Path) -> None:
    mirror = start_mirror(registry_anon.url)
    location = f"127.0.0.1:{mirror.port}"
    if mode == "path-prefix":
        location += f"/{UPSTREAM_NAME}"  # skopeo sends /v2/registry.test/<repo>/...
    conf = write_registries_conf(tmp_path / "registries.conf", UPSTREAM_NAME, location)
    for item in std_images:
        _pull_and_verify(f"{UPSTREAM_NAME}/{item.repo}:{item.tag}", item,
                         _flat(tmp_path, f"{mode}-{item.repo}"), registries_conf=conf)


def _get(url: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with _DIRECT.open(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def test_containerd_style_pull_with_ns(registry_anon: Registry, start_mirror: StartMirror,
                                       std_images: list[Image | Index]) -> None:
    """What containerd sends: HEAD by tag, then GETs by digest, all with ?ns=."""
    mirror = start_mirror(registry_anon.url)
    ns = f"ns={registry_anon.host}"
    accept = ("application/vnd.docker.distribution.manifest.v2+json, "
              "application/vnd.docker.distribution.manifest.list.v2+json, "
              "application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.oci.image.index.v1+json, */*")
    for item in std_images:
        base = f"{mirror.url}/v2/{item.repo}"
        status, headers, _ = _get(f"{base}/manifests/{item.tag}?{ns}", {"Accept": accept}, "HEAD")
        assert status == 200
        assert headers["Docker-Content-Digest"] == item.manifest.digest
        assert headers["Content-Length"] == str(item.manifest.size)
        assert headers["OCI-Namespace"] == registry_anon.host
        images = item.children if isinstance(item, Index) else [item]
        for image in images:
            _, _, body = _get(f"{base}/manifests/{image.manifest.digest}?{ns}", {"Accept": accept})
            assert hashlib.sha256(body).hexdigest() == image.manifest.digest.split(":")[1]
            for blob in image.blobs():
                _, _, data = _get(f"{base}/blobs/{blob.digest}?{ns}")
                assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


def test_containerd_pulls_through_the_mirror_with_ns(
        registry_anon: Registry, containerd: Containerd, start_mirror: StartMirror,
        std_images: list[Image | Index]) -> None:
    """containerd resolves with HEAD and sends ?ns= on every request; it verifies digests."""
    mirror = start_mirror(registry_anon.url)
    hosts = containerd.hosts_dir(registry_anon.host, mirror.url)
    for item in std_images:
        containerd.fetch(f"{registry_anon.host}/{item.repo}:{item.tag}", hosts)
    stored = containerd.content_digests()
    for item in std_images:
        assert item.manifest.digest in stored
        assert set(_expected_blobs(item)) <= stored
    requests = [r for r in map(_json_line, mirror.log_text().splitlines())
                if r.get("event") == "request"]
    api = [r for r in requests if r.get("route") in ("manifest", "blob")]
    assert api and all(r.get("ns") == registry_anon.host for r in api)
    assert any(r["method"] == "HEAD" and r["route"] == "manifest" for r in api)
    assert all(r["status"] == 200 for r in api)


def test_herd_of_20_clients_costs_one_upstream_download(
        registry_anon: Registry, big_image: Image, start_mirror: StartMirror) -> None:
    """20 clients ask for one cold 64 MiB layer at once, upstream slowed to 32 MiB/s."""
    proxy = ThrottledProxy("127.0.0.1", int(registry_anon.host.split(":")[1]), 32 << 20)
    proxy.start()
    try:
        mark = registry_anon.clear_log_mark()
        mirror = start_mirror(proxy.url)
        layer = big_image.layers[0]
        url = f"{mirror.url}/v2/{big_image.repo}/blobs/{layer.digest}"
        results = asyncio.run(_herd(url, 20))
    finally:
        proxy.stop()
    assert all(digest == layer.digest for digest, _, _ in results)
    first_bytes = [first for _, first, _ in results]
    finished = [done for _, _, done in results]
    # Streaming, not store-and-forward: every client had bytes before anyone finished.
    assert max(first_bytes) < min(finished)
    gets = registry_anon.count("GET", path_contains=f"/blobs/{layer.digest}", since=mark)
    assert gets == 1


async def _herd(url: str, clients: int) -> list[tuple[str, float, float]]:
    async def one(session: aiohttp.ClientSession) -> tuple[str, float, float]:
        hasher, first = hashlib.sha256(), 0.0
        async with session.get(url) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(1 << 20):
                first = first or time.monotonic()
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest(), first, time.monotonic()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     auto_decompress=False) as session:
        return await asyncio.gather(*(one(session) for _ in range(clients)))


def test_restart_serves_from_disk_and_upstream_down_serves_stale(
        registry_bin: str, std_images: list[Image | Index], start_mirror: StartMirror,
        tmp_path: Path) -> None:
    """Tags and content survive a restart; with upstream gone, tags are served stale."""
    registry = Registry(tmp_path / "registry")
    registry.start()
    item = std_images[0]
    try:
        registry.push(item)
        first = start_mirror(registry.url, cache={"tag_ttl": "1s"})
        _pull_and_verify(f"127.0.0.1:{first.port}/{item.repo}:{item.tag}", item, tmp_path / "a")
        first.stop()
    finally:
        registry.stop()
    time.sleep(1.1)  # let the tag's TTL run out so the mirror must ask upstream, and fail
    second = start_mirror(registry.url, cache={"tag_ttl": "1s"})
    _pull_and_verify(f"127.0.0.1:{second.port}/{item.repo}:{item.tag}", item, tmp_path / "b")
    assert "tag_served_stale" in second.log_text()
    with pytest.raises(urllib.error.HTTPError) as error:
        _get(f"{second.url}/v2/{item.repo}/manifests/never-pulled")
    assert error.value.code in (502, 503, 504)
    body = json.loads(error.value.read())
    error.value.close()
    assert body["errors"][0]["code"] == "UNAVAILABLE"


# --- conformance beyond the upstream: tag pages and referrers ---------------------------


def _get_json(url: str) -> tuple[Any, dict[str, str]]:
    with _DIRECT.open(url, timeout=30) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def test_tag_list_pages_are_cut_here_when_distribution_ignores_last(
        registry_anon: Registry, start_mirror: StartMirror) -> None:

    image = make_image("pages/app", "a", layers=[make_layer(1000, 71)], fmt="oci")
    registry_anon.push(image)
    tags = ["a", "b", "c", "d", "e", "v1.0", "v10", "v2"]
    registry_anon.push_raw("pages/app", [], [(image.manifest, tag) for tag in tags[1:]])
    mirror = start_mirror(registry_anon.url)
    seen: list[str] = []
    url = f"{mirror.url}/v2/pages/app/tags/list?n=3"
    for _ in range(10):
        body, headers = _get_json(url)
        assert len(body["tags"]) <= 3
        seen.extend(body["tags"])
        link = headers.get("Link")
        if link is None:
            break
        url = mirror.url + link[link.index("<") + 1:link.index(">")]
    assert seen == sorted(tags)
    body, _ = _get_json(f"{mirror.url}/v2/pages/app/tags/list?last=d")
    assert body["tags"] == ["e", "v1.0", "v10", "v2"]


def test_referrers_from_the_tag_schema_when_the_upstream_has_no_api(
        registry_anon: Registry, start_mirror: StartMirror) -> None:

    subject = make_image("signed/app", "v1", layers=[make_layer(2000, 72)], fmt="oci")
    registry_anon.push(subject)
    empty = Blob.of(b"{}", "application/vnd.oci.empty.v1+json")
    artifacts, blobs, manifests = [], [empty], []
    for artifact_type, payload in (
            ("application/vnd.dev.cosign.artifact.sig.v1+json", b"signature"),
            ("application/spdx+json", b'{"spdxVersion": "SPDX-2.3"}')):
        layer = Blob.of(payload, artifact_type)
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST_TYPE,
                    "artifactType": artifact_type, "config": empty.descriptor(),
                    "layers": [layer.descriptor()], "subject": subject.manifest.descriptor()}
        manifest = Blob.of(json.dumps(document).encode(), OCI_MANIFEST_TYPE)
        blobs.append(layer)
        manifests.append((manifest, manifest.digest))
        artifacts.append({**manifest.descriptor(), "artifactType": artifact_type})
    # What cosign and oras push to a registry without the referrers API.
    index = Blob.of(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX_TYPE,
                                "manifests": artifacts}).encode(), OCI_INDEX_TYPE)
    manifests.append((index, "sha256-" + subject.manifest.digest.split(":")[1]))
    registry_anon.push_raw("signed/app", blobs, manifests)
    mirror = start_mirror(registry_anon.url)
    base = f"{mirror.url}/v2/signed/app/referrers/{subject.manifest.digest}"
    body, headers = _get_json(base)
    assert headers["Content-Type"] == OCI_INDEX_TYPE
    assert [m["digest"] for m in body["manifests"]] == [a["digest"] for a in artifacts]
    body, headers = _get_json(base + "?artifactType=application/spdx%2Bjson")
    assert [m["artifactType"] for m in body["manifests"]] == ["application/spdx+json"]
    assert headers["OCI-Filters-Applied"] == "artifactType"
    body, _ = _get_json(f"{mirror.url}/v2/signed/app/referrers/{subject.config.digest}")
    assert body == {"schemaVersion": 2, "mediaType": OCI_INDEX_TYPE, "manifests": []}


OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def _json_line(line: str) -> dict[str, Any]:
    try:
        found = json.loads(line)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
