"""The policy box on signatures made here (every key kind, both cosign layouts), its rules,
its bounds on hostile input, and its verdict cache."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from mirror.config import parse
from mirror.config.policy import PolicySettings
from mirror.errors import ConfigError
from mirror.policy import (
    LegacySignature,
    Unreadable,
    VerdictCache,
    bundle_layer,
    bundle_manifests,
    compile_policy,
    evaluate,
    is_signature_artifact,
    legacy_signature,
    parse_bundle,
    sig_tag,
    signature_layers,
)
from mirror.policy.model import MAX_LAYERS, MAX_SIGNATURES, Signature
from tests.support import cosign_sign as cs
from tests.support.cosign_oracle import FIXTURES

MANIFEST = b'{"schemaVersion":2,"layers":[]}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OTHER = "sha256:" + "1" * 64


def policy_settings(tmp_path: Path, keys: dict[str, bytes], rules: list[dict[str, Any]],
                    **more: Any) -> PolicySettings:
    for name, pem in keys.items():
        (tmp_path / f"{name}.pub").write_bytes(pem)
    doc = {"policy": {"keys": [{"name": n, "file": f"{n}.pub"} for n in keys],
                      "rules": rules, **more}}
    settings = parse(doc, env={}, base=tmp_path).policy
    assert settings is not None
    return settings


def release_only(tmp_path: Path, key: cs.PrivateKey) -> PolicySettings:
    """A policy with one key, ``release`` (the public half of ``key``), that every image
    must be signed with."""
    return policy_settings(tmp_path, {"release": cs.public_pem(key)}, [{"require": ["release"]}])


def read_sig(image: cs.SigImage) -> list[Signature]:
    """What the serving path will do: the .sig manifest's layers, each with its blob."""
    layers = signature_layers(image.manifest)
    assert not isinstance(layers, Unreadable)
    return [legacy_signature(layer, image.blobs[layer.digest]) for layer in layers]


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa"])
def test_a_keyed_signature_of_every_key_kind_passes(tmp_path: Path, kind: str) -> None:
    key = cs.new_key(kind)
    policy = compile_policy(release_only(tmp_path, key))
    sigs = read_sig(cs.sig_manifest([cs.legacy_layer(key, cs.payload(DIGEST))]))
    verdict = evaluate(policy, "docker.io", "acme/app", DIGEST, sigs)
    assert (verdict.allowed, verdict.rule, verdict.signer) == (True, 1, "release")


def test_signatures_that_do_not_verify_are_refused_with_the_reason(tmp_path: Path) -> None:
    trusted, other = cs.new_key(), cs.new_key()
    policy = compile_policy(policy_settings(
        tmp_path, {"release": cs.public_pem(trusted), "ci": cs.public_pem(cs.new_key())},
        [{"require": ["release", "ci"]}]))
    cases = {
        "another key": cs.legacy_layer(other, cs.payload(DIGEST)),
        "another digest": cs.legacy_layer(trusted, cs.payload(OTHER)),
        "another type": cs.legacy_layer(trusted, cs.payload(DIGEST, kind="attestation")),
        "not JSON": cs.legacy_layer(trusted, b"&"),
    }
    reasons = {}
    for name, layer in cases.items():
        verdict = evaluate(policy, "docker.io", "acme/app", DIGEST,
                           read_sig(cs.sig_manifest([layer])))
        assert not verdict.allowed, name
        assert verdict.reason.startswith("no signature by release or ci ("), verdict.reason
        reasons[name] = verdict.reason
    assert "does not verify" in reasons["another key"]
    assert f"signs {OTHER}, not {DIGEST}" in reasons["another digest"]
    assert "not a cosign container image signature" in reasons["another type"]
    assert "not JSON" in reasons["not JSON"]
    unsigned = evaluate(policy, "docker.io", "acme/app", DIGEST, [])
    assert (unsigned.allowed, unsigned.reason) == (False, "no signature by release or ci")


def test_one_good_signature_among_bad_ones_suffices(tmp_path: Path) -> None:
    key = cs.new_key()
    policy = compile_policy(release_only(tmp_path, key))
    image = cs.sig_manifest([cs.legacy_layer(cs.new_key(), cs.payload(DIGEST)),
                             cs.legacy_layer(key, cs.payload(DIGEST))])
    assert evaluate(policy, "docker.io", "acme/app", DIGEST, read_sig(image)).allowed


def test_rules_first_match_deny_digests_default_and_warn(tmp_path: Path) -> None:
    key = cs.new_key()
    settings = policy_settings(tmp_path, {"release": cs.public_pem(key)}, [
        {"registries": ["docker.io"], "repositories": ["acme/*"], "require": ["release"]},
        {"repositories": ["library/bad-*"], "deny": True},
        {"digests": [OTHER], "deny": True},
        {"repositories": ["team/*"], "require": ["release"], "mode": "warn"},
        {"repositories": ["open/*"]},
    ], default="deny")
    policy = compile_policy(settings)
    bad = evaluate(policy, "docker.io", "library/bad-app", DIGEST, [])
    assert (bad.allowed, bad.rule, bad.reason) == (False, 2, "denied by rule 2")
    pinned = evaluate(policy, "docker.io", "library/nginx", OTHER, [])
    assert (pinned.allowed, pinned.rule) == (False, 3)
    nothing = evaluate(policy, "docker.io", "library/nginx", DIGEST, [])
    assert (nothing.allowed, nothing.rule, nothing.reason) == (
        False, None, "no rule matches; default deny")
    warned = evaluate(policy, "docker.io", "team/app", DIGEST, [])
    assert (warned.allowed, warned.warning, warned.reason) == (
        True, True, "no signature by release")
    opened = evaluate(policy, "docker.io", "open/app", DIGEST, [])
    assert (opened.allowed, opened.reason) == (True, "allowed by rule 5")


def test_keyed_bundles_dsse_and_message_signature(tmp_path: Path) -> None:
    key = cs.new_key()
    policy = compile_policy(release_only(tmp_path, key))

    def verdict_of(doc: dict[str, Any]) -> tuple[bool, str]:
        bundle = parse_bundle(json.dumps(doc).encode())
        v = evaluate(policy, "docker.io", "acme/app", DIGEST, [bundle])
        return v.allowed, v.reason

    assert verdict_of(cs.dsse_bundle(key, DIGEST)) == (True, "signed by release")
    assert verdict_of(cs.message_bundle(key, MANIFEST)) == (True, "signed by release")
    allowed, reason = verdict_of(cs.dsse_bundle(key, OTHER))
    assert not allowed and "subject is another digest" in reason
    allowed, reason = verdict_of(cs.dsse_bundle(cs.new_key(), DIGEST))
    assert not allowed and "does not verify" in reason
    tampered = cs.dsse_bundle(key, DIGEST)
    tampered["dsseEnvelope"]["payload"] = cs.dsse_bundle(key, OTHER)["dsseEnvelope"]["payload"]
    assert not verdict_of(tampered)[0]


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="no ../shared/fixtures/cosign")
def test_keyless_signature_through_an_identity_and_trusted_root(tmp_path: Path) -> None:
    record = (FIXTURES / "containers-image/signature/fixtures/dir-img-cosign-fulcio-rekor-valid"
              / "signature-1").read_bytes()
    doc = json.loads(record.partition(b"\n")[2])
    manifest = (FIXTURES / "containers-image/signature/fixtures/dir-img-cosign-fulcio-rekor-valid"
                / "manifest.json").read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    body = base64.b64decode(doc["payload"])
    image = cs.sig_manifest([(body, doc["annotations"])])
    root = FIXTURES / "sigstore-python/trusted_root.json"
    for regex, allowed in (("^mitr@redhat\\.com$", True), ("@example\\.com$", False)):
        doc_ = {"policy": {"trusted_root": str(root), "identities": [
            {"name": "ci", "issuer": "https://github.com/login/oauth", "subject_regex": regex}],
            "rules": [{"require": ["ci"]}]}}
        settings = parse(doc_, env={}, base=tmp_path).policy
        assert settings is not None
        verdict = evaluate(compile_policy(settings), "docker.io", "a/b", digest, read_sig(image))
        assert verdict.allowed is allowed, verdict.reason
        assert verdict.signer == ("ci" if allowed else None)


def test_hostile_input_gets_a_reason_and_bounded_work() -> None:
    huge = json.dumps({"layers": [{"mediaType": cs.SIMPLESIGNING, "size": 1,
                                   "digest": DIGEST}] * (MAX_LAYERS + 1)}).encode()
    assert isinstance(signature_layers(huge), Unreadable)
    assert isinstance(signature_layers(b"x" * (1 << 20)), Unreadable)
    assert isinstance(signature_layers(b"[" * 100_000), Unreadable)  # deep nesting
    assert isinstance(signature_layers(b'{"layers": 3}'), Unreadable)
    body = cs.payload(DIGEST)
    layer = signature_layers(cs.sig_manifest([(body, {})]).manifest)
    assert not isinstance(layer, Unreadable)
    assert "no signature annotation" in legacy_signature(layer[0], body).reason  # type: ignore[union-attr]
    assert "does not match" in legacy_signature(layer[0], body + b" ").reason  # type: ignore[union-attr]
    index = json.dumps({"manifests": [{"mediaType": "x", "size": 1, "digest": DIGEST,
                                       "artifactType": cs.BUNDLE_V03}] * 5000}).encode()
    found = bundle_manifests(index)
    assert isinstance(found, list) and len(found) == MAX_SIGNATURES
    assert isinstance(bundle_layer(b'{"layers": []}'), Unreadable)
    for junk in (b"", b"null", b'{"mediaType": "x"}', b'{"mediaType": "' + cs.BUNDLE_V03.encode()
                 + b'", "verificationMaterial": {}}', b"\xff\xfe"):
        assert isinstance(parse_bundle(junk), Unreadable)
    assert sig_tag(DIGEST) == DIGEST.replace(":", "-") + ".sig"


def test_thousands_of_signatures_are_looked_at_up_to_the_bound(tmp_path: Path) -> None:
    key = cs.new_key()
    policy = compile_policy(release_only(tmp_path, key))
    junk: list[Signature] = [LegacySignature(payload=b"{}", signature="AAAA",
                                             fingerprint=str(i)) for i in range(5000)]
    verdict = evaluate(policy, "docker.io", "acme/app", DIGEST, junk)
    assert not verdict.allowed
    assert len(verdict.checks) == MAX_SIGNATURES


def test_the_verdict_is_kept_per_image_policy_and_signature_set(tmp_path: Path) -> None:
    key = cs.new_key()
    settings = release_only(tmp_path, key)
    policy = compile_policy(settings)
    sigs = read_sig(cs.sig_manifest([cs.legacy_layer(key, cs.payload(DIGEST))]))
    cache = VerdictCache()
    first = cache.verdict(policy, "docker.io", "acme/app", DIGEST, sigs)
    assert cache.verdict(policy, "docker.io", "acme/app", DIGEST, list(reversed(sigs))) is first
    assert len(cache) == 1
    assert not cache.verdict(policy, "docker.io", "acme/app", DIGEST, []).allowed
    reloaded = compile_policy(policy_settings(tmp_path, {"release": cs.public_pem(cs.new_key())},
                                              [{"require": ["release"]}]))
    assert reloaded.hash != policy.hash
    assert not cache.verdict(reloaded, "docker.io", "acme/app", DIGEST, sigs).allowed
    assert len(cache) == 3
    reads = []

    def read() -> list[Signature]:
        reads.append(1)
        return sigs

    named = VerdictCache()
    for _ in range(3):  # the signature set named by the caller: read once, on the miss
        assert named.verdict(policy, "docker.io", "acme/app", DIGEST, read,
                             signature_set="sha256:sig-manifest").allowed
    assert reads == [1]
    small = VerdictCache(max_entries=2)
    for repository in ("a/one", "a/two", "a/three"):
        small.verdict(policy, "docker.io", repository, DIGEST, sigs)
    assert len(small) == 2


@pytest.mark.parametrize(("policy", "key", "message"), [
    ({"rules": [{"require": ["nobody"]}]}, "policy.rules[0].require[0]", "not the name"),
    ({"identities": [{"name": "ci", "issuer": "https://x", "subject": "a"}]},
     "policy.trusted_root", "required with identities"),
    ({"keys": [{"name": "k", "file": "missing.pub"}]}, "policy.keys[0].file", "no such file"),
    ({"keys": [{"name": "k", "file": "bad.pub"}]}, "policy.keys[0].file", "PEM public key"),
    ({"rules": [{"deny": True, "require": ["k"]}], "keys": [{"name": "k", "file": "k.pub"}]},
     "policy.rules[0]", "not both"),
    ({"rules": [{"mode": "audit"}]}, "policy.rules[0].mode", "enforce or warn"),
    ({"rules": [{"digests": ["sha256:abc"]}]}, "policy.rules[0].digests[0]", "sha256:"),
    ({"rules": [{"registries": ["quay.io"]}]}, "policy.rules[0].registries[0]",
     "not a configured registry"),
    ({"default": "maybe"}, "policy.default", "allow or deny"),
    ({"colour": "red"}, "policy.colour", "unknown key"),
    ({"identities": [{"name": "ci", "issuer": "https://x", "subject_regex": "("}],
      "trusted_root": "root.json"}, "policy.identities[0].subject_regex", "regular expression"),
    ({"trusted_root": "bad.pub"}, "policy.trusted_root", "not JSON"),
    ({"trusted_root": "badca.json"}, "policy.trusted_root",
     "certificateAuthorities[0] certificate 0 does not load"),
    ({"keys": [{"name": "k", "file": "k.pub"}, {"name": "k", "file": "k.pub"}]},
     "policy.keys[1].name", "already"),
])
def test_config_errors_name_the_key(tmp_path: Path, policy: dict[str, Any], key: str,
                                    message: str) -> None:
    (tmp_path / "k.pub").write_bytes(cs.public_pem(cs.new_key()))
    (tmp_path / "bad.pub").write_text("not a key")
    (tmp_path / "root.json").write_text('{"certificateAuthorities": [], "tlogs": []}')
    (tmp_path / "badca.json").write_text('{"certificateAuthorities": [{"certChain": '
                                         '{"certificates": [{"rawBytes": "AAAA"}]}}], '
                                         '"tlogs": []}')
    with pytest.raises(ConfigError) as caught:
        parse({"policy": policy}, env={}, base=tmp_path)
    assert caught.value.key == key
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_example_config_block_parses_when_uncommented(tmp_path: Path) -> None:
    example = (Path(__file__).parents[2] / "config" / "mirror.example.yaml").read_text()
    block = example.split("# --- signatures and policy", 1)[1].split("\n", 1)[1]
    block = block.split("# --- ", 1)[0]
    text = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    (tmp_path / "cosign.pub").write_bytes(cs.public_pem(cs.new_key()))
    (tmp_path / "root.json").write_text('{"certificateAuthorities": [], "tlogs": []}')
    text = text.replace("/etc/mirror/cosign.pub", str(tmp_path / "cosign.pub"))
    text = text.replace("/etc/mirror/trusted_root.json", str(tmp_path / "root.json"))
    text = text.replace("/var/log/mirror/audit.jsonl", str(tmp_path / "audit.jsonl"))
    (tmp_path / "mirror.key").write_bytes(cs.new_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    text = text.replace("/etc/mirror/mirror.key", str(tmp_path / "mirror.key"))
    document = {**yaml.safe_load(text), "version": 1,
                "upstreams": [{"name": "docker.io", "default": True}]}
    parsed = parse(document, env={})
    assert parsed.audit is not None and parsed.audit.file == tmp_path / "audit.jsonl"
    settings = parsed.policy
    assert settings is not None and len(settings.rules) == 4
    assert settings.rules[3].vulnerabilities is not None  # the vulnerability gate's example
    policy = compile_policy(settings)
    assert set(policy.signers) == {"release", "ci"}
    verdict = evaluate(policy, "docker.io", "library/bad-app", DIGEST, [])
    assert verdict.reason == "denied by rule 2"


def test_signatures_themselves_are_not_judged() -> None:
    key = cs.new_key()
    sig_image = cs.sig_manifest([cs.legacy_layer(key, cs.payload(DIGEST))])
    assert is_signature_artifact(sig_tag(DIGEST), sig_image.manifest)
    assert is_signature_artifact(None, sig_image.manifest)  # pulled by digest
    assert is_signature_artifact(DIGEST.replace(":", "-"), b"{}")  # the fallback index
    bundle_manifest = json.dumps({"artifactType": cs.BUNDLE_V03, "layers": []}).encode()
    assert is_signature_artifact(None, bundle_manifest)
    image = json.dumps({"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                    "digest": DIGEST, "size": 1}]}).encode()
    assert not is_signature_artifact("latest", image)
    assert not is_signature_artifact("v1", MANIFEST)
    assert not is_signature_artifact("sha256-nothex.sig", b"not json")


def test_a_platform_manifest_passes_with_a_signature_of_its_index(tmp_path: Path) -> None:
    key = cs.new_key()
    policy = compile_policy(release_only(tmp_path, key))
    index = "sha256:" + "2" * 64
    index_sigs = read_sig(cs.sig_manifest([cs.legacy_layer(key, cs.payload(index))]))
    verdict = evaluate(policy, "docker.io", "acme/app", DIGEST, [],
                       indexes=[(index, index_sigs)])
    assert verdict.allowed
    assert verdict.signer == "release"
    assert verdict.reason == f"signed by release (through index {index})"
    # the index's signature names the index: it does not sign another platform manifest
    assert not evaluate(policy, "docker.io", "acme/app", DIGEST, [],
                        indexes=[(OTHER, index_sigs)]).allowed
    assert not evaluate(policy, "docker.io", "acme/app", DIGEST, index_sigs).allowed
    cache = VerdictCache()
    assert cache.verdict(policy, "docker.io", "acme/app", DIGEST, [],
                         indexes=[(index, index_sigs)]).allowed
    assert not cache.verdict(policy, "docker.io", "acme/app", DIGEST, []).allowed


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="no ../shared/fixtures/cosign")
def test_mutated_real_signatures_get_a_verdict_never_an_exception(tmp_path: Path) -> None:
    """Flip, cut and splice bytes of real cosign signatures and bundles: every one of them
    gets a verdict (none of them passes), whatever the parser meets."""
    import random  # noqa: PLC0415 (only this test)

    rng = random.Random(22)
    root = FIXTURES / "sigstore-python/trusted_root.json"
    settings = parse({"policy": {
        "trusted_root": str(root), "keys": [{"name": "k", "file": "k.pub"}],
        "identities": [{"name": "ci", "issuer": "https://github.com/login/oauth",
                        "subject_regex": "."}],
        "rules": [{"require": ["k", "ci"]}]}}, env={},
        base=_key_file(tmp_path)).policy
    assert settings is not None
    policy = compile_policy(settings)
    keyless = FIXTURES / "containers-image/signature/fixtures/dir-img-cosign-fulcio-rekor-valid"
    doc = json.loads((keyless / "signature-1").read_bytes().partition(b"\n")[2])
    body = base64.b64decode(doc["payload"])
    manifest = cs.sig_manifest([(body, doc["annotations"])]).manifest
    bundle = (FIXTURES / "sigstore-rs/tests/data/bundle_v03.json").read_bytes()
    for _ in range(300):
        which = rng.choice(["manifest", "payload", "bundle"])
        data = {"manifest": manifest, "payload": body, "bundle": bundle}[which]
        mutated = _mutate(rng, data)
        if which == "bundle":
            sigs: list[Signature] = [parse_bundle(mutated)]
        elif which == "payload":
            sigs = [LegacySignature(payload=mutated, signature=doc["annotations"][
                "dev.cosignproject.cosign/signature"],
                certificate=doc["annotations"]["dev.sigstore.cosign/certificate"],
                chain=doc["annotations"]["dev.sigstore.cosign/chain"],
                rekor_bundle=doc["annotations"]["dev.sigstore.cosign/bundle"])]
        else:
            layers = signature_layers(mutated)
            sigs = [] if isinstance(layers, Unreadable) else [
                legacy_signature(layer, body) for layer in layers]
        verdict = evaluate(policy, "docker.io", "a/b", DIGEST, sigs)
        assert not verdict.allowed and verdict.reason


def _key_file(folder: Path) -> Path:
    (folder / "k.pub").write_bytes(cs.public_pem(cs.new_key()))
    return folder


def _mutate(rng: Any, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(3)
        at = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[at] = rng.randrange(256)
        elif kind == 1:
            del buf[at:at + rng.randint(1, 64)]
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


def test_the_benchmark_runs_and_prints_every_case() -> None:
    """benchmarks/policy.py in a tiny run, so that it never rots (figures not checked)."""
    import subprocess  # noqa: PLC0415 (only this test)
    import sys  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.policy", "--iterations", "2",
                           "--repeat", "1"], cwd=root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("no policy", "keyed .sig | first", "keyed .sig | kept", "keyed bundle | first"):
        assert f"| {case}" in proc.stdout
    assert "x the requests per second" in proc.stdout
