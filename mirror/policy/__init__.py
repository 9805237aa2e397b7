"""Signatures and policy: read cosign and sigstore signatures, verify them, and decide.

A box below ``pull`` that imports only config and the standard crypto library::

    parse     the .sig manifest and its payloads, referrers and bundles -> typed values
    verify    one legacy signature x one signer -> Check (keyed, keyless; offline)
    bundles   one sigstore bundle x one signer -> Check (DSSE, message signature)
    tlog      Rekor SETs, inclusion proofs and checkpoints
    trust     signers and the sigstore trusted root
    evaluate  the policy's rules -> Verdict, and the verdict cache
    gate      a manifest being served -> Verdict, signatures read through a reader the
              pull service gives (so they are cached like any content)
"""

from mirror.policy.evaluate import Policy, VerdictCache, compile_policy, evaluate
from mirror.policy.model import (
    LegacySignature,
    Signature,
    SigstoreBundle,
    Unreadable,
    Verdict,
)
from mirror.policy.parse import (
    bundle_layer,
    bundle_manifests,
    is_signature_artifact,
    legacy_signature,
    parse_bundle,
    referrers_tag,
    sig_tag,
    signature_layers,
)

__all__ = [
    "LegacySignature",
    "Policy",
    "Signature",
    "SigstoreBundle",
    "Unreadable",
    "Verdict",
    "VerdictCache",
    "bundle_layer",
    "bundle_manifests",
    "compile_policy",
    "evaluate",
    "is_signature_artifact",
    "legacy_signature",
    "parse_bundle",
    "referrers_tag",
    "sig_tag",
    "signature_layers",
]
