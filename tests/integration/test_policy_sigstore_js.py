"""The mirror's verifier and sigstore-js agree: bundles signed by ``@sigstore/sign`` (with
keys made here, or keyless through ``@sigstore/mock``'s Fulcio and Rekor), verified by
``@sigstore/verify`` (then the in-toto subject against the image digest, as cosign does)
and by :func:`mirror.policy.evaluate`, over a matrix of key kinds, bundle kinds,
identities and faults. Every verdict must match the expected one on both sides:
0 disagreements.

sigstore-js is installed by ``scripts/setup.sh --test`` (npm ci in tests/support/sigstore-js).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from mirror.config import parse
from mirror.policy import Policy, Verdict, compile_policy, evaluate, parse_bundle
from tests.support import cosign_sign as cs

pytestmark = pytest.mark.integration
JS = Path(__file__).resolve().parents[1] / "support" / "sigstore-js"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OTHER_MANIFEST = MANIFEST + b" "
OTHER = "sha256:" + hashlib.sha256(OTHER_MANIFEST).hexdigest()


def sigstore_js(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run tests/support/sigstore-js/sigstore.mjs on a batch of requests."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@sigstore" / "verify").is_dir():
        reason = "sigstore-js is not installed (scripts/setup.sh --test)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must not skip integration tests", pytrace=False)
        pytest.skip(reason)
    proc = subprocess.run([node, str(JS / "sigstore.mjs")], input=json.dumps(requests),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results


def private_pem(key: cs.PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def tamper_payload(bundle: dict[str, Any]) -> dict[str, Any]:
    """The DSSE payload replaced by a statement for another digest; the signature kept."""
    doc = copy.deepcopy(bundle)
    doc["dsseEnvelope"]["payload"] = base64.b64encode(cs.statement(OTHER)).decode()
    return doc


def tamper_digest(bundle: dict[str, Any]) -> dict[str, Any]:
    """The message digest replaced by the other manifest's; the signature kept."""
    doc = copy.deepcopy(bundle)
    doc["messageSignature"]["messageDigest"]["digest"] = base64.b64encode(
        hashlib.sha256(OTHER_MANIFEST).digest()).decode()
    return doc


def _policy(section: dict[str, Any], base: Path) -> Policy:
    """The mirror's compiled ``policy:`` section (its files relative to ``base``)."""
    settings = parse({"policy": section}, env={}, base=base).policy
    assert settings is not None
    return compile_policy(settings)


def _judge(policy: Policy, bundle: dict[str, Any]) -> Verdict:
    """The mirror's verdict on acme/app@DIGEST with ``bundle`` as its referrer."""
    return evaluate(policy, "docker.io", "acme/app", DIGEST,
                    [parse_bundle(json.dumps(bundle).encode())])


@dataclass
class Tally:
    """Where the mirror and sigstore-js disagree, and where the mirror is wrong."""

    disagreements: list[tuple[str, str, Any]] = field(default_factory=list)
    wrong: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, ours: Verdict, js: dict[str, Any], expected: bool) -> None:
        if ours.allowed != js["ok"]:
            self.disagreements.append((name, ours.reason, js.get("error")))
        if ours.allowed != expected:
            self.wrong.append((name, ours.reason))

    def check(self) -> None:
        assert self.disagreements == [], "\n".join(map(str, self.disagreements))
        assert self.wrong == []


def test_the_mirror_and_sigstore_js_agree(tmp_path: Path) -> None:
    trusted = {kind: cs.new_key(kind) for kind in ("p256", "p384", "ed25519", "rsa")}
    stranger = cs.new_key("p256")
    manifest_b64 = base64.b64encode(MANIFEST).decode()
    # (name, signing key, bundle kind, digest signed, expected)
    plan: list[tuple[str, cs.PrivateKey, str, str, bool]] = []
    for kind, key in trusted.items():
        plan.append((f"{kind} dsse, trusted key", key, "dsse", DIGEST, True))
        if kind != "ed25519":  # a message signature signs a digest: ECDSA and RSA only
            plan.append((f"{kind} message, trusted key", key, "message", DIGEST, True))
    plan += [("dsse, another key", stranger, "dsse", DIGEST, False),
             ("message, another key", stranger, "message", DIGEST, False),
             ("dsse, subject is another digest", trusted["p256"], "dsse", OTHER, False)]
    signed = sigstore_js([{"op": "sign", "kind": bundle_kind, "key": private_pem(key),
                           "hint": "release", "digest": digest, "manifest_b64": manifest_b64}
                          for _, key, bundle_kind, digest, _ in plan])
    matrix = [(name, result["bundle"], expected)
              for (name, *_, expected), result in zip(plan, signed, strict=True)]
    p256_dsse = next(b for n, b, _ in matrix if n == "p256 dsse, trusted key")
    p256_message = next(b for n, b, _ in matrix if n == "p256 message, trusted key")
    matrix += [("dsse, tampered payload", tamper_payload(p256_dsse), False),
               ("message, tampered digest", tamper_digest(p256_message), False)]

    tally = Tally()
    for kind, key in trusted.items():
        pub = cs.public_pem(key)
        (tmp_path / "release.pub").write_bytes(pub)
        policy = _policy({"keys": [{"name": "release", "file": "release.pub"}],
                          "rules": [{"require": ["release"]}]}, tmp_path)
        mine = [name for name, *_ in plan if name.startswith(kind)]
        cases = [(n, b, e) for n, b, e in matrix if n in mine] + \
            ([(n, b, e) for n, b, e in matrix if not n.startswith(tuple(trusted))]
             if kind == "p256" else [])
        verdicts = sigstore_js([{"op": "verify", "bundle": bundle,
                                 "keys": {"release": pub.decode()}, "digest": DIGEST,
                                 "manifest_b64": manifest_b64} for _, bundle, _ in cases])
        for (name, bundle, expected), js in zip(cases, verdicts, strict=True):
            tally.add(name, _judge(policy, bundle), js, expected)
    tally.check()


ISSUER = "https://token.actions.githubusercontent.com"
RELEASE = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main"
STRANGER = "https://github.com/evil/app/.github/workflows/release.yml@refs/heads/main"


def test_keyless_through_a_mocked_fulcio_and_rekor_agrees(tmp_path: Path) -> None:
    """@sigstore/mock's Fulcio (with its CT log) and Rekor, on loopback ports, sign for
    @sigstore/sign's Fulcio signer and Rekor witness; the trust root is made of the mock's
    keys. The mirror (identity + trusted_root) and @sigstore/verify (SAN and issuer policy,
    SCT and tlog thresholds of 1) judge the same bundles."""
    signings = [{"issuer": ISSUER, "subject": RELEASE, "digest": DIGEST},
                {"issuer": ISSUER, "subject": STRANGER, "digest": DIGEST},
                {"issuer": ISSUER, "subject": RELEASE, "digest": OTHER}]
    first, second = sigstore_js([{"op": "keyless", "signings": signings},
                                 {"op": "keyless", "signings": signings[:1]}])
    ours_root, other_root = first["trusted_root"], second["trusted_root"]
    good, stranger, other_digest = first["bundles"]
    cases = [("matching identity", good, ours_root, True),
             ("another identity", stranger, ours_root, False),
             ("subject is another digest", other_digest, ours_root, False),
             ("tampered payload", tamper_payload(good), ours_root, False),
             ("signed under another trust root", second["bundles"][0], ours_root, False),
             ("checked with another trust root", good, other_root, False)]
    verdicts = sigstore_js([{"op": "verify_keyless", "bundle": bundle, "trusted_root": root,
                             "issuer": ISSUER, "subject": RELEASE, "digest": DIGEST}
                            for _, bundle, root, _ in cases])
    tally = Tally()
    for (name, bundle, root, expected), js in zip(cases, verdicts, strict=True):
        (tmp_path / "root.json").write_text(json.dumps(root))
        policy = _policy({"trusted_root": "root.json",
                          "identities": [{"name": "ci", "issuer": ISSUER, "subject": RELEASE}],
                          "rules": [{"require": ["ci"]}]}, tmp_path)
        tally.add(name, _judge(policy, bundle), js, expected)
    tally.check()
    # a subject regex, as cosign's --certificate-identity-regexp, on the same bundles
    (tmp_path / "root.json").write_text(json.dumps(ours_root))
    policy = _policy({"trusted_root": "root.json",
                      "identities": [{"name": "ci", "issuer": ISSUER,
                                      "subject_regex": "^https://github.com/acme/"}],
                      "rules": [{"require": ["ci"]}]}, tmp_path)
    for bundle, allowed in ((good, True), (stranger, False)):
        verdict = _judge(policy, bundle)
        assert verdict.allowed is allowed, verdict.reason
