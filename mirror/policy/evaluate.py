"""The verdict on one image: the first rule that matches it decides, from its signatures.

:func:`compile_policy` turns the validated ``policy`` settings into trust material once
(keys loaded, the trusted root read); :func:`evaluate` is a pure function of that policy,
the image (registry, repository, digest) and the signatures read for it. A
:class:`VerdictCache` keeps verdicts per (image, policy hash, signature set hash), so a
verdict is computed again only when the signatures or the policy change.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.config.policy import PolicyRule, PolicySettings
from mirror.policy.bundles import verify_bundle
from mirror.policy.crypto import Invalid, PublicKey, load_public_key
from mirror.policy.model import (
    MAX_SIGNATURES,
    Attestation,
    Check,
    LegacySignature,
    Signature,
    SigstoreBundle,
    Unreadable,
    Verdict,
)
from mirror.policy.trust import CertSigner, IdentityRule, KeySigner, Signer, load_trusted_root
from mirror.policy.verify import verify_legacy
from mirror.policy.vuln import judge_reports


@dataclass(frozen=True)
class Policy:
    """A policy ready to evaluate: its rules, its signers by name, the Rekor keys, its hash."""

    settings: PolicySettings
    signers: dict[str, Signer]
    rekor_keys: dict[str, PublicKey]
    hash: str


def compile_policy(settings: PolicySettings) -> Policy:
    """Load the keys and the trusted root of validated settings.

    Raises:
        Invalid: a key or the trusted root does not load (the config checked the files'
            shape; this reads the certificates and keys inside).
    """
    root = load_trusted_root(settings.trusted_root_json) if settings.trusted_root_json \
        else None
    signers: dict[str, Signer] = {}
    for key in settings.keys:
        signers[key.name] = KeySigner(key.name, load_public_key(key.pem, f"key {key.name}"),
                                      tlog=key.tlog)
    for ident in settings.identities:
        if root is None:
            raise Invalid(f"identity {ident.name} needs a trusted root")
        rule = IdentityRule(issuer=ident.issuer, subject=ident.subject,
                            subject_regex=re.compile(ident.subject_regex)
                            if ident.subject_regex else None)
        signers[ident.name] = CertSigner(ident.name, root.ca_roots, root.ca_intermediates,
                                         identity=rule, tlog=True)
    return Policy(settings=settings, signers=signers,
                  rekor_keys=dict(root.rekor_keys) if root else {},
                  hash=policy_hash(settings))


def policy_hash(settings: PolicySettings) -> str:
    """A hash of everything a verdict depends on in the settings (rules, key bytes, root)."""
    digest = hashlib.sha256(repr((settings.rules, settings.default,
                                  [(k.name, k.pem, k.tlog) for k in settings.keys],
                                  settings.identities)).encode())
    digest.update(settings.trusted_root_json)
    return digest.hexdigest()


def signature_set_hash(signatures: Sequence[Signature]) -> str:
    """A hash of a set of signatures (order does not matter), from their fingerprints."""
    prints = sorted(s.fingerprint or repr(s) for s in signatures)
    return hashlib.sha256("\n".join(prints).encode()).hexdigest()


def matching_rule(policy: Policy, registry: str, repository: str,
                  digest: str) -> tuple[int, PolicyRule] | None:
    """The first rule for this image, with its 1-based number, or ``None``."""
    for number, rule in enumerate(policy.settings.rules, 1):
        if "*" not in rule.registries and registry.lower() not in rule.registries:
            continue
        if not any(fnmatchcase(repository, glob) for glob in rule.repositories):
            continue
        if rule.digests and digest not in rule.digests:
            continue
        return number, rule
    return None


#: Index digests that list an image, each with the signatures read for it.
Indexes = Sequence[tuple[str, Sequence[Signature]]]


def evaluate(policy: Policy, registry: str, repository: str, digest: str,
             signatures: Sequence[Signature], *, indexes: Indexes = (),
             now: float | None = None) -> Verdict:
    """The verdict on one image (pure: no I/O, no clock but a certificate's and a
    vulnerability report's "now").

    Args:
        policy: from :func:`compile_policy`.
        registry: the configured registry name the image is pulled from.
        repository: its repository, e.g. ``library/nginx``.
        digest: the manifest digest served.
        signatures: what was read for it.
        indexes: for a platform manifest, the indexes the mirror served that list it and
            their signatures: a valid signature of one of them passes too (cosign signs
            the index of a multi-platform image). At most :data:`MAX_SIGNATURES`
            signatures are looked at over all of them.
        now: epoch seconds, to judge a vulnerability report's age (default: the clock's).
    """
    found = matching_rule(policy, registry, repository, digest)
    if found is None:
        allowed = policy.settings.default == "allow"
        return Verdict(allowed, None, f"no rule matches; default {policy.settings.default}")
    number, rule = found
    if rule.deny:
        return _outcome(rule, number, f"denied by rule {number}")
    signed = _signed(policy, (number, rule), digest, signatures, indexes)
    if rule.vulnerabilities is None or not signed.allowed or signed.warning:
        return signed
    report = judge_reports(rule.vulnerabilities, digest, signatures,
                           signers=policy.signers, rekor_keys=policy.rekor_keys,
                           now=time.time() if now is None else now)
    if not report.ok:
        return _outcome(rule, number, report.reason, signed.checks)
    if not rule.require:
        return Verdict(True, number, report.reason, report.signer, expires=report.expires)
    return Verdict(True, number, f"{signed.reason}; {report.reason}", signed.signer,
                   checks=signed.checks, expires=report.expires)


def _signed(policy: Policy, numbered: tuple[int, PolicyRule], digest: str,
            signatures: Sequence[Signature], indexes: Indexes) -> Verdict:
    """The verdict of a rule's ``require`` (allowed when it requires no signature)."""
    number, rule = numbered
    if not rule.require:
        return Verdict(True, number, f"allowed by rule {number}")
    checks = _checks(policy, rule.require, [(digest, signatures), *indexes])
    passed = next((c for c in checks if c.ok), None)
    if passed is not None:
        return Verdict(True, number, passed.reason, passed.signer,
                       checks=tuple(c.reason for c in checks))
    names = " or ".join(rule.require)
    detail = f" ({checks[0].reason})" if checks else ""
    return _outcome(rule, number, f"no signature by {names}{detail}",
                    tuple(c.reason for c in checks))


def _outcome(rule: PolicyRule, number: int, reason: str,
             checks: tuple[str, ...] = ()) -> Verdict:
    if rule.mode == "warn":
        return Verdict(True, number, reason, warning=True, checks=checks)
    return Verdict(False, number, reason, checks=checks)


def _checks(policy: Policy, names: Sequence[str], signed: Indexes) -> list[Check]:
    checks: list[Check] = []
    budget = MAX_SIGNATURES
    for position, (digest, signatures) in enumerate(signed):
        for sig in signatures[:budget]:
            budget -= 1
            if isinstance(sig, Unreadable):
                checks.append(Check(False, sig.reason))
                continue
            if isinstance(sig, Attestation):
                continue  # a .att report is not a signature of the image
            for name in names:
                check = _check(policy, sig, digest, policy.signers[name])
                if check.ok and position:
                    check = Check(True, f"{check.reason} (through index {digest})",
                                  check.signer)
                checks.append(check)
                if check.ok:
                    return checks
    return checks


def _check(policy: Policy, sig: LegacySignature | SigstoreBundle, digest: str,
           signer: Signer) -> Check:
    try:
        if isinstance(sig, LegacySignature):
            return verify_legacy(sig, digest, signer, policy.rekor_keys)
        return verify_bundle(sig, digest, signer, policy.rekor_keys)
    except Invalid as exc:  # the verifiers return checks; this is a last guard
        return Check(False, exc.reason)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
            RecursionError) as exc:  # hostile input a parser let through: refuse it
        return Check(False, f"the signature cannot be read ({type(exc).__name__})")


class VerdictCache:
    """Verdicts by (registry, repository, digest, policy hash, signature set), LRU.

    The signature set is named by the caller when it can (the digests of the ``.sig``
    manifest and referrers index it read, which change when the signatures change): a kept
    verdict then costs a dictionary look-up, and the signatures are read only on a miss.
    Otherwise it is the hash of the signatures' fingerprints. A verdict that passed on a
    vulnerability report is kept until the report gets older than the rule's ``max_age``
    (its ``expires``), then decided again.
    """

    def __init__(self, max_entries: int = 10_000,
                 now: Callable[[], float] = time.time) -> None:
        # an OrderedDict, not cachetools' LRUCache: a kept verdict is on every manifest
        # answer, and this look-up costs a third of that one
        self._verdicts: OrderedDict[tuple[str, ...], Verdict] = OrderedDict()
        self._max = max_entries
        self._now = now

    def verdict(self, policy: Policy, registry: str, repository: str, digest: str,
                signatures: Sequence[Signature] | Callable[[], Sequence[Signature]], *,
                signature_set: str | None = None, indexes: Indexes = ()) -> Verdict:
        """The kept verdict, or a new one (then kept).

        Args:
            signatures: the signatures, or a function that reads them (called on a miss,
                or to name the set when ``signature_set`` is not given).
            signature_set: a name of this set of signatures (e.g. the ``.sig`` manifest's
                digest); ``None``: the hash of the signatures' fingerprints.
            indexes: as for :func:`evaluate` (part of the key).
        """
        read: Sequence[Signature] | None = None if callable(signatures) else signatures
        if signature_set is None:
            read = read if read is not None else _call(signatures)
            signature_set = signature_set_hash(read)
        key = _key(policy, (registry, repository, digest), signature_set, indexes)
        cached = self._fresh(key)
        if cached is not None:
            return cached
        read = read if read is not None else _call(signatures)
        cached = evaluate(policy, registry, repository, digest, read, indexes=indexes,
                          now=self._now())
        self._verdicts[key] = cached
        if len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return cached

    def kept(self, policy: Policy, registry: str, repository: str, digest: str, *,
             signature_set: str, indexes: Indexes = ()) -> Verdict | None:
        """The kept verdict for a named signature set, or ``None`` (nothing read)."""
        return self._fresh(_key(policy, (registry, repository, digest), signature_set,
                                indexes))

    def _fresh(self, key: tuple[str, ...]) -> Verdict | None:
        """The verdict kept under ``key`` unless it has expired (then it is dropped)."""
        cached = self._verdicts.get(key)
        if cached is None:
            return None
        if cached.expires is not None and self._now() >= cached.expires:
            del self._verdicts[key]
            return None
        self._verdicts.move_to_end(key)
        return cached

    def __len__(self) -> int:
        return len(self._verdicts)


def _key(policy: Policy, image: tuple[str, str, str], signature_set: str,
         indexes: Indexes) -> tuple[str, ...]:
    registry, repository, digest = image
    key: tuple[str, ...] = (registry.lower(), repository, digest, policy.hash, signature_set)
    if indexes:
        key += tuple(f"{d} {signature_set_hash(sigs)}" for d, sigs in indexes)
    return key


def _call(signatures: Sequence[Signature] | Callable[[], Sequence[Signature]]
          ) -> Sequence[Signature]:
    return signatures() if callable(signatures) else signatures
