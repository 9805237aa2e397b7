"""Private stays private across registries (issue 19, item 1), end to end.

Two real Distribution registries behind one mirror process: ``quay.io`` with
token auth like Docker Hub's (the mirror holds credentials: private content
exists) and ``docker.io`` without credentials. htpasswd users alice (everything)
and bob (only ``docker.io`` ``library/small-01``), and anonymous (only
``docker.io`` ``library/small-09``). After alice pulls ``quay.io/library/small-02``
its content is cached once; naming its digests under ``docker.io`` (as bob, as
anonymous, or through the peer API with ``?ns=docker.io``) must answer 404,
because docker.io does not hold them. A layer that both registries really hold
is still served under both from the one copy, confirmed with one ``HEAD``.
Runs with one worker and with two (the facts are node-wide: SQLite in the
storage folder), and across a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror.cluster import sign_token, token_scope
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry, write_htpasswd
from tests.support.skopeo import manifest_digest, skopeo_copy
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.integration

UPSTREAM_USER, UPSTREAM_PASSWORD = "quay-bot", "quay-secret-4242"
USERS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
PEER_SECRET = "peer-secret-0123456789"


@dataclass
class Rig:
    quay: Registry
    docker: Registry
    mirror: MirrorProcess
    private: Image  # quay.io/library/small-02:v1, with the shared layer
    small01: Image  # docker.io/library/small-01:v1, with the shared layer
    small09: Image  # docker.io/library/small-09:v1

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.mirror.port}"


@pytest.fixture(scope="module", params=[1, 2], ids=["workers1", "workers2"])
def rig(request: pytest.FixtureRequest, registry_bin: str, htpasswd_bin: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp(f"isolation-w{request.param}")
    tokens = TokenServer(work / "token", service="quay.test",
                         require_basic=(UPSTREAM_USER, UPSTREAM_PASSWORD))
    tokens.start()
    quay = Registry(work / "quay", token=tokens)
    docker = Registry(work / "docker")
    quay.start()
    docker.start()
    shared = make_layer(40_000, seed=1901)
    private = make_image("library/small-02", "v1", fmt="oci",
                         layers=[make_layer(60_000, seed=1902), shared])
    small01 = make_image("library/small-01", "v1", fmt="docker",
                         layers=[make_layer(3000, seed=1903), shared])
    small09 = make_image("library/small-09", "v1", fmt="docker",
                         layers=[make_layer(2000, seed=1904)])
    quay.push(private)
    docker.push(small01)
    docker.push(small09)
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, USERS, htpasswd_bin)
    (work / "quay.pw").write_text(UPSTREAM_PASSWORD)
    (work / "peer.secret").write_text(PEER_SECRET)
    port = free_port()
    config = mirror_config(port, work / "cache", [
        {"name": "docker.io", "url": docker.url, "default": True},
        {"name": "quay.io", "url": quay.url, "username": UPSTREAM_USER,
         "password_file": str(work / "quay.pw")}])
    config["server"] = {"workers": request.param}
    config["auth"] = {"htpasswd": str(htpasswd), "anonymous": True}
    config["access"] = [
        {"who": ["user:alice"], "registries": ["*"], "repositories": ["*"]},
        {"who": ["user:bob"], "registries": ["docker.io"], "repositories": ["library/small-01"]},
        {"who": ["anonymous"], "registries": ["docker.io"],
         "repositories": ["library/small-09"]},
    ]
    config["cluster"] = {"node_id": "iso-a", "self_url": f"http://127.0.0.1:{port}",
                         "secret_file": str(work / "peer.secret")}
    mirror = MirrorProcess(work / "mirror", config)
    mirror.start()
    try:
        yield Rig(quay, docker, mirror, private, small01, small09)
    finally:
        mirror.stop()
        quay.stop()
        docker.stop()
        tokens.stop()


def _basic(user: str) -> dict[str, str]:
    pair = f"{user}:{USERS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def _peer(url: str, method: str = "GET") -> dict[str, str]:
    audience, path = token_scope(url)
    token = sign_token(PEER_SECRET, "iso-b", time.time() + 30, audience=audience,
                       method=method, path=path)
    return {"Authorization": f"Bearer {token}"}


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def _pull(rig: Rig, name: str, image: Image, user: str | None) -> None:
    """Pull ``image`` as ``name`` (with a registry prefix or not) over HTTP as ``user``,
    checking every digest. (skopeo sends no credentials while ``/v2/`` lets anonymous
    in: ``auth.anonymous``; its anonymous pulls are tested below.)"""
    headers = _basic(user) if user else {}
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                        "application/vnd.docker.distribution.manifest.v2+json"}
    status, body = _get(f"{rig.mirror.url}/v2/{name}/manifests/{image.tag}",
                        {**headers, **accept})
    assert status == 200, body[:300]
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest.digest
    for blob in (image.config, *image.layers):
        status, body = _get(f"{rig.mirror.url}/v2/{name}/blobs/{blob.digest}", headers)
        assert status == 200, body[:300]
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest


def _alice_pulls(rig: Rig) -> None:
    _pull(rig, f"quay.io/{rig.private.repo}", rig.private, "alice")


def _leaks(rig: Rig) -> list[tuple[str, str, dict[str, str], str]]:
    """The four ways the issue read quay.io content under docker.io names."""
    base = rig.mirror.url
    config = rig.private.config.digest
    manifest = rig.private.manifest.digest
    peer_blob = f"{base}/_peer/v2/library/small-01/blobs/{config}?ns=docker.io"
    peer_manifest = f"{base}/_peer/v2/library/small-01/manifests/{manifest}?ns=docker.io"
    return [
        ("bob blob", f"{base}/v2/library/small-01/blobs/{config}", _basic("bob"),
         "BLOB_UNKNOWN"),
        ("anonymous blob", f"{base}/v2/library/small-09/blobs/{config}", {}, "BLOB_UNKNOWN"),
        ("bob manifest", f"{base}/v2/library/small-01/manifests/{manifest}", _basic("bob"),
         "MANIFEST_UNKNOWN"),
        ("peer blob", peer_blob, _peer(peer_blob), "BLOB_UNKNOWN"),
        ("peer manifest", peer_manifest, _peer(peer_manifest), "MANIFEST_UNKNOWN"),
    ]


def test_quay_content_is_never_served_under_docker_io_names(rig: Rig, tmp_path: Path) -> None:
    _alice_pulls(rig)
    mark = rig.docker.clear_log_mark()
    for name, url, headers, code in _leaks(rig):
        for method in ("GET", "HEAD"):
            # a peer token is made for one method
            sent = _peer(url, method) if "/_peer/" in url else headers
            status, body = _get(url, sent, method)
            assert status == 404, (name, method, status, body[:200])
            if method == "GET":
                assert _code(body) == code, (name, body[:200])
    # docker.io was asked (it does not have them) and never sent their bytes
    asked = rig.docker.requests_since(mark)
    assert asked and all(e.status == 404 and e.method == "HEAD" for e in asked), asked
    # alice still reads them where they belong, from the cache, and a peer under quay.io
    mark = rig.quay.clear_log_mark()
    config = rig.private.config
    status, body = _get(f"{rig.mirror.url}/v2/quay.io/{rig.private.repo}/blobs/{config.digest}",
                        _basic("alice"))
    assert status == 200 and len(body) == config.size
    peer = f"{rig.mirror.url}/_peer/v2/{rig.private.repo}/blobs/{config.digest}?ns=quay.io"
    assert _get(peer, _peer(peer))[0] == 200
    assert rig.quay.requests_since(mark) == []


def test_a_layer_both_registries_hold_is_served_under_both_from_one_copy(
        rig: Rig, tmp_path: Path) -> None:
    _alice_pulls(rig)
    shared = rig.small01.layers[-1]
    assert shared.digest == rig.private.layers[-1].digest
    mark = rig.docker.clear_log_mark()
    url = f"{rig.mirror.url}/v2/library/small-01/blobs/{shared.digest}"
    for _ in range(3):
        status, body = _get(url, _basic("bob"))
        assert status == 200 and len(body) == shared.size
    seen = [(e.method, e.path, e.status) for e in rig.docker.requests_since(mark)]
    # confirmed with one HEAD under library/small-01, served from the one cached copy
    assert seen == [("HEAD", f"/v2/library/small-01/blobs/{shared.digest}", 200)], seen
    _pull(rig, rig.small01.repo, rig.small01, "bob")
    blobs = rig.mirror.workdir.parent / "cache"
    copies = [p for p in blobs.rglob(shared.digest.split(":")[1]) if p.is_file()]
    assert len(copies) == 1, copies
    # anonymous may pull small-09, and nothing of quay's through it
    dest = skopeo_copy(f"{rig.host}/{rig.small09.repo}:v1", tmp_path / "anon")
    assert manifest_digest(dest) == rig.small09.manifest.digest


def test_what_is_known_survives_a_restart(rig: Rig, tmp_path: Path) -> None:
    _alice_pulls(rig)
    rig.mirror.stop()
    rig.mirror.start()
    mark = rig.quay.clear_log_mark()
    layer = rig.private.layers[0]
    status, body = _get(f"{rig.mirror.url}/v2/quay.io/{rig.private.repo}/blobs/{layer.digest}",
                        _basic("alice"))
    assert status == 200 and len(body) == layer.size
    assert rig.quay.requests_since(mark) == []  # known: no upstream confirmation needed
    for name, url, headers, _ in _leaks(rig):
        assert _get(url, headers)[0] == 404, name


def test_a_missing_tag_is_asked_upstream_once_per_negative_ttl(rig: Rig) -> None:
    """(Issue 19, item 7, on the same rig.) 20 requests for a tag docker.io does not
    have, spread over the workers: one upstream GET for the node within negative_ttl."""
    mark = rig.docker.clear_log_mark()
    for _ in range(20):
        status, body = _get(f"{rig.mirror.url}/v2/library/small-01/manifests/no-such-tag",
                            _basic("bob"))
        assert status == 404 and _code(body) == "MANIFEST_UNKNOWN", body[:200]
    asked = [e for e in rig.docker.requests_since(mark) if "no-such-tag" in e.path]
    assert [(e.method, e.status) for e in asked] == [("GET", 404)], asked
