"""The signature policy enforced by a real mirror process (one worker and two) in front of
real Distribution with Docker-Hub-like token auth, on images signed here as cosign's
SIGNATURE_SPEC lays signatures out (and one keyed sigstore bundle attached with the
referrers tag schema), pulled with skopeo:

* signed by the trusted key (``.sig`` or bundle): pulled by tag and digest, digests checked;
* signed by another key, unsigned, a payload naming another digest: ``403 DENIED`` naming
  the rule and the reason, for GET and HEAD, by tag and by digest; skopeo fails;
* a tag moved to an unsigned digest after it was pulled: refused once the tag TTL ends;
* a ``warn`` rule: served, with a ``Warning`` header;
* the signatures themselves are served (clients verify them through the mirror);
* the audit trail: one chained line per decision, ``mirror audit verify`` passes on it
  and fails on a tampered copy, saying where; the metric and the status page's refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import cosign_sign as cs
from tests.support.containerd import Containerd
from tests.support.cosign_push import push_bundle, push_legacy
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import SkopeoError, manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
UPSTREAM = "registry.test"


@dataclass
class Signed:
    """The images of the matrix, by case, and the trusted key's public PEM."""

    images: dict[str, Image]
    moved_to: Image
    public_pem: bytes


def _image(repo: str, seed: int) -> Image:
    return make_image(repo, "v1", layers=[make_layer(2048 + seed, seed=seed)], fmt="oci")


@pytest.fixture(scope="module")
def signed(registry_token: Registry) -> Signed:
    """Push the matrix into the token-auth Distribution, signed as each case says."""
    trusted, stranger = cs.new_key("p256"), cs.new_key("p256")
    names = ["good", "bundled", "stranger", "unsigned", "wrongdigest", "moved"]
    images = {name: _image(f"acme/{name}", 700 + i) for i, name in enumerate(names)}
    images["warned"] = _image("team/warned", 780)
    for image in images.values():
        registry_token.push(image)
    digest = {name: image.manifest.digest for name, image in images.items()}
    push_legacy(registry_token, "acme/good", digest["good"], trusted)
    push_legacy(registry_token, "acme/moved", digest["moved"], trusted)
    push_legacy(registry_token, "acme/stranger", digest["stranger"], stranger)
    push_legacy(registry_token, "acme/wrongdigest", digest["wrongdigest"], trusted,
                signs=digest["good"])
    bundled = images["bundled"]
    push_bundle(registry_token, "acme/bundled", digest["bundled"], bundled.manifest.size,
                trusted)
    moved_to = _image("acme/moved", 790)  # pushed under v1 by the test, unsigned
    return Signed(images, moved_to, cs.public_pem(trusted))


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def mirror(request: pytest.FixtureRequest, registry_token: Registry, signed: Signed,
           mirrors: Mirrors, tmp_path: Path) -> MirrorProcess:
    (tmp_path / "release.pub").write_bytes(signed.public_pem)
    policy = {"keys": [{"name": "release", "file": str(tmp_path / "release.pub")}],
              "rules": [{"repositories": ["acme/*"], "require": ["release"]},
                        {"repositories": ["team/*"], "require": ["release"], "mode": "warn"}],
              "default": "allow"}
    return mirrors.start(registry_token.url, request.param, upstream=UPSTREAM,
                         workdir="mirror", timeout=30, cache={"tag_ttl": "1s"}, policy=policy,
                         audit={"file": str(tmp_path / "audit.jsonl")})


def _request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with _DIRECT.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _assert_refused(mirror: MirrorProcess, repo: str, image: Image, reason: str,
                    dest: Path) -> None:
    """``repo``'s image is refused by rule 1 for ``reason``: by tag and digest, GET and
    HEAD (403 DENIED naming both), and skopeo cannot pull it."""
    for reference in ("v1", image.manifest.digest):
        url = f"{mirror.url}/v2/{repo}/manifests/{reference}"
        status, _, body = _request(url)
        assert status == 403, (repo, reference, body)
        error = json.loads(body)["errors"][0]
        assert error["code"] == "DENIED"
        assert "rule 1" in error["message"] and reason in error["message"], error
        assert _request(url, "HEAD")[0] == 403
    with pytest.raises(SkopeoError, match=r"denied|403"):
        skopeo_copy(f"127.0.0.1:{mirror.port}/{repo}:v1", dest)


def _pull(mirror: MirrorProcess, ref: str, image: Image, dest: Path) -> None:
    out = skopeo_copy(f"127.0.0.1:{mirror.port}/{ref}", dest)
    assert manifest_digest(out) == image.manifest.digest
    assert verify_dir(out) == {b.digest: b.size for b in image.blobs()}


def test_signed_images_pull_and_the_others_are_denied(mirror: MirrorProcess, signed: Signed,
                                                       tmp_path: Path) -> None:
    for name in ("good", "bundled"):
        image = signed.images[name]
        _pull(mirror, f"acme/{name}:v1", image, tmp_path / f"{name}-tag")
        _pull(mirror, f"acme/{name}@{image.manifest.digest}", image, tmp_path / f"{name}-dig")
    why = {"stranger": "no signature by release",
           "unsigned": "no signature by release",
           "wrongdigest": "no signature by release (the payload signs"}
    for name, reason in why.items():
        _assert_refused(mirror, f"acme/{name}", signed.images[name], reason,
                        tmp_path / f"{name}-no")
    # the signatures themselves are served: clients verify them through the mirror
    sig_tag = signed.images["good"].manifest.digest.replace(":", "-") + ".sig"
    assert _request(f"{mirror.url}/v2/acme/good/manifests/{sig_tag}")[0] == 200


def test_containerd_pulls_what_passes_and_is_refused_the_rest(
        mirror: MirrorProcess, signed: Signed, containerd: Containerd) -> None:
    """containerd through ``hosts.toml`` (the registry itself unreachable): the signed
    images arrive whole, by tag; the refused ones fail with the mirror's 403."""
    hosts = containerd.hosts_dir(UPSTREAM, mirror.url, name=f"certs-{mirror.port}")
    namespace = f"policy{mirror.port}"
    for name in ("good", "bundled"):
        image = signed.images[name]
        containerd.fetch(f"{UPSTREAM}/acme/{name}:v1", hosts, namespace=namespace)
        held = containerd.content_digests(namespace)
        assert {b.digest for b in image.blobs()} <= held, name
    for name in ("stranger", "unsigned", "wrongdigest"):
        with pytest.raises(RuntimeError, match=r"403|[Ff]orbidden|denied"):
            containerd.fetch(f"{UPSTREAM}/acme/{name}:v1", hosts, namespace=namespace)


def test_a_warn_rule_serves_with_a_warning_header(mirror: MirrorProcess,
                                                  signed: Signed) -> None:
    for method in ("GET", "HEAD", "GET"):
        status, headers, _ = _request(f"{mirror.url}/v2/team/warned/manifests/v1", method)
        assert status == 200
        assert headers.get("Warning", "").startswith('299 - "policy: no signature by release')
    assert mirror.events("policy_warning")


def test_a_tag_moved_to_an_unsigned_digest_is_denied(mirror: MirrorProcess, signed: Signed,
                                                     registry_token: Registry,
                                                     tmp_path: Path) -> None:
    moved = signed.images["moved"]
    url = f"{mirror.url}/v2/acme/moved/manifests/v1"
    try:
        _pull(mirror, "acme/moved:v1", moved, tmp_path / "before")
        registry_token.push(signed.moved_to)  # the same tag, now an unsigned image
        deadline = time.monotonic() + 20
        while (status := _request(url)[0]) == 200:  # the tag TTL (1 s) and lean path end
            assert time.monotonic() < deadline, "the moved tag is still served"
            time.sleep(0.2)
        assert status == 403
    finally:
        registry_token.push(moved)  # the next parametrized run starts from a signed tag


def test_the_audit_trail_is_chained_and_counted(mirror: MirrorProcess, signed: Signed,
                                                tmp_path: Path) -> None:
    good, bad = signed.images["good"], signed.images["unsigned"]
    for _ in range(3):
        assert _request(f"{mirror.url}/v2/acme/good/manifests/v1")[0] == 200
        assert _request(f"{mirror.url}/v2/acme/good/manifests/{good.manifest.digest}",
                        "HEAD")[0] == 200
        assert _request(f"{mirror.url}/v2/acme/unsigned/manifests/v1")[0] == 403
    files = sorted(tmp_path.glob("audit*.jsonl"))
    workers = int(mirror.config["server"]["workers"])
    assert len(files) == workers
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    denied = [e for e in lines if e["policy"]["verdict"] == "deny"]
    allowed = [e for e in lines if e["policy"]["verdict"] == "allow"]
    assert len(denied) == 3 and len(allowed) == 6
    assert {e["digest"] for e in denied} == {bad.manifest.digest}
    assert all(e["policy"]["signer"] == "release" for e in allowed)
    assert all(e["actor"] == "anonymous" and e["client"] == "127.0.0.1" for e in lines)
    assert all(e["repository"] and e["reference"] and e["request_id"] for e in lines)

    verified = _audit_verify(*files)
    assert verified.returncode == 0, verified.stderr
    assert "intact" in verified.stdout
    longest = max(files, key=lambda f: len(f.read_text().splitlines()))
    text = longest.read_text().splitlines()
    changed = json.loads(text[1])
    changed["digest"] = "sha256:" + "0" * 64
    text[1] = json.dumps(changed, separators=(",", ":"))
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(text) + "\n")
    broken = _audit_verify(tampered)
    assert broken.returncode == 1
    assert "chain breaks at line 3" in broken.stderr, broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1

    metrics = _request(f"{mirror.url}/metrics")[2].decode()
    assert f'mirror_policy_decisions_total{{registry="{UPSTREAM}",verdict="deny"}}' in metrics
    deadline = time.monotonic() + 10
    while "refused by rule 1" not in _request(f"{mirror.url}/")[2].decode():
        assert time.monotonic() < deadline, "the status page does not list the refusal"
        time.sleep(0.5)


def _audit_verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", "audit", "verify",
                           *map(str, files)], capture_output=True, text=True, timeout=60,
                          check=False)


def test_warm_and_export_take_only_what_passes(mirror: MirrorProcess, signed: Signed,
                                               tmp_path: Path) -> None:
    good, bad = f"{UPSTREAM}/acme/good:v1", f"{UPSTREAM}/acme/unsigned:v1"
    warm = _mirror(["warm", good, bad], mirror)
    assert warm.returncode == 1, warm.stdout + warm.stderr
    out = warm.stdout + warm.stderr
    assert f"refused: {bad}: policy:" in out and "no signature by release" in out
    assert "1 of 2 image(s) held" in out
    lines = [json.loads(line) for f in sorted(tmp_path.glob("audit*.jsonl"))
             for line in f.read_text().splitlines()]
    actions = [e for e in lines if e["kind"] == "admin"]
    assert [(e["action"], e["refs"], e["actor"]) for e in actions] == [
        ("warm", [good, bad], "operator:local")]
    assert _audit_verify(*sorted(tmp_path.glob("audit*.jsonl"))).returncode == 0

    bundle = tmp_path / "out.tar"
    export = _mirror(["export", "--policy", good, bad, "-o", str(bundle), "-q"], mirror)
    assert export.returncode == 0, export.stderr
    assert f"refused: {bad}" in export.stderr
    assert "acme/good:v1" in export.stdout and "acme/unsigned" not in export.stdout
    sig_tag = signed.images["good"].manifest.digest.replace(":", "-") + ".sig"
    assert sig_tag in export.stdout  # the signatures travel with the image
    everything = _mirror(["export", good, bad, "-o", str(tmp_path / "all.tar"), "-q"], mirror)
    assert everything.returncode == 0, everything.stderr  # without --policy: as asked


def _mirror(args: list[str], mirror: MirrorProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config",
                           str(mirror.config_path)], capture_output=True, text=True,
                          timeout=120, check=False)
