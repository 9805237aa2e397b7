"""Who may pull what, end to end: real clients log in to the mirror, real Distribution behind it.

The mirror runs as a process with ``auth`` (an htpasswd file written by
Apache's ``htpasswd -B``, a static token) and ``access`` rules: alice may
pull ``private/app`` and ``public/*``, bob only ``public/base``. Upstream is
Distribution with Basic auth, so the mirror holds credentials and private
content exists. skopeo logs in with ``--src-creds`` and with an ``auth.json``,
podman with an ``auth.json``, containerd with a ``hosts.toml`` header; each
with good, wrong and missing credentials. Wrong or missing credentials never
reach upstream (counted in Distribution's access log); the mirror's log names
the user, never the secret.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
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

UPSTREAM_USER, UPSTREAM_PASSWORD = "mirror-bot", "upstream-secret-42"
USERS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
CI_TOKEN = "ci-token-abcdefghijklmnop"


@dataclass
class Rig:
    registry: Registry
    mirror: MirrorProcess
    private: Image
    public: Image

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.mirror.port}"


@pytest.fixture(scope="module")
def rig(registry_bin: str, htpasswd_bin: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("access")
    registry = Registry(work / "registry", htpasswd=(UPSTREAM_USER, UPSTREAM_PASSWORD))
    registry.start()
    private = make_image("private/app", "v1", fmt="oci",
                         layers=[make_layer(300_000, seed=901), make_layer(1000, seed=902)])
    public = make_image("public/base", "v1", fmt="docker", layers=[make_layer(2000, seed=903)])
    for item in (private, public):
        registry.push(item)
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, USERS, htpasswd_bin)
    (work / "upstream.pw").write_text(UPSTREAM_PASSWORD)
    (work / "ci.token").write_text(CI_TOKEN)
    config = mirror_config(free_port(), work / "cache", [{
        "name": registry.host, "url": registry.url, "default": True,
        "username": UPSTREAM_USER, "password_file": str(work / "upstream.pw")}])
    config["auth"] = {"htpasswd": str(htpasswd),
                      "tokens": [{"name": "ci", "token_file": str(work / "ci.token")}]}
    config["access"] = [
        {"who": ["user:alice", "user:ci"], "repositories": ["private/app", "public/*"]},
        {"who": ["user:bob"], "repositories": ["public/base"]},
    ]
    mirror = MirrorProcess(work / "mirror", config)
    mirror.start()
    try:
        yield Rig(registry, mirror, private, public)
    finally:
        mirror.stop()
        registry.stop()


def _pull_ok(rig: Rig, image: Image, out: Path, **creds: object) -> None:
    dest = skopeo_copy(f"{rig.host}/{image.repo}:{image.tag}", out, **creds)  # type: ignore[arg-type]
    assert manifest_digest(dest) == image.manifest.digest
    assert verify_dir(dest) == {b.digest: b.size for b in image.blobs()}


def test_skopeo_with_src_creds_good_wrong_and_missing(rig: Rig, tmp_path: Path) -> None:
    _pull_ok(rig, rig.private, tmp_path / "alice", src_creds=("alice", USERS["alice"]))
    mark = rig.registry.clear_log_mark()
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|authentication required"):
        skopeo_copy(f"{rig.host}/{rig.private.repo}:v1", tmp_path / "wrong",
                    src_creds=("alice", "not-her-password"))
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|authentication required"):
        skopeo_copy(f"{rig.host}/{rig.private.repo}:v1", tmp_path / "missing")
    with pytest.raises(SkopeoError, match=r"(?i)denied"):
        skopeo_copy(f"{rig.host}/{rig.private.repo}:v1", tmp_path / "bob",
                    src_creds=("bob", USERS["bob"]))
    assert rig.registry.requests_since(mark) == []  # refused at the edge, upstream untouched


def test_skopeo_with_auth_json(rig: Rig, tmp_path: Path) -> None:
    good = write_auth_json(tmp_path / "auth.json", rig.host, "bob", USERS["bob"])
    _pull_ok(rig, rig.public, tmp_path / "bob", src_authfile=good)
    bad = write_auth_json(tmp_path / "bad.json", rig.host, "bob", "wrong")
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|authentication required"):
        skopeo_copy(f"{rig.host}/{rig.public.repo}:v1", tmp_path / "bad", src_authfile=bad)
    other = write_auth_json(tmp_path / "other.json", "127.0.0.1:1", "bob", USERS["bob"])
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|authentication required"):
        skopeo_copy(f"{rig.host}/{rig.public.repo}:v1", tmp_path / "none", src_authfile=other)


def test_containerd_with_hosts_toml_credentials(rig: Rig, containerd: Containerd) -> None:
    ref = f"{rig.registry.host}/{rig.private.repo}:v1"
    mirror_url = rig.mirror.url
    token = {"Authorization": f"Bearer {CI_TOKEN}"}
    good = containerd.hosts_dir(rig.registry.host, mirror_url, headers=token, name="hosts-ci")
    containerd.fetch(ref, good, namespace="access-good")
    assert {b.digest for b in rig.private.blobs()} <= containerd.content_digests("access-good")
    alice = {"Authorization": "Basic " + base64.b64encode(
        f"alice:{USERS['alice']}".encode()).decode()}
    basic = containerd.hosts_dir(rig.registry.host, mirror_url, headers=alice, name="hosts-a")
    containerd.fetch(ref, basic, namespace="access-basic")
    mark = rig.registry.clear_log_mark()
    wrong = containerd.hosts_dir(rig.registry.host, mirror_url, name="hosts-wrong",
                                 headers={"Authorization": "Bearer wrong-token"})
    with pytest.raises(RuntimeError, match=r"(?i)401|unauthorized"):
        containerd.fetch(ref, wrong, namespace="access-wrong")
    missing = containerd.hosts_dir(rig.registry.host, mirror_url, name="hosts-missing")
    with pytest.raises(RuntimeError, match=r"(?i)401|unauthorized"):
        containerd.fetch(ref, missing, namespace="access-missing")
    assert rig.registry.requests_since(mark) == []


def test_a_cached_private_layer_is_blob_unknown_under_a_public_name(
        rig: Rig, tmp_path: Path) -> None:
    _pull_ok(rig, rig.private, tmp_path / "alice", src_creds=("alice", USERS["alice"]))
    layer = rig.private.layers[0].digest
    bob = base64.b64encode(f"bob:{USERS['bob']}".encode()).decode()
    mark = rig.registry.clear_log_mark()
    request = urllib.request.Request(f"{rig.mirror.url}/v2/public/base/blobs/{layer}",
                                     headers={"Authorization": f"Basic {bob}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["errors"][0]["code"] == "BLOB_UNKNOWN"
    upstream = rig.registry.requests_since(mark)
    # Asked upstream under public/base's scope, which does not link the layer; never fetched.
    seen = [(e.method, e.path.split("/blobs/")[0], e.status) for e in upstream]
    assert seen[-1] == ("HEAD", "/v2/public/base", 404), seen
    assert not any(e.method == "GET" and "/blobs/" in e.path for e in upstream)
    # alice reads it under private/app from the cache, with nothing asked upstream.
    mark = rig.registry.clear_log_mark()
    alice = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    request = urllib.request.Request(f"{rig.mirror.url}/v2/private/app/blobs/{layer}",
                                     headers={"Authorization": f"Basic {alice}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert len(resp.read()) == rig.private.layers[0].size
    assert rig.registry.requests_since(mark) == []


def test_the_log_names_users_and_never_secrets(rig: Rig) -> None:
    text = rig.mirror.log_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("event") == "request"]
    users = {e.get("user") for e in requests}
    assert {"alice", "bob", "ci"} <= users
    assert all("client" in e and "user_agent" in e for e in requests)
    assert any("skopeo" in e["user_agent"] for e in requests)
    assert any("containerd" in e["user_agent"] for e in requests)
    for secret in (*USERS.values(), CI_TOKEN, UPSTREAM_PASSWORD):
        assert secret not in text


def test_podman_with_auth_json(rig: Rig, tmp_path: Path) -> None:
    if podman_binary() is None:
        pytest.fail("podman is not installed (scripts/setup.sh --test installs it)")
    ref = f"{rig.host}/{rig.public.repo}:v1"
    good = write_auth_json(tmp_path / "auth.json", rig.host, "bob", USERS["bob"])
    assert podman_pull(ref, tmp_path / "good", authfile=good) == rig.public.manifest.digest
    bad = write_auth_json(tmp_path / "bad.json", rig.host, "bob", "wrong")
    with pytest.raises(PodmanError, match=r"(?i)unauthorized|authentication required"):
        podman_pull(ref, tmp_path / "bad", authfile=bad)
    with pytest.raises(PodmanError, match=r"(?i)unauthorized|authentication required"):
        podman_pull(ref, tmp_path / "missing")


def test_admin_listen_and_token_in_a_real_process(rig: Rig, tmp_path: Path) -> None:
    admin_port = free_port()
    (tmp_path / "admin.token").write_text("admin-token-0123456789")
    config = mirror_config(free_port(), tmp_path / "cache", [
        {"name": rig.registry.host, "url": rig.registry.url, "default": True}])
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}",
                       "token_file": str(tmp_path / "admin.token")}
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start()
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        assert _status(f"{mirror.url}/metrics") == 404  # not on the clients' port
        assert _status(f"{mirror.url}/") == 404
        assert _status(f"{mirror.url}/v2/") == 200
        assert _status(f"{admin}/metrics") == 401
        headers = {"Authorization": "Bearer admin-token-0123456789"}
        assert _status(f"{admin}/metrics", headers) == 200
        assert _status(f"{admin}/", headers) == 200
        assert _status(f"{admin}/v2/", headers) == 404  # no registry on the admin port
        assert _status(f"{admin}/readyz") == 200
    finally:
        mirror.stop()


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
