"""Keys, signatures and certificates, with ``cryptography``: the primitives the verifier uses.

Every function here turns bad input into :class:`Invalid` with a short reason (never another
exception), and reads bounded input only: a PEM text longer than :data:`MAX_PEM` or holding
more than :data:`MAX_CERTS` certificates is refused before it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

MAX_PEM = 64 * 1024
"""The longest PEM text (key, certificate or chain) read."""
MAX_CERTS = 8
"""The most certificates in one chain."""
MAX_CHAIN_DEPTH = 6
"""The longest path from a leaf to a trusted root."""

#: Fulcio's extensions for the OIDC issuer: v1 holds the raw string, v2 a DER UTF8String.
OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")

_B64_STRICT = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class Invalid(Exception):
    """Input that does not verify or cannot be read; ``reason`` says why, on one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def b64decode(text: str | bytes, what: str) -> bytes:
    """Standard base64 with padding, ignoring line breaks (as Go's StdEncoding does).

    Raises:
        Invalid: other characters, or wrong padding.
    """
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    raw = raw.replace(b"\r", b"").replace(b"\n", b"")
    if len(raw) % 4 or _B64_STRICT.fullmatch(raw) is None:
        raise Invalid(f"{what} is not valid base64")
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise Invalid(f"{what} is not valid base64") from None


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON for the values Rekor signs (ASCII strings and integers)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def load_public_key(pem: bytes | str, what: str = "key") -> PublicKey:
    """One PEM public key: ECDSA P-256/384/521, Ed25519 or RSA (2048 bits and up).

    Raises:
        Invalid: not exactly one PEM public key of those kinds.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_PEM:
        raise Invalid(f"{what} is longer than {MAX_PEM} bytes")
    if data.count(b"-----BEGIN ") != 1:
        raise Invalid(f"{what} is not one PEM public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise Invalid(f"{what} is not a PEM public key") from None
    return supported_key(key, what)


def supported_key(key: object, what: str) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES):
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise Invalid(f"{what} is not an ECDSA P-256/384/521, Ed25519 or RSA (2048+) key")


def key_pem(key: PublicKey) -> bytes:
    """The key as SubjectPublicKeyInfo PEM (how Rekor logs a key)."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: PublicKey) -> bytes:
    """SHA-256 of the key's DER SubjectPublicKeyInfo (Rekor's and the CT logs' key id)."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize()


def verify(key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` checks with ``key``, the way cosign signs.

    ECDSA: DER over the curve's hash (SHA-256, -384, -512), or over SHA-256 whatever the
    curve (cosign 2 and sigstore-js sign P-384 keys with SHA-256); Ed25519: pure; RSA:
    PKCS#1 v1.5 with SHA-256 (and PSS with SHA-256, which some signers use).
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _verify_ec(key, signature, data)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            return _verify_rsa(key, signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _verify_ec(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    own = _ec_hash(key)
    algorithms: list[hashes.HashAlgorithm] = [own]
    if not isinstance(own, hashes.SHA256):
        algorithms.append(hashes.SHA256())
    for algorithm in algorithms:
        try:
            key.verify(signature, data, ec.ECDSA(algorithm))
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


def _ec_hash(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    if isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    if isinstance(key.curve, ec.SECP521R1):
        return hashes.SHA512()
    return hashes.SHA256()


def _verify_rsa(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    for pad in (padding.PKCS1v15(), pss):
        try:
            key.verify(signature, data, pad, hashes.SHA256())
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


def load_certificates(pem: bytes | str, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM text (at least one, at most :data:`MAX_CERTS`).

    Raises:
        Invalid: too long, none, too many, or one that does not parse.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_PEM:
        raise Invalid(f"{what} is longer than {MAX_PEM} bytes")
    count = data.count(b"-----BEGIN CERTIFICATE-----")
    if count == 0:
        raise Invalid(f"{what} holds no PEM certificate")
    if count > MAX_CERTS:
        raise Invalid(f"{what} holds more than {MAX_CERTS} certificates")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise Invalid(f"{what} is not a valid PEM certificate") from None


def load_certificate(pem: bytes | str, what: str) -> x509.Certificate:
    """Exactly one PEM certificate.

    Raises:
        Invalid: none, more than one, or unreadable.
    """
    certs = load_certificates(pem, what)
    if len(certs) != 1:
        raise Invalid(f"{what} holds {len(certs)} certificates, expected one")
    return certs[0]


def load_der_certificate(der: bytes, what: str) -> x509.Certificate:
    """One DER certificate (a bundle's ``rawBytes``).

    Raises:
        Invalid: unreadable.
    """
    if len(der) > MAX_PEM:
        raise Invalid(f"{what} is longer than {MAX_PEM} bytes")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise Invalid(f"{what} is not a valid DER certificate") from None


def certificate_key(cert: x509.Certificate, what: str = "certificate") -> PublicKey:
    """The certificate's public key, if it is of a supported kind.

    Raises:
        Invalid: another kind of key.
    """
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise Invalid(f"{what} has an unreadable public key") from None
    return supported_key(key, f"{what}'s key")


def valid_at(cert: x509.Certificate, when: datetime) -> bool:
    """Whether ``when`` falls within the certificate's validity period."""
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def at_time(seconds: int) -> datetime:
    """A Unix time as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def chain_to_root(leaf: x509.Certificate, roots: Sequence[x509.Certificate],
                  intermediates: Sequence[x509.Certificate], when: datetime) -> None:
    """Check that a path leads from ``leaf`` to one of ``roots``, valid at ``when``.

    Any certificate in ``roots`` is a trust anchor (a configured intermediate may be one).
    Each issuer on the way must be a CA, valid at ``when``, and sign the one below it.

    Raises:
        Invalid: no such path.
    """
    if not valid_at(leaf, when):
        raise Invalid(f"the certificate is not valid at {when:%Y-%m-%dT%H:%M:%SZ}")
    current = leaf
    for _ in range(MAX_CHAIN_DEPTH):
        if any(_issued_by(current, root, when) for root in roots):
            return
        issuer = next((c for c in intermediates if c != current
                       and _issued_by(current, c, when)), None)
        if issuer is None:
            break
        current = issuer
    raise Invalid("the certificate does not chain to a trusted root")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, when: datetime) -> bool:
    if not valid_at(issuer, when) or not _is_ca(issuer):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):  # ValueError: duplicate or bad extensions
        return False


@dataclass(frozen=True)
class CertIdentity:
    """Who a certificate names: its SAN values (emails, URIs, DNS names) and OIDC issuer."""

    emails: tuple[str, ...]
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    issuer: str | None

    @property
    def subjects(self) -> tuple[str, ...]:
        """Every SAN value, emails first."""
        return self.emails + self.uris + self.dns_names


def identity(cert: x509.Certificate) -> CertIdentity:
    """The SAN values and Fulcio OIDC issuer of a certificate (empty when it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        san = x509.SubjectAlternativeName([])
    return CertIdentity(
        emails=tuple(san.get_values_for_type(x509.RFC822Name)),
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        issuer=_oidc_issuer(cert),
    )


def _oidc_issuer(cert: x509.Certificate) -> str | None:
    for oid, der in ((OID_ISSUER_V2, True), (OID_ISSUER_V1, False)):
        try:
            value = cert.extensions.get_extension_for_oid(oid).value
        except (x509.ExtensionNotFound, ValueError):
            continue
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        text = _der_utf8(raw) if der else raw.decode("utf-8", "replace")
        if text:
            return text
    return None


def _der_utf8(raw: bytes) -> str | None:
    """The text of a DER UTF8String (tag 12) with a short or one/two-byte long length."""
    if len(raw) < 2 or raw[0] != 0x0C:
        return None
    length, start = raw[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(raw) < 2 + count:
            return None
        length, start = int.from_bytes(raw[2:2 + count], "big"), 2 + count
    body = raw[start:start + length]
    return body.decode("utf-8", "replace") if len(body) == length else None


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


def verify_prehashed(key: PublicKey, signature: bytes, sha256_digest: bytes) -> bool:
    """Whether ``signature`` checks over data known only by its SHA-256 (a bundle's
    message signature); Ed25519 cannot sign a digest, so it never passes here."""
    prehashed = Prehashed(hashes.SHA256())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, sha256_digest, ec.ECDSA(prehashed))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, sha256_digest, padding.PKCS1v15(), prehashed)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
