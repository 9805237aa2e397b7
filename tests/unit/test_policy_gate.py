"""The policy gate with an in-memory reader (the pull service's twin): where signatures are
read, how much, when a kept verdict is used and when it is computed again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mirror.policy import compile_policy
from mirror.policy.gate import Found, Gate
from mirror.policy.model import MAX_SIGNATURES
from tests.support import cosign_sign as cs
from tests.unit.test_policy import policy_settings

IMAGE = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
DIGEST = "sha256:" + hashlib.sha256(IMAGE).hexdigest()
OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """What a registry holds for one repository; counts what the gate reads."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}  # tag or digest -> bytes
        self.blobs: dict[str, bytes] = {}
        self.referrers_index: dict[str, bytes] = {}
        self.reads: list[str] = []

    async def manifest(self, reference: str) -> Found | None:
        self.reads.append(f"manifest {reference}")
        data = self.manifests.get(reference)
        return Found(_digest(data), data) if data is not None else None

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        self.reads.append(f"blob {digest}")
        return self.blobs.get(digest) if size <= limit else None

    async def referrers(self, digest: str) -> Found | None:
        data = self.referrers_index.get(digest)
        return Found(_digest(data), data) if data is not None else None

    def sign(self, key: cs.PrivateKey, digest: str = DIGEST) -> None:
        image = cs.sig_manifest([cs.legacy_layer(key, cs.payload(digest))])
        self.manifests[digest.replace(":", "-") + ".sig"] = image.manifest
        self.blobs.update(image.blobs)

    def attach_bundles(self, key: cs.PrivateKey, count: int) -> None:
        entries = []
        for n in range(count):
            bundle = json.dumps({**cs.dsse_bundle(key, DIGEST), "n": n}).encode()
            manifest = json.dumps({"artifactType": cs.BUNDLE_V03, "layers": [
                {"mediaType": cs.BUNDLE_V03, "digest": _digest(bundle),
                 "size": len(bundle)}]}).encode()
            self.blobs[_digest(bundle)] = bundle
            self.manifests[_digest(manifest)] = manifest
            entries.append({"mediaType": OCI, "digest": _digest(manifest),
                            "size": len(manifest), "artifactType": cs.BUNDLE_V03})
        self.referrers_index[DIGEST] = json.dumps({"manifests": entries}).encode()


def _gate(tmp_path: Path, key: cs.PrivateKey) -> Gate:
    settings = policy_settings(tmp_path, {"release": cs.public_pem(key)},
                               [{"repositories": ["acme/*"], "require": ["release"]}])
    return Gate(compile_policy(settings))


async def test_a_kept_verdict_reads_only_the_signature_manifests(tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    registry.sign(key)
    first = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                             media_type=OCI, tag="v1")
    assert first is not None and first.allowed and first.signer == "release"
    registry.reads.clear()
    again = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                             media_type=OCI)
    assert again == first
    assert registry.reads == [f"manifest {DIGEST.replace(':', '-')}.sig"]  # no payload read


async def test_a_changed_signature_set_is_judged_again(tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    registry.sign(cs.new_key())  # another key
    denied = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                              media_type=OCI)
    assert denied is not None and not denied.allowed
    assert denied.reason.startswith("no signature by release")
    registry.sign(key)  # the .sig tag moved to a signature by the trusted key
    allowed = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                               media_type=OCI)
    assert allowed is not None and allowed.allowed


async def test_signatures_are_not_judged_and_other_rules_read_nothing(tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    registry.sign(key)
    sig_tag = DIGEST.replace(":", "-") + ".sig"
    assert await gate.judge(registry, "r", "acme/app", _digest(registry.manifests[sig_tag]),
                            manifest=registry.manifests[sig_tag], media_type=OCI,
                            tag=sig_tag) is None
    assert registry.reads == []
    other = await gate.judge(registry, "r", "other/app", DIGEST, manifest=IMAGE,
                             media_type=OCI)
    assert other is not None and other.allowed and "default allow" in other.reason


async def test_bundles_as_referrers_pass_and_thousands_cost_a_bounded_read(
        tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    registry.attach_bundles(cs.new_key(), 2000)  # none by the trusted key
    verdict = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                               media_type=OCI)
    assert verdict is not None and not verdict.allowed
    assert len([r for r in registry.reads if r.startswith("blob")]) <= MAX_SIGNATURES
    registry.attach_bundles(key, 1)
    verdict = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                               media_type=OCI)
    assert verdict is not None and verdict.allowed and verdict.signer == "release"


async def test_hostile_signature_manifests_get_a_reason(tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    sig_tag = DIGEST.replace(":", "-") + ".sig"
    for hostile, reason in ((b"x" * (300 * 1024), "larger than"), (b"[1]", "not a JSON object"),
                            (b'{"layers": 5}', "no layers")):
        registry.manifests[sig_tag] = hostile
        verdict = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                                   media_type=OCI)
        assert verdict is not None and not verdict.allowed and reason in verdict.reason


async def test_a_platform_manifest_passes_through_its_signed_index(tmp_path: Path) -> None:
    key = cs.new_key()
    gate, registry = _gate(tmp_path, key), Registry()
    index = json.dumps({"mediaType": INDEX_TYPE, "manifests": [
        {"mediaType": OCI, "digest": DIGEST, "size": len(IMAGE)}]}).encode()
    registry.sign(key, _digest(index))
    on_index = await gate.judge(registry, "r", "acme/app", _digest(index), manifest=index,
                                media_type=INDEX_TYPE, tag="v1")
    assert on_index is not None and on_index.allowed
    child = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                             media_type=OCI)
    assert child is not None and child.allowed and "through index" in child.reason
