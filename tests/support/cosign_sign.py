"""Write cosign signatures the way cosign's SIGNATURE_SPEC and BUNDLE_SPEC lay them out,
with keys made here: the ``.sig`` manifest with its simple-signing payload blobs, and
keyed sigstore bundles (DSSE or message signature). For the tests and the benchmark."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def new_key(kind: str = "p256") -> PrivateKey:
    """A fresh private key: ``p256``, ``p384``, ``ed25519`` or ``rsa``."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: PrivateKey, data: bytes) -> bytes:
    """Sign as cosign does: ECDSA/SHA-256 or -384 (DER), Ed25519, RSA PKCS#1 v1.5 SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algo = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()
        return key.sign(data, ec.ECDSA(algo))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def payload(digest: str, reference: str = "registry.example/acme/app",
            kind: str = "cosign container image signature") -> bytes:
    """A cosign simple-signing payload, serialised the way cosign writes it."""
    return json.dumps({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": kind},
                       "optional": None}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SigImage:
    """A ``.sig`` manifest and the payload blobs it names (digest -> bytes)."""

    manifest: bytes
    blobs: dict[str, bytes]


def sig_manifest(layers: list[tuple[bytes, dict[str, str]]]) -> SigImage:
    """The OCI manifest cosign pushes under ``sha256-<hex>.sig`` for these signatures."""
    config = b"{}"
    blobs, descriptors = {}, []
    for body, notes in layers:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        blobs[digest] = body
        descriptors.append({"mediaType": SIMPLESIGNING, "size": len(body), "digest": digest,
                            "annotations": notes})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "size": len(config),
                           "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
                "layers": descriptors}
    return SigImage(json.dumps(manifest).encode(), blobs)


def legacy_layer(key: PrivateKey, body: bytes) -> tuple[bytes, dict[str, str]]:
    """One signature layer: the payload and its signature annotation."""
    sig = base64.b64encode(sign(key, body)).decode()
    return body, {"dev.cosignproject.cosign/signature": sig}


def statement(digest: str, predicate: str = "https://sigstore.dev/cosign/sign/v1") -> bytes:
    """cosign v3's in-toto statement for an image signature."""
    return json.dumps({"_type": "https://in-toto.io/Statement/v1",
                       "subject": [{"name": "registry.example/acme/app",
                                    "digest": {"sha256": digest.removeprefix("sha256:")}}],
                       "predicateType": predicate, "predicate": {}}).encode()


def pae(payload_type: str, body: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(body), body)


def dsse_bundle(key: PrivateKey, digest: str, hint: str = "release") -> dict[str, Any]:
    """A keyed bundle v0.3 whose DSSE envelope signs the statement for ``digest``."""
    body = statement(digest)
    sig = sign(key, pae("application/vnd.in-toto+json", body))
    return {"mediaType": BUNDLE_V03,
            "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
            "dsseEnvelope": {"payload": base64.b64encode(body).decode(),
                             "payloadType": "application/vnd.in-toto+json",
                             "signatures": [{"sig": base64.b64encode(sig).decode(),
                                             "keyid": ""}]}}


def message_bundle(key: ec.EllipticCurvePrivateKey, manifest: bytes,
                   hint: str = "release") -> dict[str, Any]:
    """A keyed bundle v0.3 whose message signature signs the manifest's bytes."""
    digest = hashlib.sha256(manifest).digest()
    sig = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return {"mediaType": BUNDLE_V03,
            "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
            "messageSignature": {"messageDigest": {"algorithm": "SHA2_256",
                                                   "digest": base64.b64encode(digest).decode()},
                                 "signature": base64.b64encode(sig).decode()}}
