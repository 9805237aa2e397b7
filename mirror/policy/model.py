"""The typed values of the policy box: signatures as read, and the verdict.

A signature is read once from what a registry holds (a layer of cosign's ``.sig`` manifest
and its payload blob, or a sigstore bundle) into one of these values; what cannot be read
becomes :class:`Unreadable` with its reason, so that a verdict can say why and nothing
raises past the parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIMPLESIGNING_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
BUNDLE_TYPES = (
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
)
DSSE_ENVELOPE_TYPE = "application/vnd.dsse.envelope.v1+json"
"""A layer of cosign's ``.att`` manifest: one attestation's DSSE envelope."""
ANNOTATION_SIGNATURE = "dev.cosignproject.cosign/signature"
ANNOTATION_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANNOTATION_CHAIN = "dev.sigstore.cosign/chain"
ANNOTATION_BUNDLE = "dev.sigstore.cosign/bundle"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"

MAX_MANIFEST_BYTES = 256 * 1024
"""The largest signature manifest or bundle manifest read."""
MAX_INDEX_BYTES = 4 * 1024 * 1024
"""The largest referrers index read (Distribution's own manifest limit); of its entries,
only the first :data:`MAX_SIGNATURES` bundles are kept."""
MAX_LAYERS = 64
"""The most signatures one ``.sig`` manifest may hold; more is refused whole."""
MAX_PAYLOAD_BYTES = 64 * 1024
"""The largest simple-signing payload read."""
MAX_ANNOTATION_BYTES = 64 * 1024
"""The largest annotation value read (a certificate chain or a Rekor bundle)."""
MAX_BUNDLE_BYTES = 256 * 1024
"""The largest sigstore bundle read."""
MAX_SIGNATURES = 64
"""The most signatures one verdict looks at (with thousands of referrers, the first ones)."""


@dataclass(frozen=True)
class LegacySignature:
    """One cosign signature of the ``sha256-<hex>.sig`` layout.

    ``payload`` is the layer blob, exactly as signed; ``signature`` the base64 text of the
    ``dev.cosignproject.cosign/signature`` annotation; the rest the optional annotations.
    """

    payload: bytes
    signature: str
    certificate: str | None = None
    chain: str | None = None
    rekor_bundle: str | None = None
    fingerprint: str = ""


@dataclass(frozen=True)
class DsseEnvelope:
    """A DSSE envelope: the payload and its type, and each signature (raw bytes)."""

    payload: bytes
    payload_type: str
    signatures: tuple[bytes, ...]


@dataclass(frozen=True)
class MessageSignature:
    """A bundle's message signature: the digest of what was signed, and the signature."""

    algorithm: str
    digest: bytes
    signature: bytes


@dataclass(frozen=True)
class SigstoreBundle:
    """A sigstore bundle (v0.1 to v0.3), its parts decoded but not yet verified.

    ``certificates`` are the DER certificates (the leaf first); ``key_hint`` is set for a
    bundle signed with a key; ``tlog_entries`` keeps the raw transparency-log entries.
    """

    media_type: str
    content: DsseEnvelope | MessageSignature
    certificates: tuple[bytes, ...] = ()
    key_hint: str | None = None
    tlog_entries: tuple[dict[str, Any], ...] = ()
    fingerprint: str = ""


@dataclass(frozen=True)
class Attestation:
    """One DSSE envelope of cosign's ``sha256-<hex>.att`` layout (an in-toto statement),
    decoded but not verified; read for the vulnerability gate (:mod:`mirror.policy.vuln`)."""

    envelope: DsseEnvelope
    fingerprint: str = ""


@dataclass(frozen=True)
class Unreadable:
    """Something that was meant to be a signature but could not be read; ``reason`` says why."""

    reason: str
    fingerprint: str = ""


Signature = LegacySignature | SigstoreBundle | Attestation | Unreadable


@dataclass(frozen=True)
class Check:
    """The outcome of verifying one signature against one signer."""

    ok: bool
    reason: str
    signer: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What the policy says about one image.

    Attributes:
        allowed: serve it (also true for a failure under a ``warn`` rule).
        rule: the 1-based number of the rule that decided, or ``None`` for ``default``.
        reason: one line, e.g. ``no signature by release or ci`` or ``denied by rule 2``.
        signer: the key or identity name whose signature passed, if any.
        warning: the image failed a ``warn`` rule (served, but to be logged and counted).
        expires: see below.
    """

    allowed: bool
    rule: int | None
    reason: str
    signer: str | None = None
    warning: bool = False
    checks: tuple[str, ...] = field(default=(), compare=False)
    expires: float | None = field(default=None, compare=False)
    """Epoch seconds after which the verdict must be decided again (a vulnerability
    report that gets too old), or ``None``."""
