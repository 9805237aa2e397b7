"""The test infrastructure checked against Distribution directly (no mirror).

If these fail, every mirror integration test would fail for reasons that have
nothing to do with the mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.images import Image, Index, make_image, make_layer, standard_set
from tests.support.mirrorproc import mirror_config
from tests.support.net import free_port, http_status
from tests.support.registry import Registry, parse_access_log
from tests.support.skopeo import (
    SkopeoError,
    child_manifests,
    manifest_digest,
    skopeo_copy,
    verify_dir,
    write_registries_conf,
)
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.integration

STD = {item.repo.rsplit("/", 1)[1]: item for item in standard_set("std")}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _expected_blobs(item: Image | Index) -> dict[str, int]:
    return {blob.digest: blob.size for blob in item.blobs()}


def _copy_and_verify(registry: Registry, item: Image | Index, dest: Path) -> None:
    """Pull every platform with skopeo and check every digest against the source."""
    out = skopeo_copy(f"{registry.host}/{item.repo}:{item.tag}", dest, all_platforms=True)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == _expected_blobs(item)
    children = item.children if isinstance(item, Index) else []
    assert child_manifests(out) == {c.manifest.digest: c.manifest.size for c in children}


def test_images_are_self_consistent() -> None:
    for item in STD.values():
        images = item.children if isinstance(item, Index) else [item]
        if isinstance(item, Index):
            doc = json.loads(item.manifest.data)
            assert [m["digest"] for m in doc["manifests"]] == [
                c.manifest.digest for c in item.children
            ]
            assert {m["platform"]["architecture"] for m in doc["manifests"]} == {"amd64", "arm64"}
        for image in images:
            assert b'\n   "' in image.manifest.data  # indent=3, kept byte-exact
            doc = json.loads(image.manifest.data)
            assert doc["mediaType"] == image.manifest.media_type
            assert doc["config"]["digest"] == image.config.digest
            config = json.loads(image.config.data)
            for layer, diff_id in zip(image.layers, config["rootfs"]["diff_ids"], strict=True):
                raw = gzip.decompress(layer.data)
                assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
                with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                    assert len(tar.getmembers()) == 1
    assert standard_set("std")[0].manifest.digest == STD["docker-image"].manifest.digest


@pytest.mark.parametrize("name", sorted(STD))
def test_pull_anonymous(
    registry_anon: Registry, skopeo_bin: str, name: str, tmp_path: Path
) -> None:
    _copy_and_verify(registry_anon, STD[name], tmp_path / "out")


@pytest.mark.parametrize("name", sorted(STD))
def test_pull_with_token_auth(
    registry_token: Registry, token_server: TokenServer, skopeo_bin: str, name: str, tmp_path: Path
) -> None:
    before = len(token_server.token_requests)
    _copy_and_verify(registry_token, STD[name], tmp_path / "out")
    asked = token_server.token_requests[before:]
    assert asked, "skopeo never asked the token server"
    assert asked[0].query["service"] == [token_server.service]
    assert f"repository:{STD[name].repo}:pull" in asked[0].scopes


def test_token_registry_demands_a_bearer_token(
    registry_token: Registry, token_server: TokenServer
) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        _DIRECT.open(f"{registry_token.url}/v2/", timeout=5)
    info.value.close()
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{token_server.realm}"' in challenge
    repo = STD["oci-image"].repo
    url = f"{registry_token.url}/v2/{repo}/manifests/v1"
    assert http_status(url) == 401
    request = urllib.request.Request(
        url,
        headers={
            **registry_token.auth_header(repo, "pull"),
            "Accept": STD["oci-image"].manifest.media_type,
        },
    )
    with _DIRECT.open(request, timeout=5) as resp:
        assert resp.read() == STD["oci-image"].manifest.data


def test_pick_one_platform(registry_anon: Registry, skopeo_bin: str, tmp_path: Path) -> None:
    index = STD["docker-list"]
    assert isinstance(index, Index)
    arm = index.children[1]
    out = skopeo_copy(
        f"{registry_anon.host}/{index.repo}:v1",
        tmp_path / "out",
        override_arch="arm64",
        override_os="linux",
    )
    assert manifest_digest(out) == arm.manifest.digest
    assert verify_dir(out) == _expected_blobs(arm)


def test_access_log_counts_a_pull(registry_anon: Registry, skopeo_bin: str, tmp_path: Path) -> None:
    image = STD["docker-image"]
    mark = registry_anon.clear_log_mark()
    skopeo_copy(f"{registry_anon.host}/{image.repo}:v1", tmp_path / "out")
    got = registry_anon.requests_since(mark)
    blob_gets = [e for e in got if e.method == "GET" and "/blobs/" in e.path]
    assert {e.path.rsplit("/", 1)[1] for e in blob_gets} == set(_expected_blobs(image))
    assert sum(e.bytes for e in blob_gets) == sum(_expected_blobs(image).values())
    assert registry_anon.count("GET", path_contains=f"/{image.repo}/manifests/", since=mark) == 1
    assert registry_anon.count(path_regex=r"/blobs/sha256:[0-9a-f]{64}$", since=mark) == len(
        blob_gets
    )
    assert registry_anon.count("PUT", since=registry_anon.clear_log_mark()) == 0
    assert len(registry_anon.access_log()) >= len(got)


def test_parse_access_log_ignores_other_lines() -> None:
    text = (
        'time="2024" level=warning msg="hello"\n'
        '127.0.0.1 - - [22/Nov/2024:09:02:31 +0000] "GET /v2/a/b/blobs/sha256:ab HTTP/1.1" '
        '200 1234 "" "skopeo/1.9.3"\n'
        '127.0.0.1 - - [22/Nov/2024:09:02:31 +0000] "HEAD /v2/ HTTP/1.1" 401 87 "" ""\n'
    )
    entries = parse_access_log(text)
    assert [(e.method, e.status, e.bytes) for e in entries] == [
        ("GET", 200, 1234),
        ("HEAD", 401, 87),
    ]
    assert entries[0].user_agent == "skopeo/1.9.3"


def test_registries_conf_routes_to_the_mirror_only(
    registry_anon: Registry, skopeo_bin: str, tmp_path: Path
) -> None:
    image = STD["oci-image"]
    conf = write_registries_conf(tmp_path / "registries.conf", "registry.test", registry_anon.host)
    mark = registry_anon.clear_log_mark()
    out = skopeo_copy(f"registry.test/{image.repo}:v1", tmp_path / "out", registries_conf=conf)
    assert manifest_digest(out) == image.manifest.digest
    assert registry_anon.count("GET", path_contains=image.repo, since=mark) > 0
    # A dead mirror falls back to the primary, which is a closed port: no escape.
    dead = write_registries_conf(
        tmp_path / "dead.conf", "registry.test", f"127.0.0.1:{free_port()}"
    )
    with pytest.raises(SkopeoError, match="connection refused"):
        skopeo_copy(
            f"registry.test/{image.repo}:v1", tmp_path / "out2", registries_conf=dead, timeout=30
        )


def test_token_server_can_require_basic_credentials(
    registry_bin: str, skopeo_bin: str, tmp_path: Path
) -> None:
    server = TokenServer(tmp_path / "token", require_basic=("puller", "pullpass"))
    server.start()
    registry = Registry(tmp_path / "registry", token=server)
    try:
        registry.start()
        image = STD["oci-image"]
        registry.push(image)
        ref = f"{registry.host}/{image.repo}:v1"
        with pytest.raises(SkopeoError):
            skopeo_copy(ref, tmp_path / "anon", timeout=30)
        assert server.token_requests[-1].status == 401
        out = skopeo_copy(ref, tmp_path / "out", src_creds=("puller", "pullpass"))
        assert manifest_digest(out) == image.manifest.digest
        assert server.token_requests[-1].user == "puller"
        assert server.token_requests[-1].authorized
    finally:
        registry.stop()
        server.stop()


def test_htpasswd_registry(
    registry_bin: str, skopeo_bin: str, htpasswd_bin: str, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry", htpasswd=("user", "secret"))
    try:
        registry.start()
        image = STD["docker-image"]
        registry.push(image)
        assert http_status(f"{registry.url}/v2/") == 401
        out = skopeo_copy(
            f"{registry.host}/{image.repo}:v1", tmp_path / "out", src_creds=("user", "secret")
        )
        assert verify_dir(out) == _expected_blobs(image)
    finally:
        registry.stop()


def test_distribution_proxy_mode(registry_anon: Registry, skopeo_bin: str, tmp_path: Path) -> None:
    image = make_image("proxy/once", "v1", layers=[make_layer(100_000, seed=77)], fmt="oci")
    registry_anon.push(image)
    proxy = Registry(tmp_path / "proxy", proxy_remote=registry_anon.url)
    try:
        proxy.start()
        layer_gets = []
        for n in range(2):
            mark = registry_anon.clear_log_mark()
            out = skopeo_copy(f"{proxy.host}/{image.repo}:v1", tmp_path / f"out{n}")
            assert verify_dir(out) == _expected_blobs(image)
            layer_gets.append(
                registry_anon.count("GET", path_contains=image.layers[0].digest, since=mark)
            )
        # Distribution 2.8 fetches a cold blob from upstream twice (one stream
        # serves the client, a second one fills the cache), then never again.
        assert layer_gets[0] >= 1
        assert layer_gets[1] == 0
    finally:
        proxy.stop()


def test_big_image(
    big_image: Image, registry_anon: Registry, skopeo_bin: str, tmp_path: Path
) -> None:
    out = skopeo_copy(f"{registry_anon.host}/{big_image.repo}:v1", tmp_path / "out")
    sizes = verify_dir(out)
    assert sizes[big_image.layers[0].digest] > 64 << 20
    assert manifest_digest(out) == big_image.manifest.digest


def test_mirror_config_shape(tmp_path: Path) -> None:
    upstream = {"name": "registry.test", "url": "http://127.0.0.1:1", "default": True}
    config = mirror_config(4321, tmp_path / "store", [upstream])
    assert config == {
        "version": 1,
        "listen": "127.0.0.1:4321",
        "storage": {"path": str(tmp_path / "store")},
        "upstreams": [upstream],
        "log": {"format": "json", "level": "info"},
        "server": {"workers": 1},
    }
