"""Verification, not presence: does one sigstore bundle, checked with one signer, sign
this digest?

Sigstore bundles (BUNDLE_SPEC, v0.1 to v0.3): a DSSE envelope (exactly one signature over
the PAE of an in-toto statement whose subject holds the digest) or a message signature
over the digest itself. With a certificate, the tlog entry's promise or proof checks with
a trusted Rekor key, the logged entry is this signature, and the certificate chains to the
signer's roots at the logged time and names its identity. A keyed bundle checks with the
signer's key, and its tlog entry too when the key asks for one.

:func:`verify_bundle` returns a :class:`~mirror.policy.model.Check`; it never raises.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from mirror.policy.crypto import (
    Invalid,
    PublicKey,
    at_time,
    b64decode,
    certificate_key,
    load_der_certificate,
    verify,
    verify_prehashed,
)
from mirror.policy.model import Check, DsseEnvelope, MessageSignature, SigstoreBundle
from mirror.policy.tlog import LoggedEntry, verify_bundle_entry
from mirror.policy.trust import CertSigner, KeySigner, Signer

IN_TOTO_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPES = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
#: In-toto predicates that sign an image: cosign v3's signature, and cosign's attestation.
SIGNING_PREDICATES = ("https://sigstore.dev/cosign/sign/v1",
                      "https://cosign.sigstore.dev/attestation/v1")


def verify_bundle(bundle: SigstoreBundle, digest: str | None, signer: Signer,
                  rekor_keys: Mapping[str, PublicKey], *,
                  predicates: tuple[str, ...] = SIGNING_PREDICATES) -> Check:
    """Check one sigstore bundle of image ``digest`` with ``signer`` (a DSSE statement
    must be of one of ``predicates``: image signatures, unless asked otherwise)."""
    try:
        if digest is None:
            raise Invalid("the image's digest is not known")
        key, cert = _bundle_key(bundle, signer)
        signature = _check_content(bundle, digest, key, predicates)
        logged = _bundle_log(bundle, signer, rekor_keys, signature)
        if cert is not None and isinstance(signer, CertSigner):
            when = at_time(logged.integrated_time) if logged else datetime.now(UTC)
            chain = [load_der_certificate(c, "a chain certificate")
                     for c in bundle.certificates[1:]]
            signer.check(cert, chain, when)
    except Invalid as exc:
        return Check(False, exc.reason)
    return Check(True, f"signed by {signer.name}", signer.name)


def _bundle_key(bundle: SigstoreBundle,
                signer: Signer) -> tuple[PublicKey, x509.Certificate | None]:
    if isinstance(signer, KeySigner):
        if bundle.certificates:
            raise Invalid(f"the bundle is signed with a certificate, not key {signer.name}")
        return signer.key, None
    if not bundle.certificates:
        raise Invalid("the bundle carries no certificate")
    cert = load_der_certificate(bundle.certificates[0], "the bundle's certificate")
    return certificate_key(cert), cert


def _check_content(bundle: SigstoreBundle, digest: str, key: PublicKey,
                   predicates: tuple[str, ...]) -> bytes:
    content = bundle.content
    if isinstance(content, MessageSignature):
        if predicates != SIGNING_PREDICATES:
            raise Invalid("the bundle is a message signature, not an attestation")
        if content.algorithm != "SHA2_256" or "sha256:" + content.digest.hex() != digest:
            raise Invalid(f"the bundle signs another digest than {digest}")
        if not verify_prehashed(key, content.signature, content.digest):
            raise Invalid("the bundle's message signature does not verify")
        return content.signature
    _check_envelope(content, digest, predicates)
    if not verify(key, content.signatures[0], pae(content.payload_type, content.payload)):
        raise Invalid("the bundle's DSSE signature does not verify")
    return content.signatures[0]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, the bytes a DSSE signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _check_envelope(env: DsseEnvelope, digest: str,
                    predicates: tuple[str, ...] = SIGNING_PREDICATES) -> None:
    if len(env.signatures) != 1:
        raise Invalid(f"the DSSE envelope has {len(env.signatures)} signatures, expected 1")
    if env.payload_type != IN_TOTO_TYPE:
        raise Invalid(f"the DSSE payload type is {env.payload_type[:60]!r}, not in-toto")
    try:
        statement = json.loads(env.payload)
        kind, predicate = statement["_type"], statement["predicateType"]
        subjects = statement["subject"][:64]
        hexes = {s["digest"].get("sha256") for s in subjects if isinstance(s, dict)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise Invalid("the DSSE payload is not an in-toto statement") from None
    if kind not in STATEMENT_TYPES:
        raise Invalid(f"the statement type {str(kind)[:60]!r} is not in-toto's")
    if predicate not in predicates:
        what = "an image signature" if predicates == SIGNING_PREDICATES else " or ".join(
            predicates)
        raise Invalid(f"the predicate {str(predicate)[:80]!r} is not {what}")
    if digest.removeprefix("sha256:") not in hexes:
        raise Invalid(f"the bundle's subject is another digest than {digest}")


def _bundle_log(bundle: SigstoreBundle, signer: Signer, rekor_keys: Mapping[str, PublicKey],
                signature: bytes) -> LoggedEntry | None:
    if not signer.tlog:
        return None
    if not bundle.tlog_entries:
        raise Invalid("the bundle carries no transparency-log entry")
    logged = verify_bundle_entry(bundle.tlog_entries[0], rekor_keys)
    _check_logged_signature(logged.body, bundle, signature)
    return logged


def _check_logged_signature(body: Mapping[str, Any], bundle: SigstoreBundle,
                            signature: bytes) -> None:
    try:
        spec = body["spec"]
        if body["kind"] == "dsse" and isinstance(bundle.content, DsseEnvelope):
            logged = [b64decode(s["signature"], "a logged signature") for s in spec["signatures"]]
            payload_hash = spec["payloadHash"]["value"]
            ok = signature in logged and \
                payload_hash == hashlib.sha256(bundle.content.payload).hexdigest()
        elif body["kind"] == "intoto" and isinstance(bundle.content, DsseEnvelope):
            # intoto 0.0.2 keeps the envelope with each signature base64-encoded twice
            env = spec["content"]["envelope"]
            logged = [b64decode(b64decode(s["sig"], "a logged signature"), "a signature")
                      for s in env["signatures"]]
            payload_hash = spec["content"]["payloadHash"]["value"]
            ok = signature in logged and \
                payload_hash == hashlib.sha256(bundle.content.payload).hexdigest()
        elif body["kind"] == "hashedrekord":
            ok = base64.b64decode(spec["signature"]["content"]) == signature
        else:
            ok = False
    except (KeyError, TypeError, ValueError, Invalid):
        ok = False
    if not ok:
        raise Invalid("the logged entry is not this bundle's signature")
