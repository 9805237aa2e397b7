"""Verification, not presence: does one legacy cosign signature, checked with one signer,
sign this digest? (Sigstore bundles: :mod:`mirror.policy.bundles`.)

Legacy cosign signatures (SIGNATURE_SPEC): the signature over the payload bytes checks
with the signer's key (or the key of a certificate that chains to the signer's roots and
names its identity); the payload is a cosign simple-signing document whose
``critical.type`` is ``cosign container image signature`` and whose
``critical.image.docker-manifest-digest`` is the digest pulled; when the signer asks for
the transparency log, the Rekor SET checks and the logged entry is this signature, and a
certificate must be valid at the logged time.

Every function returns a :class:`~mirror.policy.model.Check`; nothing raises.
"""

from __future__ import annotations

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
    key_pem,
    load_certificate,
    load_certificates,
    load_public_key,
    verify,
)
from mirror.policy.model import (
    COSIGN_SIGNATURE_TYPE,
    Check,
    LegacySignature,
)
from mirror.policy.parse import is_digest
from mirror.policy.tlog import LoggedEntry, verify_set
from mirror.policy.trust import CertSigner, KeySigner, Signer


def verify_legacy(sig: LegacySignature, digest: str | None, signer: Signer,
                  rekor_keys: Mapping[str, PublicKey], *,
                  reference: ReferenceRule | None = None,
                  now: datetime | None = None) -> Check:
    """Check one legacy cosign signature of image ``digest`` with ``signer``.

    Args:
        sig: the signature as read from the ``.sig`` manifest.
        digest: the manifest digest pulled (``None`` when it cannot be known: refused).
        signer: a key, or certificate roots and an identity.
        rekor_keys: the trusted Rekor keys by log id, for signers that ask for the log.
        reference: how ``critical.identity.docker-reference`` must match, if at all.
        now: the time a certificate without a logged time must be valid at.
    """
    try:
        raw = b64decode(sig.signature, "the signature")
        key, cert = _legacy_key(sig, signer)
        if not verify(key, raw, sig.payload):
            raise Invalid(f"the signature does not verify with {_named(signer)}")
        check_payload(sig.payload, digest, reference)
        logged = _legacy_log(sig, signer, rekor_keys, key, cert)
        if cert is not None and isinstance(signer, CertSigner):
            when = at_time(logged.integrated_time) if logged else now or datetime.now(UTC)
            chain = load_certificates(sig.chain, "the certificate chain") if sig.chain else []
            signer.check(cert, chain, when)
    except Invalid as exc:
        return Check(False, exc.reason)
    return Check(True, f"signed by {signer.name}", signer.name)


def _named(signer: Signer) -> str:
    kind = "key" if isinstance(signer, KeySigner) else "the certificate of"
    return f"{kind} {signer.name}"


def _legacy_key(sig: LegacySignature,
                signer: Signer) -> tuple[PublicKey, x509.Certificate | None]:
    if isinstance(signer, KeySigner):
        return signer.key, None
    if sig.certificate is None:
        raise Invalid("the signature carries no certificate")
    cert = load_certificate(sig.certificate, "the signature's certificate")
    return certificate_key(cert), cert


def _legacy_log(sig: LegacySignature, signer: Signer, rekor_keys: Mapping[str, PublicKey],
                key: PublicKey, cert: x509.Certificate | None) -> LoggedEntry | None:
    if not signer.tlog:
        return None
    if not rekor_keys:
        raise Invalid("no transparency log is trusted, and the signer needs one")
    if sig.rekor_bundle is None:
        raise Invalid("the signature carries no transparency-log entry (SET)")
    logged = verify_set(sig.rekor_bundle, rekor_keys)
    check_rekord(logged.body, sig.payload, sig.signature, key, cert)
    return logged


def check_rekord(body: Mapping[str, Any], payload: bytes, signature_b64: str,
                 key: PublicKey, cert: x509.Certificate | None) -> None:
    """Check that a logged ``hashedrekord`` or ``rekord`` entry is this signature: the
    payload's hash, the signature and the signer's key or certificate.

    Raises:
        Invalid: another kind of entry, or any of the three differs.
    """
    try:
        spec = body["spec"]
        kind = body["kind"]
        logged_sig = spec["signature"]["content"]
        logged_pem = b64decode(spec["signature"]["publicKey"]["content"], "the logged key")
        logged_hash = spec["data"]["hash"]["value"]
    except (KeyError, TypeError):
        raise Invalid("the logged entry is not a rekord") from None
    if kind not in ("hashedrekord", "rekord"):
        raise Invalid(f"the logged entry is a {str(kind)[:40]}, not a rekord")
    if logged_hash != hashlib.sha256(payload).hexdigest():
        raise Invalid("the logged entry is of another payload")
    if b64decode(str(logged_sig), "the logged signature") \
            != b64decode(signature_b64, "the signature"):
        raise Invalid("the logged entry is of another signature")
    if not _same_signer(logged_pem, key, cert):
        raise Invalid("the logged entry names another key or certificate")


def _same_signer(logged_pem: bytes, key: PublicKey, cert: x509.Certificate | None) -> bool:
    if cert is not None:
        try:
            return load_certificate(logged_pem, "the logged certificate") == cert
        except Invalid:
            return False
    try:
        return key_pem(load_public_key(logged_pem, "the logged key")) == key_pem(key)
    except Invalid:
        return False


class ReferenceRule:
    """How a payload's ``critical.identity.docker-reference`` must match (containers/image):
    ``matchRepository`` (same repository), ``matchExact`` (same reference, with its tag)
    or ``exactReference`` (a given reference)."""

    def __init__(self, rule: str, image_reference: str, exact: str | None = None) -> None:
        self.rule, self.image, self.exact = rule, image_reference, exact

    def mismatch(self, signed: str) -> str | None:
        """Why ``signed`` does not match, or ``None`` when it does."""
        if self.rule == "matchRepository":
            ok = _repository(signed) == _repository(self.image)
        elif self.rule == "matchExact":
            ok = _has_tag(self.image) and _normal(signed) == _normal(self.image)
        else:
            ok = _normal(signed) == _normal(self.exact or "")
        return None if ok else f"the signature is for {signed}, not {self.image}"


def _normal(ref: str) -> str:
    first, sep, _ = ref.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"):
        ref = f"docker.io/{ref if sep else 'library/' + ref}"
    return ref


def _repository(ref: str) -> str:
    name = _normal(ref).split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}"


def _has_tag(ref: str) -> bool:
    return ":" in ref.rsplit("/", 1)[-1].split("@", 1)[0]


def check_payload(payload: bytes, digest: str | None,
                  reference: ReferenceRule | None = None) -> dict[str, Any]:
    """Read a cosign simple-signing payload strictly and check it names ``digest``.

    Raises:
        Invalid: not JSON, members missing or extra, another type, or another digest.
    """
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise Invalid("the payload is not JSON") from None
    top = _exact(doc, {"critical", "optional"}, "the payload", optional={"optional"})
    fields = _exact(top["critical"], {"type", "image", "identity"}, "critical")
    if fields["type"] != COSIGN_SIGNATURE_TYPE:
        raise Invalid(f"the payload's type is {str(fields['type'])[:60]!r}, not a cosign "
                      "container image signature")
    signed = _exact(fields["image"], {"docker-manifest-digest"}, "critical.image")
    named = signed["docker-manifest-digest"]
    ident = _exact(fields["identity"], {"docker-reference"}, "critical.identity")
    _check_optional(doc.get("optional"))
    if not is_digest(named):
        raise Invalid("the payload names no valid digest")
    if digest is None:
        raise Invalid("the image's digest is not known")
    if named != digest:
        raise Invalid(f"the payload signs {named}, not {digest}")
    if reference is not None and isinstance(ident["docker-reference"], str):
        why = reference.mismatch(ident["docker-reference"])
        if why is not None:
            raise Invalid(why)
    return doc  # type: ignore[no-any-return]


def _exact(value: Any, names: set[str], what: str,
           optional: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what} is not a JSON object")
    missing = names - optional - value.keys()
    extra = value.keys() - names
    if missing or extra:
        raise Invalid(f"{what} has {'no ' + ', '.join(sorted(missing)) if missing else ''}"
                      f"{' and ' if missing and extra else ''}"
                      f"{'unknown ' + ', '.join(sorted(extra))[:80] if extra else ''}")
    return value


def _check_optional(optional: Any) -> None:
    if optional is None:
        return
    if not isinstance(optional, dict):
        raise Invalid("optional is not a JSON object")
    if "creator" in optional and not isinstance(optional["creator"], str):
        raise Invalid("optional.creator is not a string")
    timestamp = optional.get("timestamp", 0)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise Invalid("optional.timestamp is not an integer")
