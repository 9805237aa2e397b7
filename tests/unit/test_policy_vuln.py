"""The vulnerability gate (issue 22 item 5) on reports made here in cosign's attestation
format: ``.att`` DSSE layers and keyed sigstore bundles, the bar (severity, age, signer),
malformed and hostile reports, the kept verdict's expiry, and what the gate reads."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.errors import ConfigError
from mirror.policy import (
    VerdictCache,
    compile_policy,
    evaluate,
    is_signature_artifact,
    parse_bundle,
)
from mirror.policy.evaluate import Policy
from mirror.policy.gate import Gate
from mirror.policy.model import Signature, Unreadable
from mirror.policy.vuln import (
    MAX_REPORT_BYTES,
    MAX_REPORTS,
    att_tag,
    attestation_layers,
    parse_attestation,
)
from tests.support import cosign_attest as ca
from tests.support import cosign_sign as cs
from tests.support.cosign_oracle import FIXTURES
from tests.unit.test_policy import policy_settings
from tests.unit.test_policy_gate import DIGEST, IMAGE, OCI, Registry

NOW = 1_800_000_000.0
DAY = 86400.0
OTHER = "sha256:" + "1" * 64
BAR = {"max_severity": "high", "max_age": "7d", "keys": ["scanner"]}


@pytest.fixture(scope="module")
def scanner() -> cs.PrivateKey:
    return cs.new_key("p256")


def _policy(tmp_path: Path, scanner: cs.PrivateKey, bar: dict[str, Any] | None = None,
            **rule: Any) -> Policy:
    keys = {"scanner": cs.public_pem(scanner), "release": cs.public_pem(cs.new_key())}
    return compile_policy(policy_settings(tmp_path, keys, [
        {"repositories": ["acme/*"], "vulnerabilities": bar or BAR, **rule}]))


def _att(key: cs.PrivateKey, severities: list[str], finished: float = NOW - DAY, *,
         subject: str = DIGEST, predicate: Any = None,
         predicate_type: str = ca.VULN) -> list[Signature]:
    """What the gate reads from a .att manifest holding one report."""
    body = ca.statement(subject, predicate if predicate is not None
                        else ca.vuln_predicate(severities, finished), predicate_type)
    image = ca.att_manifest([(ca.envelope(key, body), predicate_type)])
    layers = attestation_layers(image.manifest)
    assert not isinstance(layers, Unreadable)
    return [parse_attestation(layer, image.blobs[layer.digest]) for layer in layers]


def _judge(policy: Policy, signatures: list[Signature], now: float = NOW) -> Any:
    return evaluate(policy, "r", "acme/app", DIGEST, signatures, now=now)


def test_a_fresh_report_under_the_bar_passes_and_expires_with_max_age(
        tmp_path: Path, scanner: cs.PrivateKey) -> None:
    verdict = _judge(_policy(tmp_path, scanner), _att(scanner, ["LOW", "MEDIUM"]))
    assert verdict.allowed and not verdict.warning
    assert verdict.signer == "scanner" and verdict.rule == 1
    assert verdict.reason == "vulnerability report by scanner: worst finding MEDIUM, " \
        "at most high"
    assert verdict.expires == NOW - DAY + 7 * DAY


def test_the_bar_is_inclusive_and_critical_is_above_high(tmp_path: Path,
                                                         scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    assert _judge(policy, _att(scanner, ["HIGH", "LOW"])).allowed
    assert _judge(policy, _att(scanner, [])).reason.endswith(": no finding, at most high")
    verdict = _judge(policy, _att(scanner, ["LOW", "CRITICAL", "HIGH"]))
    assert not verdict.allowed
    assert verdict.reason.startswith("worst finding CRITICAL above high (report by scanner")
    strict = _policy(tmp_path, scanner, {**BAR, "max_severity": "none"})
    assert not _judge(strict, _att(scanner, ["UNKNOWN"])).allowed
    assert _judge(strict, _att(scanner, [])).allowed


def test_a_stale_report_fails_naming_max_age(tmp_path: Path, scanner: cs.PrivateKey) -> None:
    verdict = _judge(_policy(tmp_path, scanner), _att(scanner, [], NOW - 8 * DAY))
    assert not verdict.allowed
    assert verdict.reason.startswith("report older than 7d (by scanner, scan finished 20")


def test_missing_or_foreign_reports_fail(tmp_path: Path, scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    assert _judge(policy, []).reason == "no vulnerability report by scanner"
    other = _judge(policy, _att(cs.new_key(), []))
    assert not other.allowed
    assert other.reason == "no vulnerability report by scanner " \
        "(the report's signature does not verify with scanner)"
    elsewhere = _judge(policy, _att(scanner, [], subject=OTHER))
    assert not elsewhere.allowed and "another digest" in elsewhere.reason
    generic = _judge(policy, _att(scanner, [], predicate={"Data": "x"},
                                  predicate_type=ca.GENERIC))
    assert generic.reason == "no vulnerability report by scanner"  # not read: annotation


def test_the_newest_verified_report_decides(tmp_path: Path, scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    old_clean = _att(scanner, [], NOW - 3 * DAY)
    new_bad = _att(scanner, ["CRITICAL"], NOW - DAY)
    forged_new = _att(cs.new_key(), [], NOW - 60)
    assert not _judge(policy, old_clean + new_bad + forged_new).allowed
    assert _judge(policy, _att(scanner, ["CRITICAL"], NOW - 3 * DAY) + old_clean[:0]
                  + _att(scanner, [], NOW - DAY)).allowed


def test_a_warn_rule_serves_a_failing_image_with_a_warning(tmp_path: Path,
                                                           scanner: cs.PrivateKey) -> None:
    verdict = _judge(_policy(tmp_path, scanner, mode="warn"), _att(scanner, ["CRITICAL"]))
    assert verdict.allowed and verdict.warning and "CRITICAL above high" in verdict.reason


def test_a_signature_and_a_report_are_both_required(tmp_path: Path,
                                                    scanner: cs.PrivateKey) -> None:
    release = cs.new_key()
    keys = {"scanner": cs.public_pem(scanner), "release": cs.public_pem(release)}
    policy = compile_policy(policy_settings(tmp_path, keys, [
        {"repositories": ["acme/*"], "require": ["release"], "vulnerabilities": BAR}]))
    signed = [parse_bundle(json.dumps(cs.dsse_bundle(release, DIGEST)).encode())]
    report = _att(scanner, ["LOW"])
    assert not _judge(policy, report).allowed  # no signature
    assert _judge(policy, signed).reason == "no vulnerability report by scanner"
    both = _judge(policy, signed + report)
    assert both.allowed and both.signer == "release"
    assert both.reason == "signed by release; vulnerability report by scanner: " \
        "worst finding LOW, at most high"
    # a report signed by the release key is no signature of the image
    assert not _judge(policy, _att(release, []) + report).allowed


def test_reports_in_sigstore_bundles_count_and_signatures_do_not(
        tmp_path: Path, scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    clean = ca.vuln_bundle(scanner, ca.statement(DIGEST, ca.vuln_predicate([], NOW - DAY)))
    assert _judge(policy, [parse_bundle(json.dumps(clean).encode())]).allowed
    critical = ca.vuln_bundle(scanner, ca.statement(DIGEST,
                                                    ca.vuln_predicate(["CRITICAL"], NOW)))
    assert "CRITICAL" in _judge(policy, [parse_bundle(json.dumps(critical).encode())]).reason
    signature = parse_bundle(json.dumps(cs.dsse_bundle(scanner, DIGEST)).encode())
    assert _judge(policy, [signature]).reason == "no vulnerability report by scanner"


def test_cosigns_generic_attestation_fixture_is_no_vulnerability_report(
        tmp_path: Path, scanner: cs.PrivateKey) -> None:
    data = (FIXTURES / "cosign/pkg/cosign/testdata/oci-attestation.sigstore.json").read_bytes()
    bundle = parse_bundle(data)
    assert not isinstance(bundle, Unreadable)
    digest = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
    verdict = evaluate(_policy(tmp_path, scanner), "r", "acme/app", digest, [bundle], now=NOW)
    assert not verdict.allowed and verdict.reason == "no vulnerability report by scanner"


@pytest.mark.parametrize(("predicate", "why"), [
    ({"scanner": {"result": {"Results": []}}}, "no metadata.scanFinishedOn"),
    ({"scanner": {"result": {}}, "metadata": {"scanFinishedOn": "yesterday"}},
     "scanFinishedOn 'yesterday' is not a time"),
    ({"metadata": {"scanFinishedOn": "2027-01-15T00:00:00Z"}}, "no scanner.result"),
    ({"metadata": {"scanFinishedOn": "2027-01-15T00:00:00Z"},
      "scanner": {"result": {"Results": [{"Vulnerabilities": [{"Severity": "DIRE"}]}]}}},
     "a finding's severity is 'DIRE'"),
    ({"metadata": {"scanFinishedOn": "2027-01-15T00:00:00Z"},
      "scanner": {"result": {"Results": "all fine"}}}, "Results is not a list"),
    ("a string", "the predicate is not a JSON object"),
])
def test_a_malformed_report_is_a_clear_verdict(tmp_path: Path, scanner: cs.PrivateKey,
                                               predicate: Any, why: str) -> None:
    verdict = _judge(_policy(tmp_path, scanner), _att(scanner, [], predicate=predicate))
    assert not verdict.allowed
    assert verdict.reason.startswith("the report by scanner is malformed (") and \
        why in verdict.reason, verdict.reason


def test_hostile_attestations_are_refused_within_bounds(tmp_path: Path,
                                                        scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    not_json = ca.att_manifest([(b"\x00" * 100, ca.VULN)])
    layer = attestation_layers(not_json.manifest)[0]  # type: ignore[index]
    assert parse_attestation(layer, b"\x00" * 100) == Unreadable(
        "the attestation is not JSON", parse_attestation(layer, b"").fingerprint)
    huge = ca.att_manifest([(b" " * (MAX_REPORT_BYTES + 1), ca.VULN)])
    layer = attestation_layers(huge.manifest)[0]  # type: ignore[index]
    assert isinstance(parse_attestation(layer, b""), Unreadable)
    bad_b64 = json.dumps({"payloadType": ca.IN_TOTO, "payload": "%%%",
                          "signatures": []}).encode()
    layer = attestation_layers(ca.att_manifest([(bad_b64, ca.VULN)]).manifest)[0]  # type: ignore[index]
    assert isinstance(parse_attestation(layer, bad_b64), Unreadable)
    unsigned = ca.statement(DIGEST, ca.vuln_predicate([], NOW))
    envelope = json.dumps({"payloadType": ca.IN_TOTO,
                           "payload": base64.b64encode(unsigned).decode(),
                           "signatures": []}).encode()
    image = ca.att_manifest([(envelope, ca.VULN)])
    layers = attestation_layers(image.manifest)
    assert not isinstance(layers, Unreadable)
    verdict = _judge(policy, [parse_attestation(layers[0], envelope)])
    assert verdict.reason == "no vulnerability report by scanner " \
        "(the DSSE envelope has 0 signatures, expected 1)"
    many = ca.att_manifest([(ca.envelope(scanner, ca.statement(DIGEST, {"n": n})), ca.VULN)
                            for n in range(40)])
    assert len(attestation_layers(many.manifest)) == MAX_REPORTS  # type: ignore[arg-type]


def test_a_kept_verdict_expires_when_the_report_gets_too_old(
        tmp_path: Path, scanner: cs.PrivateKey) -> None:
    now = [NOW]
    cache = VerdictCache(now=lambda: now[0])
    policy = _policy(tmp_path, scanner)
    report = _att(scanner, [], NOW - DAY)
    first = cache.verdict(policy, "r", "acme/app", DIGEST, report, signature_set="att")
    assert first.allowed
    now[0] = NOW + 5 * DAY
    assert cache.kept(policy, "r", "acme/app", DIGEST, signature_set="att") == first
    now[0] = NOW + 6 * DAY  # the scan finished 7 days ago: nothing else changed
    assert cache.kept(policy, "r", "acme/app", DIGEST, signature_set="att") is None
    again = cache.verdict(policy, "r", "acme/app", DIGEST, report, signature_set="att")
    assert not again.allowed and again.reason.startswith("report older than 7d")


async def test_the_gate_reads_att_only_for_a_bar_and_sees_a_new_report(
        tmp_path: Path, scanner: cs.PrivateKey) -> None:
    registry = Registry()
    image = ca.att_manifest([(ca.envelope(scanner, ca.statement(
        DIGEST, ca.vuln_predicate(["CRITICAL"]))), ca.VULN)])
    registry.manifests[att_tag(DIGEST)] = image.manifest
    registry.blobs.update(image.blobs)
    gate = Gate(_policy(tmp_path, scanner))
    first = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE, media_type=OCI)
    assert first is not None and not first.allowed and "CRITICAL" in first.reason
    assert f"manifest {att_tag(DIGEST)}" in registry.reads
    fixed = ca.att_manifest([(ca.envelope(scanner, ca.statement(
        DIGEST, ca.vuln_predicate(["LOW"]))), ca.VULN)])
    registry.manifests[att_tag(DIGEST)] = fixed.manifest
    registry.blobs.update(fixed.blobs)
    second = await gate.judge(registry, "r", "acme/app", DIGEST, manifest=IMAGE,
                              media_type=OCI)
    assert second is not None and second.allowed and second.expires is not None
    assert second.expires > time.time()

    registry.reads.clear()  # another repository, no bar: the .att is not read
    other = await gate.judge(registry, "r", "team/app", DIGEST, manifest=IMAGE, media_type=OCI)
    assert other is not None and other.allowed
    assert not any(".att" in read for read in registry.reads)


def test_the_config_names_what_is_wrong(tmp_path: Path, scanner: cs.PrivateKey) -> None:
    cases = [({**BAR, "max_severity": "dire"}, "max_severity: expected one of none, unknown"),
             ({**BAR, "keys": ["nobody"]}, "keys[0]: 'nobody' is not the name of a policy"),
             ({"max_severity": "high"}, "needs max_severity and keys"),
             ({**BAR, "max_age": "0s"}, "max_age: expected a duration above 0s"),
             ({**BAR, "colour": "red"}, "colour")]
    for bar, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _policy(tmp_path, scanner, bar)
    with pytest.raises(ConfigError, match="give vulnerabilities or deny"):
        _policy(tmp_path, scanner, BAR, deny=True)
    default_age = _policy(tmp_path, scanner, {"max_severity": "LOW", "keys": "scanner"})
    bar = default_age.settings.rules[0].vulnerabilities
    assert bar is not None and bar.max_age == 7 * DAY and bar.max_severity == "LOW"



def test_an_att_manifest_is_a_signature_artifact_not_judged(scanner: cs.PrivateKey) -> None:
    image = ca.att_manifest([(ca.envelope(scanner, ca.statement(DIGEST, {})), ca.VULN)])
    assert is_signature_artifact(None, image.manifest)  # asked by digest, no tag
    assert is_signature_artifact(att_tag(DIGEST), b"{}")


def test_a_report_dated_in_the_future_is_refused(tmp_path: Path,
                                                 scanner: cs.PrivateKey) -> None:
    policy = _policy(tmp_path, scanner)
    assert _judge(policy, _att(scanner, [], NOW + 60)).allowed  # clock skew
    verdict = _judge(policy, _att(scanner, [], NOW + DAY))
    assert not verdict.allowed
    assert verdict.reason.startswith("the report by scanner is dated in the future")
