"""The vulnerability gate: signed, fresh vulnerability reports (cosign's vuln attestation).

A report is an in-toto statement of predicate type :data:`VULN_PREDICATE` whose predicate
is ``{invocation, scanner: {uri, version, db, result: <Trivy JSON>}, metadata:
{scanStartedOn, scanFinishedOn}}``, in a DSSE envelope (payload type in-toto) found

* as a layer (``application/vnd.dsse.envelope.v1+json``) of cosign's ``sha256-<hex>.att``
  manifest (``cosign attest --type vuln``), checked with a key; or
* in a sigstore bundle among the referrers (or the fallback index), checked with a key or
  a keyless identity by :func:`~mirror.policy.bundles.verify_bundle`.

Of the reports verified for the digest pulled (its subject), the newest (``scanFinishedOn``)
decides: younger than the bar's ``max_age`` and no finding (``Results[].Vulnerabilities[]
.Severity``) above ``max_severity``. Work is bounded: :data:`MAX_REPORTS` envelopes per
verdict, each at most :data:`MAX_REPORT_BYTES`; anything malformed is a reason, never an
exception.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from mirror.config.vulnerabilities import SEVERITIES, VulnerabilityBar, format_age
from mirror.policy.bundles import (
    IN_TOTO_TYPE,
    STATEMENT_TYPES,
    pae,
    verify_bundle,
)
from mirror.policy.crypto import Invalid, PublicKey, b64decode, verify
from mirror.policy.model import (
    DSSE_ENVELOPE_TYPE,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    Attestation,
    DsseEnvelope,
    Signature,
    SigstoreBundle,
    Unreadable,
)
from mirror.policy.parse import Blob, _descriptor, _fingerprint, _json
from mirror.policy.trust import KeySigner, Signer

VULN_PREDICATE = "https://cosign.sigstore.dev/attestation/vuln/v1"
ANNOTATION_PREDICATE = "predicateType"
MAX_REPORT_BYTES = 1024 * 1024
"""The largest DSSE envelope (a Trivy report inside) read from a ``.att`` layer."""
MAX_REPORTS = 8
"""The most vulnerability reports one verdict looks at (``.att`` layers and bundles)."""
MAX_FINDINGS = 100_000
"""The most findings counted in one report; more is a malformed report."""
FUTURE_SKEW = 300.0
"""Seconds a report may be dated ahead of this node's clock (clock skew), at most."""


class BlobReader(Protocol):
    """What :func:`read_attestations` needs of the gate's reader."""

    async def blob(self, digest: str, size: int, limit: int) -> bytes | None:
        """A small blob's bytes, ``None`` above ``limit`` or when it cannot be read."""


def att_tag(digest: str) -> str:
    """cosign's attestation tag for an image digest: ``sha256-<hex>.att``."""
    return digest.replace(":", "-", 1) + ".att"


def attestation_layers(manifest: bytes) -> list[Blob] | Unreadable:
    """The DSSE layers of a ``.att`` manifest that may be vulnerability reports (those whose
    ``predicateType`` annotation is another predicate are left unread), at most
    :data:`MAX_REPORTS`."""
    doc = _json(manifest, MAX_MANIFEST_BYTES, "the attestation manifest")
    if isinstance(doc, Unreadable):
        return doc
    layers = doc.get("layers")
    if not isinstance(layers, list):
        return Unreadable("the attestation manifest has no layers")
    if len(layers) > MAX_LAYERS:
        return Unreadable(f"the attestation manifest has more than {MAX_LAYERS} layers")
    found = []
    for layer in layers:
        blob = _descriptor(layer)
        if blob is None or blob.media_type != DSSE_ENVELOPE_TYPE:
            continue
        if dict(blob.annotations).get(ANNOTATION_PREDICATE, VULN_PREDICATE) != VULN_PREDICATE:
            continue
        found.append(blob)
        if len(found) == MAX_REPORTS:
            break
    return found


def parse_attestation(layer: Blob, data: bytes) -> Attestation | Unreadable:
    """One ``.att`` layer's DSSE envelope, from its descriptor and the blob's bytes."""
    fingerprint = _fingerprint(layer.digest.encode())
    if len(data) > MAX_REPORT_BYTES or layer.size > MAX_REPORT_BYTES:
        return Unreadable(f"the attestation is larger than {MAX_REPORT_BYTES} bytes",
                          fingerprint)
    if len(data) != layer.size or "sha256:" + hashlib.sha256(data).hexdigest() != layer.digest:
        return Unreadable("the attestation does not match its descriptor", fingerprint)
    doc = _json(data, MAX_REPORT_BYTES, "the attestation")
    if isinstance(doc, Unreadable):
        return Unreadable(doc.reason, fingerprint)
    try:
        sigs = doc.get("signatures") or []
        envelope = DsseEnvelope(payload=b64decode(doc["payload"], "the DSSE payload"),
                                payload_type=str(doc["payloadType"]),
                                signatures=tuple(b64decode(s["sig"], "a DSSE signature")
                                                 for s in sigs[:4]))
    except Invalid as exc:
        return Unreadable(exc.reason, fingerprint)
    except (KeyError, TypeError, AttributeError):
        return Unreadable("the attestation is not a DSSE envelope", fingerprint)
    return Attestation(envelope, fingerprint)


async def read_attestations(reader: BlobReader, manifest: bytes) -> list[Signature]:
    """The attestations of a ``.att`` manifest, read through the gate's reader (bounded)."""
    layers = attestation_layers(manifest)
    if isinstance(layers, Unreadable):
        return [layers]
    found: list[Signature] = []
    for layer in layers:
        data = await reader.blob(layer.digest, layer.size, MAX_REPORT_BYTES)
        found.append(parse_attestation(layer, data) if data is not None
                     else Unreadable("the attestation cannot be read"))
    return found


@dataclass(frozen=True)
class Report:
    """A verified report: who signed it, when the scan finished, its worst finding."""

    signer: str
    finished: float
    worst: str


@dataclass(frozen=True)
class ReportVerdict:
    """The gate's answer: ``ok`` with the report that passed, or the reason it fails."""

    ok: bool
    reason: str
    signer: str | None = None
    expires: float | None = None


def judge_reports(bar: VulnerabilityBar, digest: str, signatures: Sequence[Signature], *,
                  signers: Mapping[str, Signer], rekor_keys: Mapping[str, PublicKey],
                  now: float) -> ReportVerdict:
    """The verdict of ``bar`` on the reports among ``signatures`` (pure but for ``now``)."""
    who = " or ".join(bar.keys)
    reports: list[Report] = []
    malformed: list[str] = []
    failures: list[str] = []
    for envelope, candidate in _candidates(signatures)[:MAX_REPORTS]:
        statement = _statement(envelope)
        if isinstance(statement, str):
            failures.append(statement)
            continue
        signer = _verified_by(bar, digest, (envelope, candidate, statement), failures,
                              signers=signers, rekor_keys=rekor_keys)
        if signer is None:
            continue
        try:
            reports.append(_report(signer, statement["predicate"]))
        except Invalid as exc:
            malformed.append(f"the report by {signer} is malformed ({exc.reason})")
    if not reports:
        if malformed:
            return ReportVerdict(False, malformed[0])
        detail = f" ({failures[0]})" if failures else ""
        return ReportVerdict(False, f"no vulnerability report by {who}{detail}")
    newest = max(reports, key=lambda r: r.finished)
    return _bar(bar, newest, now)


def _bar(bar: VulnerabilityBar, report: Report, now: float) -> ReportVerdict:
    scanned = datetime.fromtimestamp(report.finished, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if report.finished > now + FUTURE_SKEW:
        return ReportVerdict(False, f"the report by {report.signer} is dated in the future "
                             f"(scan finished {scanned})")
    if now - report.finished >= bar.max_age:
        return ReportVerdict(False, f"report older than {format_age(bar.max_age)} "
                             f"(by {report.signer}, scan finished {scanned})")
    if SEVERITIES.index(report.worst) > SEVERITIES.index(bar.max_severity):
        return ReportVerdict(False, f"worst finding {report.worst} above "
                             f"{bar.max_severity.lower()} (report by {report.signer}, "
                             f"scan finished {scanned})")
    worst = "no finding" if report.worst == "NONE" else f"worst finding {report.worst}"
    return ReportVerdict(True, f"vulnerability report by {report.signer}: {worst}, at most "
                         f"{bar.max_severity.lower()}", report.signer,
                         expires=report.finished + bar.max_age)


def _candidates(signatures: Sequence[Signature]
                ) -> list[tuple[DsseEnvelope, Attestation | SigstoreBundle]]:
    """The DSSE envelopes that say they are vulnerability reports (cheap: no crypto)."""
    found: list[tuple[DsseEnvelope, Attestation | SigstoreBundle]] = []
    for sig in signatures:
        if isinstance(sig, Attestation):
            found.append((sig.envelope, sig))
        elif isinstance(sig, SigstoreBundle) and isinstance(sig.content, DsseEnvelope) \
                and VULN_PREDICATE.encode() in sig.content.payload:
            found.append((sig.content, sig))
    return found


def _statement(envelope: DsseEnvelope) -> dict[str, Any] | str:
    """The in-toto statement of a vulnerability report, or why it is not one."""
    if envelope.payload_type != IN_TOTO_TYPE:
        return f"the DSSE payload type is {envelope.payload_type[:60]!r}, not in-toto"
    try:
        statement = json.loads(envelope.payload)
    except (ValueError, RecursionError):
        return "the DSSE payload is not JSON"
    if not isinstance(statement, dict) or statement.get("_type") not in STATEMENT_TYPES:
        return "the DSSE payload is not an in-toto statement"
    if statement.get("predicateType") != VULN_PREDICATE:
        return f"the predicate {str(statement.get('predicateType'))[:80]!r} is not a " \
               "vulnerability report"
    return statement


def _verified_by(bar: VulnerabilityBar, digest: str,
                 found: tuple[DsseEnvelope, Attestation | SigstoreBundle, dict[str, Any]],
                 failures: list[str], *, signers: Mapping[str, Signer],
                 rekor_keys: Mapping[str, PublicKey]) -> str | None:
    """The name of the first of the bar's signers whose signature of this report checks
    (why each other one does not is added to ``failures``)."""
    envelope, candidate, statement = found
    for name in bar.keys:
        signer = signers[name]
        try:
            if isinstance(candidate, SigstoreBundle):
                check = verify_bundle(candidate, digest, signer, rekor_keys,
                                      predicates=(VULN_PREDICATE,))
                if check.ok:
                    return name
                failures.append(check.reason)
                continue
            _check_att(envelope, statement, digest)
            if not isinstance(signer, KeySigner):
                raise Invalid(f"a keyless report by {name} is read from a sigstore bundle, "
                              "not a .att layer")
            if verify(signer.key, envelope.signatures[0],
                      pae(envelope.payload_type, envelope.payload)):
                return name
            failures.append(f"the report's signature does not verify with {name}")
        except Invalid as exc:
            failures.append(exc.reason)
    return None


def _check_att(envelope: DsseEnvelope, statement: dict[str, Any], digest: str) -> None:
    """A ``.att`` envelope has one signature and its statement's subject is ``digest``."""
    if len(envelope.signatures) != 1:
        raise Invalid(f"the DSSE envelope has {len(envelope.signatures)} signatures, "
                      "expected 1")
    subjects = statement.get("subject")
    hexes = {s["digest"].get("sha256") for s in subjects[:64]
             if isinstance(s, dict) and isinstance(s.get("digest"), dict)} \
        if isinstance(subjects, list) else set()
    if digest.removeprefix("sha256:") not in hexes:
        raise Invalid(f"the report's subject is another digest than {digest}")


def _report(signer: str, predicate: Any) -> Report:
    """A verified report's figures, from its predicate (raises :class:`Invalid`)."""
    if not isinstance(predicate, dict):
        raise Invalid("the predicate is not a JSON object")
    metadata = predicate.get("metadata")
    finished = metadata.get("scanFinishedOn") if isinstance(metadata, dict) else None
    if not isinstance(finished, str):
        raise Invalid("no metadata.scanFinishedOn")
    try:
        when = datetime.fromisoformat(finished.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid(f"scanFinishedOn {finished[:40]!r} is not a time") from None
    if when.tzinfo is None:
        raise Invalid(f"scanFinishedOn {finished[:40]!r} has no time zone")
    scanner = predicate.get("scanner")
    result = scanner.get("result") if isinstance(scanner, dict) else None
    if not isinstance(result, dict):
        raise Invalid("no scanner.result")
    return Report(signer, when.timestamp(), worst_severity(result))


def worst_severity(result: Mapping[str, Any]) -> str:
    """The worst ``Severity`` of a Trivy JSON result (``NONE`` without findings).

    Raises:
        Invalid: not Trivy's shape, a severity Trivy does not use, too many findings.
    """
    results = result.get("Results") or []
    if not isinstance(results, list):
        raise Invalid("scanner.result.Results is not a list")
    worst, seen = 0, 0
    for target in results:
        if not isinstance(target, dict):
            raise Invalid("a scanner.result.Results entry is not an object")
        findings = target.get("Vulnerabilities") or []
        if not isinstance(findings, list):
            raise Invalid("a Results[].Vulnerabilities is not a list")
        seen += len(findings)
        if seen > MAX_FINDINGS:
            raise Invalid(f"more than {MAX_FINDINGS} findings")
        for finding in findings:
            severity = finding.get("Severity") if isinstance(finding, dict) else None
            if not isinstance(severity, str) or severity.upper() not in SEVERITIES[1:]:
                raise Invalid(f"a finding's severity is {str(severity)[:20]!r}, not one of "
                              "UNKNOWN, LOW, MEDIUM, HIGH, CRITICAL")
            worst = max(worst, SEVERITIES.index(severity.upper()))
    return SEVERITIES[worst]
