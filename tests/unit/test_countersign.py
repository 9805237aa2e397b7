"""Countersigning: the mirror's cosign signature is deterministic, in cosign's layout, keeps
upstream's signatures beside it, and verifies with the mirror's public key alone (checked
by the mirror's own gate, configured with only that key); bad keys are one-line errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mirror.config import parse
from mirror.errors import ConfigError
from mirror.policy import compile_policy
from mirror.policy.countersign import Countersigner, payload, upstream_layers
from mirror.policy.crypto import Invalid
from mirror.policy.gate import Gate
from mirror.policy.model import ANNOTATION_SIGNATURE, SIMPLESIGNING_TYPE
from mirror.pull import PullService, Repo
from tests.support import cosign_sign as cs
from tests.unit.test_policy import policy_settings
from tests.unit.test_policy_gate import DIGEST, IMAGE, OCI, Registry, _digest

REFERENCE = "registry.test/acme/app"


def _pem(key: cs.PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa"])
def test_the_same_image_gets_the_same_bytes_from_every_process(kind: str) -> None:
    pem = _pem(cs.new_key(kind))
    upstream = cs.sig_manifest([cs.legacy_layer(cs.new_key(), cs.payload(DIGEST))]).manifest
    first = Countersigner(pem).countersign(REFERENCE, DIGEST, upstream)
    again = Countersigner(pem).countersign(REFERENCE, DIGEST, upstream)  # another worker
    assert first == again and first.digest == _digest(first.manifest)
    other = Countersigner(pem).countersign(REFERENCE, "sha256:" + "1" * 64, upstream)
    assert other.digest != first.digest


def test_the_layout_is_cosigns_with_upstreams_layers_first() -> None:
    upstream_key, signer = cs.new_key(), Countersigner(_pem(cs.new_key()))
    upstream = cs.sig_manifest([cs.legacy_layer(upstream_key, cs.payload(DIGEST))])
    made = signer.countersign(REFERENCE, DIGEST, upstream.manifest)
    doc = json.loads(made.manifest)
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    theirs, ours = doc["layers"]
    assert theirs == json.loads(upstream.manifest)["layers"][0]
    assert ours["mediaType"] == SIMPLESIGNING_TYPE
    body = made.blobs[ours["digest"]]
    assert json.loads(body) == {
        "critical": {"identity": {"docker-reference": REFERENCE},
                     "image": {"docker-manifest-digest": DIGEST},
                     "type": "cosign container image signature"},
        "optional": None}
    assert body == payload(REFERENCE, DIGEST)
    config = json.loads(made.blobs[doc["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == [theirs["digest"], ours["digest"]]
    assert base64.b64decode(ours["annotations"][ANNOTATION_SIGNATURE])


def test_an_unreadable_or_absent_upstream_sig_leaves_only_the_mirrors() -> None:
    signer = Countersigner(_pem(cs.new_key()))
    for upstream in (None, b"not json", b'{"layers": "no"}', b"{" * 300_000):
        doc = json.loads(signer.countersign(REFERENCE, DIGEST, upstream).manifest)
        assert len(doc["layers"]) == 1
    assert upstream_layers(b'{"layers":[{"mediaType":"x","digest":"d","size":1}]}') == []


def _registry_of(made_manifest: bytes, blobs: dict[str, bytes]) -> Registry:
    registry = Registry()
    registry.manifests[DIGEST.replace(":", "-") + ".sig"] = made_manifest
    registry.blobs.update(blobs)
    return registry


async def test_a_gate_that_trusts_only_the_mirrors_key_accepts_what_it_signed(
        tmp_path: Path) -> None:
    mirror_key, upstream_key = cs.new_key(), cs.new_key()
    signer = Countersigner(_pem(mirror_key))
    upstream = cs.sig_manifest([cs.legacy_layer(upstream_key, cs.payload(DIGEST))])
    made = signer.countersign(REFERENCE, DIGEST, upstream.manifest)
    settings = policy_settings(tmp_path, {"mirror": signer.public_pem},
                               [{"repositories": ["*"], "require": ["mirror"]}])
    gate = Gate(compile_policy(settings))
    registry = _registry_of(made.manifest, {**upstream.blobs, **made.blobs})
    verdict = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                               media_type=OCI)
    assert verdict is not None and verdict.allowed and verdict.signer == "mirror"
    # upstream's signature alone (what an image that did not pass is served) does not pass
    bare = Gate(compile_policy(settings))
    verdict = await bare.judge(_registry_of(upstream.manifest, upstream.blobs), "r",
                               "acme/app", DIGEST, manifest=IMAGE, media_type=OCI)
    assert verdict is not None and not verdict.allowed
    # nor does the mirror's signature of another image moved onto this one's tag
    wrong = signer.countersign(REFERENCE, "sha256:" + "2" * 64, None)
    verdict = await Gate(compile_policy(settings)).judge(
        _registry_of(wrong.manifest, wrong.blobs), "r", "acme/app", DIGEST, manifest=IMAGE,
        media_type=OCI)
    assert verdict is not None and not verdict.allowed


def _config_error(tmp_path: Path, pem: bytes) -> str:
    (tmp_path / "mirror.key").write_bytes(pem)
    with pytest.raises(ConfigError) as caught:
        parse({"policy": {"countersign_key": "mirror.key"}}, env={}, base=tmp_path)
    return str(caught.value)


def test_bad_countersign_keys_are_one_line_errors(tmp_path: Path) -> None:
    key = cs.new_key()
    encrypted = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw"))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases = {encrypted: "encrypted", cs.public_pem(key): "not a PEM private key",
             _pem(small): "RSA (2048+)", b"junk": "expected one PEM private key",
             _pem(ec.generate_private_key(ec.SECP521R1())): "expected an ECDSA"}
    for pem, reason in cases.items():
        message = _config_error(tmp_path, pem)
        assert "policy.countersign_key" in message and reason in message, message
        assert "\n" not in message
    with pytest.raises(ConfigError, match=r"policy\.countersign_key"):
        parse({"policy": {"countersign_key": "absent.key"}}, env={}, base=tmp_path)
    with pytest.raises(Invalid, match="encrypted"):
        Countersigner(encrypted)


def test_a_good_countersign_key_is_read_once(tmp_path: Path) -> None:
    pem = _pem(cs.new_key("ed25519"))
    (tmp_path / "mirror.key").write_bytes(pem)
    settings = parse({"policy": {"countersign_key": "mirror.key"}}, env={},
                     base=tmp_path).policy
    assert settings is not None and settings.countersign_pem == pem
    assert settings.countersign_key == tmp_path / "mirror.key"


async def test_the_gate_does_not_judge_the_countersigned_answer_as_an_image(
        tmp_path: Path) -> None:
    made = Countersigner(_pem(cs.new_key())).countersign(REFERENCE, DIGEST, None)
    settings = policy_settings(tmp_path, {"release": cs.public_pem(cs.new_key())},
                               [{"require": ["release"]}])
    gate, registry = Gate(compile_policy(settings)), Registry()
    for tag in (DIGEST.replace(":", "-") + ".sig", None):  # by its tag, and by digest
        assert await gate.judge(registry, "r", "acme/app", made.digest,
                                manifest=made.manifest, media_type=OCI, tag=tag) is None
    assert registry.reads == []  # nor asked for signatures of its own


def test_a_removed_blob_or_manifest_makes_the_answer_again() -> None:
    """What eviction tells the pull service: answers made of removed content are
    forgotten (made and stored again when next asked), the others kept."""
    signer = Countersigner(_pem(cs.new_key()))
    pull = PullService({}, cast(Any, None), cast(Any, None))
    one = signer.countersign(REFERENCE, DIGEST, None)
    two = signer.countersign(REFERENCE, "sha256:" + "3" * 64, None)
    repo = Repo("registry.test", "acme/app")
    for removed in [next(iter(one.blobs)), one.digest]:
        pull._countersigned.update({(repo, "1", "-"): one, (repo, "2", "-"): two})
        pull.forget_countersigned(removed)
        assert list(pull._countersigned.values()) == [two]
    pull.forget_countersigned(None)
    assert pull._countersigned == {}
