"""The vulnerability gate enforced by a real mirror process (one worker and two) in front of
real Distribution with Docker-Hub-like token auth, pulled with skopeo. Reports are cosign
vulnerability attestations (``cosign attest --type vuln`` layout: a DSSE envelope layer of
the ``sha256-<hex>.att`` manifest) made here, and one sigstore bundle made by sigstore-js
(``@sigstore/sign``, checked by ``@sigstore/verify``) attached with the referrers tag schema:

* a fresh clean report (``.att``; the sigstore-js bundle): pulled by tag and digest;
* a report with a CRITICAL finding, a stale report, a report signed by another key, no
  report, a report whose subject is another digest, only a generic attestation
  (predicate ``attestation/v1``): ``403 DENIED`` naming the reason; skopeo fails;
* a ``warn`` rule: a CRITICAL image served with a ``Warning`` header;
* a new report (CRITICAL, then a clean rescan pushed): the verdict is decided again;
* keyless reports (sigstore-js through ``@sigstore/mock``'s Fulcio and Rekor): the
  mirror's verdict and ``@sigstore/verify``'s agree, and only the matching identity's
  clean report passes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror.config import parse
from mirror.policy import compile_policy, evaluate, parse_bundle
from tests.integration.test_policy_enforce_real import _assert_refused, _pull, _request
from tests.integration.test_policy_sigstore_js import (
    ISSUER,
    RELEASE,
    STRANGER,
    private_pem,
    sigstore_js,
)
from tests.support import cosign_attest as ca
from tests.support import cosign_sign as cs
from tests.support.cosign_push import OCI_MANIFEST, push_bundle
from tests.support.images import Blob, Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

pytestmark = pytest.mark.integration
UPSTREAM = "registry.test"
DAY = 86400.0
ALLOWED = ("clean", "jsbundle")
REFUSED = {"critical": "worst finding CRITICAL above high",
           "stale": "report older than 7d",
           "stranger": "no vulnerability report by scanner",
           "none": "no vulnerability report by scanner",
           "elsewhere": "no vulnerability report by scanner (the report's subject is another",
           "generic": "no vulnerability report by scanner"}


@dataclass
class Scanned:
    images: dict[str, Image]
    public_pem: bytes
    key: cs.PrivateKey


def _image(repo: str, seed: int) -> Image:
    return make_image(repo, "v1", layers=[make_layer(2048 + seed, seed=seed)], fmt="oci")


def _push_generic(registry: Registry, repo: str, digest: str, key: cs.PrivateKey) -> None:
    """A ``.att`` with only cosign's generic attestation (not a vulnerability report)."""
    body = ca.statement(digest, {"Data": "{\"foo\": \"bar\"}\n",
                                 "Timestamp": ca.rfc3339(time.time())}, ca.GENERIC)
    image = ca.att_manifest([(ca.envelope(key, body), ca.GENERIC)])
    blobs = [Blob.of(b"{}", "application/vnd.oci.image.config.v1+json")] + \
        [Blob.of(data, ca.DSSE_LAYER) for data in image.blobs.values()]
    registry.push_raw(repo, blobs, [(Blob.of(image.manifest, OCI_MANIFEST),
                                     digest.replace(":", "-", 1) + ".att")])


@pytest.fixture(scope="module")
def scanned(registry_token: Registry) -> Scanned:
    """Push the matrix into the token-auth Distribution, each with its report."""
    scanner, stranger = cs.new_key("p256"), cs.new_key("p256")
    names = [*ALLOWED, *REFUSED, "warned", "rescanned"]
    images = {name: _image(f"{'team' if name == 'warned' else 'acme'}/vuln-{name}", 600 + i)
              for i, name in enumerate(names)}
    for image in images.values():
        registry_token.push(image)
    digest = {name: image.manifest.digest for name, image in images.items()}

    def att(name: str, severities: list[str], key: cs.PrivateKey = scanner, *,
            finished: float | None = None, subject: str | None = None) -> None:
        ca.push_att(registry_token, images[name].repo, digest[name], key,
                    severities=severities, finished=finished, subject=subject)

    att("clean", ["LOW", "HIGH"])
    att("critical", ["LOW", "CRITICAL"])
    att("stale", [], finished=time.time() - 8 * DAY)
    att("stranger", [], stranger)
    att("elsewhere", [], subject=digest["clean"])
    att("warned", ["CRITICAL"])
    att("rescanned", ["CRITICAL"])
    _push_generic(registry_token, images["generic"].repo, digest["generic"], scanner)
    statement = ca.statement(digest["jsbundle"], ca.vuln_predicate(["MEDIUM"]))
    signed, = sigstore_js([{"op": "sign", "kind": "dsse", "key": private_pem(scanner),
                            "hint": "scanner", "digest": digest["jsbundle"],
                            "statement_b64": base64.b64encode(statement).decode()}])
    checked, = sigstore_js([{"op": "verify", "bundle": signed["bundle"],
                             "keys": {"scanner": cs.public_pem(scanner).decode()},
                             "digest": digest["jsbundle"]}])
    assert checked == {"ok": True}  # @sigstore/verify accepts what the mirror will judge
    js = images["jsbundle"]
    push_bundle(registry_token, js.repo, digest["jsbundle"], js.manifest.size,
                document=signed["bundle"])
    return Scanned(images, cs.public_pem(scanner), scanner)


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def mirror(request: pytest.FixtureRequest, registry_token: Registry, scanned: Scanned,
           tmp_path: Path) -> Iterator[MirrorProcess]:
    (tmp_path / "scanner.pub").write_bytes(scanned.public_pem)
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": UPSTREAM, "url": registry_token.url, "default": True}])
    config["server"] = {"workers": request.param}
    config["cache"] = {"tag_ttl": "1s"}
    bar = {"max_severity": "high", "max_age": "7d", "keys": ["scanner"]}
    config["policy"] = {
        "keys": [{"name": "scanner", "file": str(tmp_path / "scanner.pub")}],
        "rules": [{"repositories": ["acme/*"], "vulnerabilities": bar},
                  {"repositories": ["team/*"], "vulnerabilities": bar, "mode": "warn"}],
        "default": "allow"}
    process = MirrorProcess(tmp_path / "mirror", config)
    process.start(timeout=30)
    deadline = time.monotonic() + 30  # /readyz answered from one worker: wait for each
    while len(process.events("mirror_started")) < request.param:
        assert time.monotonic() < deadline, process.log_tail()
        time.sleep(0.05)
    try:
        yield process
    finally:
        process.stop()


def test_skopeo_pulls_exactly_the_images_with_a_fresh_clean_report(
        mirror: MirrorProcess, scanned: Scanned, tmp_path: Path) -> None:
    for name in ALLOWED:
        image = scanned.images[name]
        _pull(mirror, f"{image.repo}:v1", image, tmp_path / f"{name}-tag")
        _pull(mirror, f"{image.repo}@{image.manifest.digest}", image, tmp_path / f"{name}-d")
    for name, reason in REFUSED.items():
        image = scanned.images[name]
        _assert_refused(mirror, image.repo, image, reason, tmp_path / f"{name}-no")
    # the attestations themselves are served: clients verify them through the mirror
    att = scanned.images["clean"].manifest.digest.replace(":", "-") + ".att"
    assert _request(f"{mirror.url}/v2/acme/vuln-clean/manifests/{att}")[0] == 200


def test_a_warn_rule_serves_a_critical_image_with_a_warning(mirror: MirrorProcess) -> None:
    for method in ("GET", "HEAD", "GET"):
        status, headers, _ = _request(f"{mirror.url}/v2/team/vuln-warned/manifests/v1",
                                      method)
        assert status == 200
        assert headers.get("Warning", "").startswith(
            '299 - "policy: worst finding CRITICAL above high')


def test_a_new_report_is_seen(mirror: MirrorProcess, scanned: Scanned,
                              registry_token: Registry) -> None:
    image = scanned.images["rescanned"]
    url = f"{mirror.url}/v2/{image.repo}/manifests/v1"
    assert _request(url)[0] == 403
    try:
        ca.push_att(registry_token, image.repo, image.manifest.digest, scanned.key,
                    severities=["LOW"])  # the image rescanned with a fixed database
        deadline = time.monotonic() + 30
        while (status := _request(url)[0]) == 403:  # the .att tag's TTL (1 s) and memo
            assert time.monotonic() < deadline, "the new report is not seen"
            time.sleep(0.3)
        assert status == 200
        by_digest = f"{mirror.url}/v2/{image.repo}/manifests/{image.manifest.digest}"
        while _request(by_digest, "HEAD")[0] != 200:  # the other worker, if any, sees it too
            assert time.monotonic() < deadline, "the new report is not seen by digest"
            time.sleep(0.3)
    finally:  # the next parametrized run starts from the CRITICAL report
        ca.push_att(registry_token, image.repo, image.manifest.digest, scanned.key,
                    severities=["CRITICAL"])


def test_keyless_reports_agree_with_sigstore_js(tmp_path: Path) -> None:
    digest, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64

    def report(severities: list[str], subject: str = digest) -> str:
        return base64.b64encode(ca.statement(subject, ca.vuln_predicate(severities))).decode()

    cases = [("matching identity, clean", RELEASE, report(["HIGH"]), True),
             ("matching identity, CRITICAL", RELEASE, report(["CRITICAL"]), False),
             ("another identity", STRANGER, report([]), False),
             ("subject is another digest", RELEASE, report([], other), False)]
    signed, = sigstore_js([{"op": "keyless", "signings": [
        {"issuer": ISSUER, "subject": subject, "digest": digest, "statement_b64": body}
        for _, subject, body, _ in cases]}])
    root = signed["trusted_root"]
    (tmp_path / "root.json").write_text(json.dumps(root))
    settings = parse({"policy": {
        "trusted_root": "root.json",
        "identities": [{"name": "ci", "issuer": ISSUER, "subject": RELEASE}],
        "rules": [{"vulnerabilities": {"max_severity": "high", "keys": ["ci"]}}]}},
        env={}, base=tmp_path).policy
    assert settings is not None
    policy = compile_policy(settings)
    js = sigstore_js([{"op": "verify_keyless", "bundle": bundle, "trusted_root": root,
                       "issuer": ISSUER, "subject": RELEASE, "digest": digest}
                      for bundle in signed["bundles"]])
    for (name, _, _, expected), bundle, theirs in zip(cases, signed["bundles"], js,
                                                      strict=True):
        ours = evaluate(policy, "docker.io", "acme/app", digest,
                        [parse_bundle(json.dumps(bundle).encode())])
        assert ours.allowed is expected, (name, ours.reason)
        if "CRITICAL" not in name:  # @sigstore/verify checks signatures, not findings
            assert theirs["ok"] is expected, (name, theirs)
        else:
            assert theirs["ok"] and "worst finding CRITICAL above high" in ours.reason
