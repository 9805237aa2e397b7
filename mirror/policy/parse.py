"""Read signatures where the tools put them, into typed values, within fixed bounds.

* cosign's legacy layout: the tag ``sha256-<hex>.sig`` names an OCI image manifest whose
  layers are ``application/vnd.dev.cosign.simplesigning.v1+json`` payloads, each with its
  base64 signature (and optional certificate, chain and Rekor bundle) in annotations
  (cosign's SIGNATURE_SPEC);
* sigstore bundles attached as referrers: a manifest with ``artifactType``
  ``application/vnd.dev.sigstore.bundle.v0.3+json`` whose one layer is the bundle JSON,
  found with the referrers API or cosign's fallback index tag ``sha256-<hex>`` (BUNDLE_SPEC).

Nothing here raises on bad input: each function returns :class:`Unreadable` with a reason
instead. Nothing reads more than the ``MAX_*`` limits of :mod:`mirror.policy.model`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mirror.policy.crypto import Invalid, b64decode
from mirror.policy.model import (
    ANNOTATION_BUNDLE,
    ANNOTATION_CERTIFICATE,
    ANNOTATION_CHAIN,
    ANNOTATION_SIGNATURE,
    BUNDLE_TYPES,
    DSSE_ENVELOPE_TYPE,
    MAX_ANNOTATION_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_INDEX_BYTES,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SIGNATURES,
    SIMPLESIGNING_TYPE,
    DsseEnvelope,
    LegacySignature,
    MessageSignature,
    SigstoreBundle,
    Unreadable,
)

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_TLOG_ENTRIES = 4
_MAX_BUNDLE_CERTS = 8


@dataclass(frozen=True)
class Blob:
    """A descriptor of a blob to fetch: a signature payload or a bundle."""

    digest: str
    size: int
    media_type: str
    annotations: tuple[tuple[str, str], ...] = ()


def is_digest(value: object) -> bool:
    """Whether ``value`` is a ``sha256:<64 hex>`` digest (the only algorithm signed here)."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


_ATTACHED_TAG_RE = re.compile(r"sha256-[0-9a-f]{64}(\.(sig|att|sbom))?")


#: Layers of signature artifacts: cosign's .sig payloads and .att envelopes, bundles.
_ARTIFACT_LAYERS = (SIMPLESIGNING_TYPE, DSSE_ENVELOPE_TYPE, *BUNDLE_TYPES)


def is_signature_artifact(tag: str | None, manifest: bytes) -> bool:
    """Whether a manifest is a signature itself (a ``.sig`` manifest, a bundle, cosign's
    attached tags or the referrers fallback index), which the policy does not judge.

    Clients verify by pulling these through the mirror (``cosign verify``, containers/
    image), and a signature asked to be signed would ask for its own signatures in turn.
    """
    if tag is not None and _ATTACHED_TAG_RE.fullmatch(tag):
        return True
    doc = _json(manifest, MAX_MANIFEST_BYTES, "the manifest")
    if isinstance(doc, Unreadable):
        return False
    if doc.get("artifactType") in BUNDLE_TYPES:
        return True
    layers = doc.get("layers")
    return isinstance(layers, list) and bool(layers) and all(
        isinstance(layer, dict) and layer.get("mediaType") in _ARTIFACT_LAYERS
        for layer in layers)


def sig_tag(digest: str) -> str:
    """cosign's signature tag for an image digest: ``sha256-<hex>.sig``."""
    return digest.replace(":", "-", 1) + ".sig"


def referrers_tag(digest: str) -> str:
    """The referrers fallback tag for an image digest: ``sha256-<hex>``."""
    return digest.replace(":", "-", 1)


def _json(data: bytes, limit: int, what: str) -> dict[str, Any] | Unreadable:
    if len(data) > limit:
        return Unreadable(f"{what} is larger than {limit} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return Unreadable(f"{what} is not JSON")
    if not isinstance(value, dict):
        return Unreadable(f"{what} is not a JSON object")
    return value


def _json_list(data: bytes, limit: int, what: str, key: str) -> list[Any] | Unreadable:
    """The list under ``key`` of the JSON object ``data``, or why there is none."""
    doc = _json(data, limit, what)
    if isinstance(doc, Unreadable):
        return doc
    items = doc.get(key)
    if not isinstance(items, list):
        return Unreadable(f"{what} has no {key}")
    return items


def signature_layers(manifest: bytes) -> list[Blob] | Unreadable:
    """The simple-signing layers of a ``.sig`` manifest (other layers are not signatures).

    Returns:
        The payload blobs to fetch, with their annotations; or why the manifest is refused
        (too large, not a manifest, more than :data:`MAX_LAYERS` layers).
    """
    layers = _json_list(manifest, MAX_MANIFEST_BYTES, "the signature manifest", "layers")
    if isinstance(layers, Unreadable):
        return layers
    if len(layers) > MAX_LAYERS:
        return Unreadable(f"the signature manifest has more than {MAX_LAYERS} layers")
    blobs = [_descriptor(layer) for layer in layers]
    return [b for b in blobs if b is not None and b.media_type == SIMPLESIGNING_TYPE]


def _descriptor(value: Any) -> Blob | None:
    if not isinstance(value, dict) or not is_digest(value.get("digest")):
        return None
    size, media_type = value.get("size"), value.get("mediaType")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
            or not isinstance(media_type, str):
        return None
    raw = value.get("annotations") or {}
    annotations = tuple(sorted((k, v) for k, v in raw.items()
                               if isinstance(k, str) and isinstance(v, str))) \
        if isinstance(raw, dict) else ()
    return Blob(value["digest"], size, media_type, annotations)


def legacy_signature(layer: Blob, payload: bytes) -> LegacySignature | Unreadable:
    """One legacy signature from its layer descriptor and the payload blob's bytes.

    The payload must be the blob the descriptor names (size and SHA-256), no larger than
    :data:`MAX_PAYLOAD_BYTES`, and the layer must carry the signature annotation.
    """
    fingerprint = _fingerprint(layer.digest.encode(), *(f"{k}={v}".encode()
                                                         for k, v in layer.annotations))
    if layer.size > MAX_PAYLOAD_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        return Unreadable(f"the signature payload is larger than {MAX_PAYLOAD_BYTES} bytes",
                          fingerprint)
    if len(payload) != layer.size or "sha256:" + hashlib.sha256(payload).hexdigest() \
            != layer.digest:
        return Unreadable("the signature payload does not match its descriptor", fingerprint)
    return from_annotations(payload, dict(layer.annotations), fingerprint)


def from_annotations(payload: bytes, annotations: dict[str, str],
                     fingerprint: str = "") -> LegacySignature | Unreadable:
    """A legacy signature from a payload and its layer's annotations."""
    fingerprint = fingerprint or _fingerprint(
        payload, *(f"{k}={v}".encode() for k, v in sorted(annotations.items())))
    if any(len(v) > MAX_ANNOTATION_BYTES for v in annotations.values()):
        return Unreadable(f"an annotation is larger than {MAX_ANNOTATION_BYTES} bytes",
                          fingerprint)
    signature = annotations.get(ANNOTATION_SIGNATURE)
    if signature is None:
        return Unreadable("the layer has no signature annotation", fingerprint)
    return LegacySignature(payload=payload, signature=signature,
                           certificate=annotations.get(ANNOTATION_CERTIFICATE),
                           chain=annotations.get(ANNOTATION_CHAIN),
                           rekor_bundle=annotations.get(ANNOTATION_BUNDLE),
                           fingerprint=fingerprint)


def bundle_manifests(index: bytes) -> list[Blob] | Unreadable:
    """The sigstore-bundle manifests listed by a referrers index (API or fallback tag).

    Only the first :data:`MAX_SIGNATURES` are kept: a verdict does bounded work however
    many referrers an image has.
    """
    manifests = _json_list(index, MAX_INDEX_BYTES, "the referrers index", "manifests")
    if isinstance(manifests, Unreadable):
        return manifests
    found = []
    for item in manifests:
        blob = _descriptor(item)
        if blob is not None and isinstance(item, dict) \
                and item.get("artifactType") in BUNDLE_TYPES:
            found.append(blob)
            if len(found) == MAX_SIGNATURES:
                break
    return found


def bundle_layer(manifest: bytes) -> Blob | Unreadable:
    """The bundle blob of a bundle manifest (its one layer of a bundle media type)."""
    layers = _json_list(manifest, MAX_MANIFEST_BYTES, "the bundle manifest", "layers")
    if isinstance(layers, Unreadable):
        return layers
    if not layers:
        return Unreadable("the bundle manifest has no layers")
    blob = _descriptor(layers[0])
    if blob is None or blob.media_type not in BUNDLE_TYPES:
        return Unreadable("the bundle manifest's layer is not a sigstore bundle")
    if blob.size > MAX_BUNDLE_BYTES:
        return Unreadable(f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    return blob


def parse_bundle(data: bytes) -> SigstoreBundle | Unreadable:
    """A sigstore bundle (v0.1 to v0.3) from its JSON, decoded but not verified."""
    fingerprint = _fingerprint(data)
    doc = _json(data, MAX_BUNDLE_BYTES, "the bundle")
    if isinstance(doc, Unreadable):
        return Unreadable(doc.reason, fingerprint)
    try:
        return _bundle(doc, fingerprint)
    except Invalid as exc:
        return Unreadable(exc.reason, fingerprint)
    except (KeyError, TypeError, AttributeError, ValueError):
        return Unreadable("the bundle is not a sigstore bundle", fingerprint)


def _bundle(doc: dict[str, Any], fingerprint: str) -> SigstoreBundle:
    media_type = doc.get("mediaType")
    if media_type not in BUNDLE_TYPES:
        raise Invalid(f"unknown bundle media type {str(media_type)[:80]!r}")
    material = doc["verificationMaterial"]
    certificates: tuple[bytes, ...] = ()
    hint = None
    if "certificate" in material:
        certificates = (b64decode(material["certificate"]["rawBytes"], "the certificate"),)
    elif "x509CertificateChain" in material:
        certs = material["x509CertificateChain"]["certificates"][:_MAX_BUNDLE_CERTS]
        certificates = tuple(b64decode(c["rawBytes"], "a certificate") for c in certs)
    elif "publicKey" in material:
        hint = str(material["publicKey"].get("hint", ""))
    else:
        raise Invalid("the bundle has no certificate or public key")
    entries = material.get("tlogEntries") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Invalid("the bundle's tlog entries are not a list of entries")
    return SigstoreBundle(media_type=media_type, content=_content(doc),
                          certificates=certificates, key_hint=hint,
                          tlog_entries=tuple(entries[:_MAX_TLOG_ENTRIES]),
                          fingerprint=fingerprint)


def _content(doc: dict[str, Any]) -> DsseEnvelope | MessageSignature:
    if "dsseEnvelope" in doc:
        env = doc["dsseEnvelope"]
        sigs = env.get("signatures") or []
        return DsseEnvelope(payload=b64decode(env["payload"], "the DSSE payload"),
                            payload_type=str(env["payloadType"]),
                            signatures=tuple(b64decode(s["sig"], "a DSSE signature")
                                             for s in sigs[:4]))
    if "messageSignature" in doc:
        msg = doc["messageSignature"]
        digest = msg.get("messageDigest") or {}
        return MessageSignature(algorithm=str(digest.get("algorithm", "")),
                                digest=b64decode(digest.get("digest", ""), "the digest"),
                                signature=b64decode(msg["signature"], "the signature"))
    raise Invalid("the bundle has neither a DSSE envelope nor a message signature")


def _fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()
