"""Trust material, loaded once: signers (a key, or a certificate authority and an identity)
and the logs' keys, from PEM files and a sigstore ``trusted_root.json`` read offline."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mirror.policy.crypto import (
    MAX_PEM,
    CertIdentity,
    Invalid,
    PublicKey,
    b64decode,
    chain_to_root,
    identity,
    key_id,
    load_der_certificate,
    supported_key,
)

MAX_TRUSTED_ROOT = 1024 * 1024


@dataclass(frozen=True)
class IdentityRule:
    """Which certificates a keyless signer accepts: the OIDC issuer (exact) and the subject
    (a SAN email or URI, exactly, or a regular expression searched in it, as cosign does).
    ``hostname`` asks for a DNS SAN (private PKI certificates)."""

    issuer: str | None = None
    issuer_regex: re.Pattern[str] | None = None
    subject: str | None = None
    subject_regex: re.Pattern[str] | None = None
    hostname: str | None = None

    def mismatch(self, ident: CertIdentity) -> str | None:
        """Why ``ident`` does not match, or ``None`` when it does."""
        if self.issuer is not None and ident.issuer != self.issuer:
            return f"the certificate's issuer is {ident.issuer or 'missing'}, not {self.issuer}"
        if self.issuer_regex is not None and not self.issuer_regex.search(ident.issuer or ""):
            return f"the certificate's issuer {ident.issuer or 'missing'} does not match " \
                   f"{self.issuer_regex.pattern}"
        subjects = ident.emails + ident.uris
        if self.subject is not None and self.subject not in subjects:
            return f"the certificate names {_first(subjects)}, not {self.subject}"
        if self.subject_regex is not None \
                and not any(self.subject_regex.search(s) for s in subjects):
            return f"the certificate names {_first(subjects)}, which does not match " \
                   f"{self.subject_regex.pattern}"
        if self.hostname is not None and self.hostname not in ident.dns_names:
            return f"the certificate does not name host {self.hostname}"
        return None


def _first(values: tuple[str, ...]) -> str:
    return values[0] if values else "no subject"


@dataclass(frozen=True)
class KeySigner:
    """A signer known by its public key; ``tlog`` asks for a Rekor entry of the signature."""

    name: str
    key: PublicKey
    tlog: bool = False


@dataclass(frozen=True)
class CertSigner:
    """A signer known by the certificates it holds: issued under ``roots`` (through
    ``intermediates`` or the chain that comes with the signature) to ``identity``.

    ``tlog`` (Fulcio's short-lived certificates) asks for a Rekor entry, whose time is the
    time the certificate must be valid at; without it, the certificate is checked now.
    """

    name: str
    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    identity: IdentityRule = field(default_factory=IdentityRule)
    tlog: bool = True

    def check(self, cert: x509.Certificate, chain: Sequence[x509.Certificate],
              when: datetime) -> None:
        """Check that ``cert`` chains to the roots (through the configured intermediates
        or ``chain``, the certificates that came with the signature) at ``when``, and
        names the identity.

        Raises:
            Invalid: it does not.
        """
        chain_to_root(cert, self.roots, [*self.intermediates, *chain], when)
        why = self.identity.mismatch(identity(cert))
        if why is not None:
            raise Invalid(why)


Signer = KeySigner | CertSigner


@dataclass(frozen=True)
class TrustedRoot:
    """What a sigstore ``trusted_root.json`` holds that the verifier uses: the Fulcio CAs
    (roots and intermediates) and the Rekor keys by log id (hex)."""

    ca_roots: tuple[x509.Certificate, ...] = ()
    ca_intermediates: tuple[x509.Certificate, ...] = ()
    rekor_keys: dict[str, PublicKey] = field(default_factory=dict)


def load_trusted_root(data: bytes) -> TrustedRoot:
    """Read a sigstore trusted root (``application/vnd.dev.sigstore.trustedroot+json``).

    Raises:
        Invalid: not JSON, too large, or a key or certificate that does not load.
    """
    if len(data) > MAX_TRUSTED_ROOT:
        raise Invalid(f"the trusted root is larger than {MAX_TRUSTED_ROOT} bytes")
    try:
        doc = json.loads(data)
        authorities = doc.get("certificateAuthorities") or []
        tlogs = doc.get("tlogs") or []
    except (ValueError, AttributeError):
        raise Invalid("the trusted root is not a sigstore trusted_root.json") from None
    roots: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for ca in authorities:
        chain = [load_der_certificate(b64decode(c["rawBytes"], "a CA certificate"),
                                      "a CA certificate")
                 for c in _get(ca, "certChain", "certificates")]
        if chain:
            intermediates.extend(chain[:-1])
            roots.append(chain[-1])
    keys = {}
    for log in tlogs:
        key = _log_key(log)
        keys[key_id(key).hex()] = key
    return TrustedRoot(tuple(roots), tuple(intermediates), keys)


def _get(value: Any, *path: str) -> list[Any]:
    for name in path:
        if not isinstance(value, dict):
            raise Invalid("the trusted root is not a sigstore trusted_root.json")
        value = value.get(name)
    if not isinstance(value, list):
        raise Invalid("the trusted root is not a sigstore trusted_root.json")
    return value


def _log_key(log: Any) -> PublicKey:
    try:
        der = b64decode(log["publicKey"]["rawBytes"], "a log key")
    except (KeyError, TypeError):
        raise Invalid("the trusted root has a log without a key") from None
    if len(der) > MAX_PEM:
        raise Invalid("a log key of the trusted root is too long")
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise Invalid("a log key of the trusted root does not load") from None
    return supported_key(key, "a log key of the trusted root")
