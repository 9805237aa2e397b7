"""Countersigning: the mirror's own cosign signature on an image that passed the policy.

With ``policy.countersign_key``, a client asking for cosign's tag ``sha256-<hex>.sig`` of
an image that passed gets upstream's signature layers (if any) and one more, the mirror's,
in cosign's legacy layout (SIGNATURE_SPEC)::

    manifest (OCI image manifest)
      config   application/vnd.oci.image.config.v1+json   rootfs.diff_ids = the layers
      layers   upstream's simple-signing layers, as upstream wrote them
               + application/vnd.dev.cosign.simplesigning.v1+json   the mirror's payload
                   annotations: dev.cosignproject.cosign/signature = base64(signature)

    payload  {"critical":{"identity":{"docker-reference":"<registry>/<repository>"},
                          "image":{"docker-manifest-digest":"sha256:..."},
                          "type":"cosign container image signature"},"optional":null}

Everything here is a pure function of (key, repository, image digest, upstream's ``.sig``
bytes): signing is deterministic (RFC 6979 ECDSA, Ed25519, RSA PKCS#1 v1.5), so every
worker process, and the node after a restart, serves the same bytes under the same digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from mirror.policy.crypto import Invalid
from mirror.policy.model import (
    ANNOTATION_SIGNATURE,
    COSIGN_SIGNATURE_TYPE,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    SIMPLESIGNING_TYPE,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_EPOCH = "0001-01-01T00:00:00Z"  # what cosign writes in a signature image's config

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Countersigned:
    """A ``.sig`` manifest carrying the mirror's signature, and the blobs it adds."""

    digest: str
    manifest: bytes
    blobs: dict[str, bytes] = field(repr=False)  # the mirror's payload and the config


class Countersigner:
    """Signs images with the mirror's private key, deterministically.

    Raises:
        Invalid: the PEM is not an unencrypted private key of a kind that signs
            deterministically here (ECDSA P-256/384 with RFC 6979, Ed25519, RSA 2048+).
    """

    def __init__(self, pem: bytes) -> None:
        self._key = load_private_key(pem)
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data: bytes) -> bytes:
        """The signature over ``data``, as cosign makes it with a key of this kind."""
        return _sign(self._key, data)

    def countersign(self, reference: str, digest: str,
                    upstream: bytes | None) -> Countersigned:
        """The ``.sig`` manifest for the image ``digest`` (``reference``: the repository as
        ``<registry>/<repository>``): upstream's signature layers, then the mirror's."""
        body = payload(reference, digest)
        layer = {"mediaType": SIMPLESIGNING_TYPE, "size": len(body), "digest": _digest(body),
                 "annotations": {ANNOTATION_SIGNATURE:
                                 base64.b64encode(self.sign(body)).decode()}}
        layers = [*upstream_layers(upstream)[:MAX_LAYERS - 1], layer]
        config = _config([str(item["digest"]) for item in layers])
        manifest = _canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": _digest(config)},
            "layers": layers})
        return Countersigned(_digest(manifest), manifest,
                             {_digest(body): body, _digest(config): config})


def load_private_key(pem: bytes) -> PrivateKey:
    """An unencrypted PEM private key that signs deterministically here.

    Raises:
        Invalid: with the reason in one line.
    """
    if pem.count(b"-----BEGIN ") != 1:
        raise Invalid("expected one PEM private key (-----BEGIN PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise Invalid("the private key is encrypted: give it unencrypted "
                      "(readable by the mirror only, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise Invalid("not a PEM private key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) \
            and isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
        _check_deterministic(key)
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey) \
            or (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048):
        return key
    raise Invalid("expected an ECDSA P-256/384, Ed25519 or RSA (2048+) private key")


def _check_deterministic(key: ec.EllipticCurvePrivateKey) -> None:
    try:
        _sign(key, b"probe")
    except (UnsupportedAlgorithm, TypeError):
        raise Invalid("this cryptography/OpenSSL cannot sign ECDSA deterministically "
                      "(RFC 6979 needs OpenSSL 3.2+): use an Ed25519 or RSA key") from None


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()
        return key.sign(data, ec.ECDSA(algorithm, deterministic_signing=True))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def payload(reference: str, digest: str) -> bytes:
    """cosign's simple-signing payload naming the image ``digest`` (compact JSON)."""
    return _canonical({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": COSIGN_SIGNATURE_TYPE},
                       "optional": None})


def upstream_layers(manifest: bytes | None) -> list[dict[str, Any]]:
    """Upstream's simple-signing layer descriptors, verbatim (none from what is not a
    readable ``.sig`` manifest: the mirror's signature is served all the same)."""
    if manifest is None or len(manifest) > MAX_MANIFEST_BYTES:
        return []
    try:
        doc = json.loads(manifest)
    except ValueError:
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    return [layer for layer in (layers if isinstance(layers, list) else [])
            if isinstance(layer, dict) and layer.get("mediaType") == SIMPLESIGNING_TYPE
            and isinstance(layer.get("digest"), str) and isinstance(layer.get("size"), int)]


def _config(diff_ids: list[str]) -> bytes:
    """The config of a signature image as cosign writes it (its layers are uncompressed)."""
    return _canonical({"architecture": "", "created": _EPOCH, "history": [{"created": _EPOCH}],
                       "os": "", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "config": {}})


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
