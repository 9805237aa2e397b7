"""Countersigning by a real mirror process (one worker and two) in front of real
Distribution with Docker-Hub-like token auth, on images signed here in cosign's legacy
``.sig`` layout (SIGNATURE_SPEC) or not signed at all, with ``policy.countersign_key``:

* an image that passed (signed by the trusted key under ``enforce``; allowed by default):
  its ``sha256-<hex>.sig`` through the mirror carries upstream's layers plus the mirror's,
  read with skopeo (``inspect --raw``, ``copy``) and HTTP; the mirror's signature verifies
  with ``openssl dgst -sha256 -verify mirror.pub`` over its payload, which names the digest;
* an image that did not pass (unsigned or signed by another key under ``enforce``, or under
  ``warn``) gets no mirror signature: upstream's ``.sig`` exactly, or none;
* the mirror's own verifier configured with ONLY the mirror's public key accepts exactly
  the images that passed: the Gate reading through the mirror over HTTP, and a second
  mirror in front (skopeo pulls through it);
* the mirror's blobs and manifest are served under the repository they were made for, and
  under no other repository or registry (membership: a registry with credentials makes the
  mirror check it for every registry);
* every worker, and the node after a restart, gives the same bytes (by tag and digest);
* when upstream's ``.sig`` changes, the answer follows, and when the verdict changes
  (the trusted signature replaced by another key's), the mirror's signature goes away.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mirror.config import parse
from mirror.policy import compile_policy
from mirror.policy.gate import Found, Gate
from tests.support import cosign_sign as cs
from tests.support.cosign_push import push_legacy
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import SkopeoError, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
UPSTREAM = "registry.test"
PRIVATE = "private.test"  # the same Distribution, reached with credentials
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIGNATURE = "dev.cosignproject.cosign/signature"
#: image -> whether it passes: the trusted key under enforce, the default, or not
PASSES = {"cs/good": True, "cs/open": True, "cs/unsigned": False, "cs/stranger": False,
          "cswarn/stranger": False, "cs/resigned": True}


@dataclass
class Signed:
    images: dict[str, Image]
    trusted: cs.PrivateKey
    stranger: cs.PrivateKey
    public_pem: bytes


@pytest.fixture(scope="module")
def signed(registry_token: Registry) -> Signed:
    trusted, stranger = cs.new_key("p256"), cs.new_key("p256")
    images = {repo: make_image(repo, "v1", layers=[make_layer(1500 + i, seed=900 + i)],
                               fmt="oci") for i, repo in enumerate(PASSES)}
    for image in images.values():
        registry_token.push(image)
    for repo, key in (("cs/good", trusted), ("cs/resigned", trusted),
                      ("cs/stranger", stranger), ("cswarn/stranger", stranger)):
        push_legacy(registry_token, repo, images[repo].manifest.digest, key)
    return Signed(images, trusted, stranger, cs.public_pem(trusted))


def _mirror_key(path: Path) -> Path:
    key = cs.new_key("p256")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(cs.public_pem(key))
    return path


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def mirror(request: pytest.FixtureRequest, registry_token: Registry, signed: Signed,
           tmp_path: Path) -> Iterator[MirrorProcess]:
    (tmp_path / "release.pub").write_bytes(signed.public_pem)
    (tmp_path / "private.pw").write_text("secret")
    # a registry reached with credentials: membership is checked for every registry
    config = mirror_config(free_port(), tmp_path / "cache", [
        {"name": UPSTREAM, "url": registry_token.url, "default": True},
        {"name": PRIVATE, "url": registry_token.url, "username": "mirror",
         "password_file": str(tmp_path / "private.pw")}])
    config["server"] = {"workers": request.param}
    config["cache"] = {"tag_ttl": "1s"}
    config["policy"] = {
        "keys": [{"name": "release", "file": str(tmp_path / "release.pub")}],
        "rules": [{"repositories": ["cs/open"]},
                  {"repositories": ["cs/*"], "require": ["release"]},
                  {"repositories": ["cswarn/*"], "require": ["release"], "mode": "warn"}],
        "default": "allow",
        "countersign_key": str(_mirror_key(tmp_path / "mirror.key"))}
    process = MirrorProcess(tmp_path / "mirror", config)
    _start(process)
    try:
        yield process
    finally:
        process.stop()


def _start(process: MirrorProcess) -> None:
    workers = int(process.config["server"]["workers"])
    before = len(process.events("mirror_started"))
    process.start(timeout=30)
    deadline = time.monotonic() + 30  # /readyz answered from one worker: wait for each
    while len(process.events("mirror_started")) < before + workers:
        assert time.monotonic() < deadline, process.log_tail()
        time.sleep(0.05)


def _get(url: str, method: str = "GET", headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method,
                                 headers={"Accept": OCI_MANIFEST, **(headers or {})})
    try:
        with _DIRECT.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _sig_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sig"


def _sig(mirror: MirrorProcess, repo: str, digest: str) -> tuple[int, bytes]:
    status, _, body = _get(f"{mirror.url}/v2/{repo}/manifests/{_sig_tag(digest)}")
    return status, body


def _sig_layers(mirror: MirrorProcess, repo: str, digest: str) -> tuple[int, bytes]:
    """The ``.sig`` answer's layers (as compact JSON), for comparing with expectations."""
    status, body = _sig(mirror, repo, digest)
    return status, json.dumps(json.loads(body)["layers"]).encode() if status == 200 else body


def _upstream_sig(registry: Registry, repo: str, digest: str) -> bytes | None:
    status, _, body = _get(f"{registry.url}/v2/{repo}/manifests/{_sig_tag(digest)}",
                           headers=registry.auth_header(repo, "pull"))
    return body if status == 200 else None


def _mirror_layers(mirror: MirrorProcess, manifest: bytes, repo: str, digest: str,
                   tmp_path: Path) -> int:
    """How many layers verify with the mirror's key (openssl), each naming ``digest``."""
    public = Path(mirror.config["policy"]["countersign_key"]).with_suffix(".pub")
    verified = 0
    for n, layer in enumerate(json.loads(manifest)["layers"]):
        status, _, body = _get(f"{mirror.url}/v2/{repo}/blobs/{layer['digest']}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer["digest"][7:]
        (tmp_path / f"payload{n}").write_bytes(body)
        (tmp_path / f"sig{n}").write_bytes(base64.b64decode(layer["annotations"][SIGNATURE]))
        check = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public),
                                "-signature", str(tmp_path / f"sig{n}"),
                                str(tmp_path / f"payload{n}")],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode == 0:
            assert "Verified OK" in check.stdout
            assert json.loads(body)["critical"]["image"]["docker-manifest-digest"] == digest
            verified += 1
    return verified


def test_images_that_passed_carry_the_mirrors_signature(
        mirror: MirrorProcess, signed: Signed, registry_token: Registry,
        tmp_path: Path) -> None:
    for repo, passes in PASSES.items():
        digest = signed.images[repo].manifest.digest
        upstream = _upstream_sig(registry_token, repo, digest)
        status, body = _sig(mirror, repo, digest)
        if not passes:
            assert (status, body if status == 200 else None) == \
                (200 if upstream else 404, upstream), repo  # upstream's, exactly
            continue
        assert status == 200, (repo, body)
        layers = json.loads(body)["layers"]
        theirs = json.loads(upstream)["layers"] if upstream else []
        assert layers[:-1] == theirs, repo
        assert _mirror_layers(mirror, body, repo, digest, tmp_path) == 1, repo
    good = signed.images["cs/good"].manifest.digest
    ref = f"127.0.0.1:{mirror.port}/cs/good:{_sig_tag(good)}"
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{ref}"], capture_output=True, timeout=60, check=True)
    assert raw.stdout == _sig(mirror, "cs/good", good)[1]
    copied = skopeo_copy(ref, tmp_path / "sig-copy")
    assert len(verify_dir(copied)) == 3  # config, upstream's payload, the mirror's


def test_a_verifier_that_trusts_only_the_mirrors_key_accepts_exactly_what_passed(
        mirror: MirrorProcess, signed: Signed, tmp_path: Path) -> None:
    public = Path(mirror.config["policy"]["countersign_key"]).with_suffix(".pub")
    (tmp_path / "only.pub").write_bytes(public.read_bytes())
    settings = parse({"policy": {"keys": [{"name": "mirror", "file": "only.pub"}],
                                 "rules": [{"require": ["mirror"]}]}},
                     env={}, base=tmp_path).policy
    assert settings is not None
    accepted = {}
    for repo in PASSES:
        image = signed.images[repo].manifest
        reader = _HttpReader(mirror, repo)
        verdict = asyncio.run(Gate(compile_policy(settings)).judge(
            reader, UPSTREAM, repo, image.digest, manifest=image.data,
            media_type=OCI_MANIFEST))
        assert verdict is not None
        accepted[repo] = verdict.allowed
    assert accepted == PASSES


def test_the_mirrors_blobs_are_served_only_where_they_were_made(
        mirror: MirrorProcess, signed: Signed) -> None:
    good = signed.images["cs/good"].manifest.digest
    status, body = _sig(mirror, "cs/good", good)
    assert status == 200
    doc = json.loads(body)
    made = [doc["config"]["digest"], doc["layers"][-1]["digest"]]
    for digest in made:
        assert _get(f"{mirror.url}/v2/cs/good/blobs/{digest}")[0] == 200
        # another repository, another registry: not theirs (upstream is asked, says no)
        assert _get(f"{mirror.url}/v2/cs/open/blobs/{digest}")[0] == 404
        assert _get(f"{mirror.url}/v2/{PRIVATE}/cs/good/blobs/{digest}")[0] == 404
    manifest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert _get(f"{mirror.url}/v2/cs/good/manifests/{manifest}")[0] == 200
    assert _get(f"{mirror.url}/v2/cs/open/manifests/{manifest}")[0] == 404
    assert _get(f"{mirror.url}/v2/{PRIVATE}/cs/good/manifests/{manifest}")[0] == 404
    upstreams = json.loads(body)["layers"][0]["digest"]  # upstream's: as upstream says
    assert _get(f"{mirror.url}/v2/cs/good/blobs/{upstreams}")[0] == 200


def test_a_mirror_in_front_that_trusts_only_this_mirrors_key_pulls_what_passed(
        mirror: MirrorProcess, signed: Signed, tmp_path: Path) -> None:
    """A second mirror whose upstream is the first, with ONLY the first one's public key
    required: skopeo pulls through it exactly the images that passed the first's policy."""
    public = Path(mirror.config["policy"]["countersign_key"]).with_suffix(".pub")
    config = mirror_config(free_port(), tmp_path / "front-cache",
                           [{"name": "edge.test", "url": mirror.url, "default": True}])
    config["server"] = {"workers": 1}
    config["policy"] = {"keys": [{"name": "edge", "file": str(public)}],
                        "rules": [{"require": ["edge"]}]}
    front = MirrorProcess(tmp_path / "front", config)
    front.start(timeout=30)
    try:
        pulled = {}
        for repo in PASSES:
            image = signed.images[repo]
            try:
                out = skopeo_copy(f"127.0.0.1:{front.port}/{repo}:v1",
                                  tmp_path / repo.replace("/", "-"))
            except SkopeoError:
                pulled[repo] = False
                continue
            assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}
            pulled[repo] = True
        assert pulled == PASSES
    finally:
        front.stop()


def test_an_evicted_countersignature_is_made_again(mirror: MirrorProcess,
                                                   signed: Signed) -> None:
    good = signed.images["cs/good"].manifest.digest
    status, body = _sig(mirror, "cs/good", good)
    assert status == 200
    payload = json.loads(body)["layers"][-1]["digest"]
    evict = subprocess.run([sys.executable, "-m", "mirror", "cache", "evict", payload,
                            "--shared", "--config", str(mirror.config_path)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert evict.returncode == 0, evict.stdout + evict.stderr
    assert " 0 B freed" not in evict.stdout, evict.stdout

    def served_again() -> bool:  # each worker hears of the removal, then the tag remakes it
        return _sig(mirror, "cs/good", good) == (200, body) and \
            _get(f"{mirror.url}/v2/cs/good/blobs/{payload}")[0] == 200
    _until(served_again)


def test_every_worker_and_a_restart_give_the_same_bytes(mirror: MirrorProcess,
                                                        signed: Signed) -> None:
    good = signed.images["cs/good"].manifest.digest
    answers = {_sig(mirror, "cs/good", good)[1] for _ in range(8)}
    assert len(answers) == 1
    body = answers.pop()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    for _ in range(4):  # by digest, from whichever worker answers
        assert _get(f"{mirror.url}/v2/cs/good/manifests/{digest}")[:3:2] == (200, body)
        status, headers, _ = _get(f"{mirror.url}/v2/cs/good/manifests/{_sig_tag(good)}",
                                  "HEAD")  # the lean path's kept answer: the same digest
        assert (status, headers.get("Docker-Content-Digest")) == (200, digest)
    mirror.stop()
    _start(mirror)
    assert _get(f"{mirror.url}/v2/cs/good/manifests/{digest}")[:3:2] == (200, body)
    assert _sig(mirror, "cs/good", good) == (200, body)


def test_the_answer_follows_upstreams_sig_and_the_verdict(
        mirror: MirrorProcess, signed: Signed, registry_token: Registry) -> None:
    repo = "cs/resigned"
    digest = signed.images[repo].manifest.digest
    status, before = _sig(mirror, repo, digest)
    assert status == 200 and len(json.loads(before)["layers"]) == 2
    try:
        push_legacy(registry_token, repo, digest, signed.stranger)  # now fails the policy
        upstream = _upstream_sig(registry_token, repo, digest)
        _until(lambda: _sig(mirror, repo, digest) == (200, upstream))
        _until(lambda: _get(f"{mirror.url}/v2/{repo}/manifests/v1")[0] == 403)  # each worker
    finally:
        push_legacy(registry_token, repo, digest, signed.trusted)
    upstream = _upstream_sig(registry_token, repo, digest)  # signed anew: other bytes
    assert upstream is not None
    mine = json.loads(before)["layers"][-1]  # deterministic: the same signature again
    _until(lambda: _sig_layers(mirror, repo, digest) == (200, _expected(upstream, mine)))


def _expected(upstream: bytes, mine: dict[str, object]) -> bytes:
    """What the mirror answers now: upstream's layers then its own, in a manifest whose
    config lists them (compared by layers; the bytes are the mirror's to choose)."""
    return json.dumps(json.loads(upstream)["layers"] + [mine]).encode()


def _until(check: object, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the countersigned answer did not follow"
        time.sleep(0.2)


class _HttpReader:
    """The gate's reader over the mirror's HTTP API (what a cluster's verifier reads)."""

    def __init__(self, mirror: MirrorProcess, repo: str) -> None:
        self._base = f"{mirror.url}/v2/{repo}"

    async def manifest(self, reference: str) -> Found | None:
        status, _, body = _get(f"{self._base}/manifests/{reference}")
        return Found("sha256:" + hashlib.sha256(body).hexdigest(), body) \
            if status == 200 else None

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        status, _, body = _get(f"{self._base}/blobs/{digest}")
        return body if status == 200 and size <= limit else None

    async def referrers(self, digest: str) -> Found | None:
        return None
