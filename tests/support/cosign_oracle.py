"""Turn the third-party cosign fixtures (``../shared/fixtures/cosign``) into the verifier's
inputs, as that folder's README says, and get the verifier's verdict on each case of its
``cases.json``.

Each case may expand into several runs (trust variants, mutation variants); a case passes
when every run gets the expected verdict. Only :mod:`mirror.policy` decides: this module
reads files, applies the documented mutations and builds the trust material.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mirror.policy.bundles import verify_bundle
from mirror.policy.crypto import (
    Invalid,
    at_time,
    b64decode,
    certificate_key,
    load_certificate,
    load_certificates,
    load_public_key,
    valid_at,
    verify,
)
from mirror.policy.model import SIMPLESIGNING_TYPE, LegacySignature, SigstoreBundle, Unreadable
from mirror.policy.parse import from_annotations, parse_bundle
from mirror.policy.tlog import rekor_keys_by_id, verify_set
from mirror.policy.trust import CertSigner, IdentityRule, KeySigner, Signer, load_trusted_root
from mirror.policy.verify import ReferenceRule, check_payload, check_rekord, verify_legacy

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "cosign"
SIG_KEY = "dev.cosignproject.cosign/signature"
CHAIN_KEY = "dev.sigstore.cosign/chain"


def cases() -> list[dict[str, Any]]:
    """Every case of ``cases.json`` (empty when the fixtures are not beside the clone)."""
    path = FIXTURES / "cases.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else []


def read(rel: str) -> bytes:
    return (FIXTURES / rel).read_bytes()


def literal(value: str | None) -> bytes | None:
    """A case input: ``<literal: TEXT>`` is TEXT itself, else a fixture path's bytes."""
    if value is None:
        return None
    match = re.fullmatch(r"<literal: (.*)>", value)
    return match.group(1).encode() if match else read(value)


@dataclass(frozen=True)
class Record:
    """A containers/image ``sigstore-json`` signature file, decoded."""

    mime_type: str
    payload: bytes
    annotations: dict[str, str]


def read_record(rel: str) -> Record | None:
    """A signature file as containers/image reads it; ``None`` for a GPG signature."""
    data = read(rel)
    if data[:1] != b"\x00":
        return None
    name, _, body = data[1:].partition(b"\n")
    if name != b"sigstore-json":
        return None
    doc = json.loads(body)
    return Record(doc["mimeType"], base64.b64decode(doc["payload"]), dict(doc["annotations"]))


def manifest_digest(rel: str | None) -> str | None:
    """``sha256:`` of the manifest bytes; ``None`` for no manifest or a schema-1 one
    (whose digest needs its JWS signatures removed, which the broken fixture cannot)."""
    if rel is None:
        return None
    data = read(rel)
    if json.loads(data).get("schemaVersion") == 1:
        return None
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rekor_keys(paths: list[str] | None) -> dict[str, Any]:
    keys = []
    for rel in paths or []:
        if rel == "<none>":
            continue
        if rel == "<any other key>":
            keys.append(ec.generate_private_key(ec.SECP256R1()).public_key())
        else:
            keys.append(load_public_key(read(rel)))
    return rekor_keys_by_id(tuple(keys))


def signers(trust: dict[str, Any], chain_value: str | None = None) -> list[Signer]:
    """The signers a case's ``trust`` names."""
    kind = trust["type"]
    if kind == "keys":
        return [KeySigner(rel, load_public_key(read(rel)), tlog=bool(trust.get("rekor_keys")))
                for rel in trust["keys"]]
    if kind == "fulcio":
        ca = trust["ca"]
        pem = chain_value.encode() if ca.startswith("<value of") and chain_value else read(ca)
        rule = IdentityRule(issuer=trust.get("oidc_issuer"), subject=trust.get("subject_email"))
        return [CertSigner("fulcio", tuple(load_certificates(pem, "ca")), identity=rule)]
    if kind == "pki":
        inter = trust.get("ca_intermediates")
        rule = IdentityRule(subject=trust.get("subject_email"),
                            hostname=trust.get("subject_hostname"))
        return [CertSigner("pki", tuple(load_certificates(read(trust["ca_roots"]), "roots")),
                           tuple(load_certificates(read(inter), "inter")) if inter else (),
                           identity=rule, tlog=False)]
    if kind in ("trusted_root", "rekor"):
        root = load_trusted_root(read(trust.get("trusted_root",
                                                "sigstore-python/trusted_root.json")))
        ident = trust.get("identity", {})
        rule = IdentityRule(
            issuer=ident.get("issuer"), subject=ident.get("san_uri"),
            issuer_regex=re.compile(ident["issuer_regexp"]) if "issuer_regexp" in ident else None,
            subject_regex=re.compile(ident["subject_regexp"])
            if "subject_regexp" in ident else None)
        return [CertSigner("root", root.ca_roots, root.ca_intermediates, identity=rule)]
    raise AssertionError(f"unknown trust type {kind}")


def trust_rekor(trust: dict[str, Any]) -> dict[str, Any]:
    if trust["type"] == "trusted_root":
        return load_trusted_root(read(trust["trusted_root"])).rekor_keys
    return rekor_keys(trust.get("rekor_keys"))


def run_case(case: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Every run of a case: (what was run, accepted, the verifier's reason)."""
    results = []
    for label, trust in [("trust", case["trust"]),
                         *((f"trust variant {i}", t)
                           for i, t in enumerate(case.get("trust_variants", [])))]:
        for what, accepted, reason in SCOPES[case["scope"]](case, trust):
            results.append((f"{label}, {what}", accepted, reason))
    return results


Run = Iterator[tuple[str, bool, str]]


def _image(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    digest = manifest_digest(case["manifest"])
    records = [read_record(rel) for rel in case["signatures"]]
    ident = case["identity"]
    reference = ReferenceRule(ident["rule"], case["image_reference"],
                              ident.get("docker_reference"))
    # "the CA is the chain annotation" means the unmutated signature's chain
    chain = records[0].annotations.get(CHAIN_KEY) if records and records[0] else None
    for what, mutated in _mutations(case, records):
        yield (what, *_any_signature(mutated, digest, trust, reference, chain))


def _any_signature(records: list[Record | None], digest: str | None, trust: dict[str, Any],
                   reference: ReferenceRule, chain: str | None) -> tuple[bool, str]:
    reasons = []
    for record in records:
        if record is None or record.mime_type != SIMPLESIGNING_TYPE:
            reasons.append("not a cosign signature")
            continue
        sig = from_annotations(record.payload, record.annotations)
        if isinstance(sig, Unreadable):
            reasons.append(sig.reason)
            continue
        for signer in signers(trust, chain):
            check = verify_legacy(sig, digest, signer, trust_rekor(trust), reference=reference)
            if check.ok:
                return True, check.reason
            reasons.append(check.reason)
    return False, "; ".join(reasons) or "no signature"


def _mutations(case: dict[str, Any],
               records: list[Record | None]) -> Iterator[tuple[str, list[Record | None]]]:
    mutation = case.get("mutation")
    if mutation is None:
        yield "as is", records
        return
    first = records[0]
    assert first is not None
    op = mutation["op"]
    if op == "delete_all_annotations":
        yield op, [replace(first, annotations={}), *records[1:]]
    elif op == "delete_annotation":
        notes = {k: v for k, v in first.annotations.items() if k != mutation["key"]}
        yield op, [replace(first, annotations=notes), *records[1:]]
    elif op == "replace_annotations":
        yield op, [replace(first, annotations=dict(mutation["annotations"])), *records[1:]]
    elif op == "set_annotation":
        yield op, [_set(first, mutation["key"], mutation["value"]), *records[1:]]
    elif op == "set_annotation_from":
        other = read_record(mutation["from_signature"])
        assert other is not None
        yield op, [_set(first, mutation["key"], other.annotations[mutation["key"]]),
                   *records[1:]]
    elif op == "set_annotation_variants":
        for variant in mutation["variants"]:
            value = _variant(variant, first.annotations[mutation["key"]])
            yield f"{op} {variant}", [_set(first, mutation["key"], value), *records[1:]]
    else:
        raise AssertionError(f"unknown mutation {op}")


def _set(record: Record, key: str, value: str) -> Record:
    return replace(record, annotations={**record.annotations, key: value})


def _variant(variant: str, original: str) -> str:
    if variant == "<original>=":
        return original + "="
    if variant == "<original minus last char>":
        return original[:-1]
    if variant == "base64(DER||DER)":
        der = base64.b64decode(original)
        return base64.b64encode(der + der).decode()
    return variant


def _rekor_set(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    inputs = case["inputs"]
    signature = read(inputs["signature_b64"]).decode().strip()
    key_or_cert = read(inputs["key_or_cert"])
    variants: list[tuple[str, str, bytes]] = [("as is", signature, key_or_cert)]
    mutation = case.get("mutation") or {}
    if mutation.get("op") == "truncate_signature_b64":
        variants = [("truncated", signature[:-mutation["chars"]], key_or_cert)]
    elif mutation.get("op") == "key_or_cert_variants":
        variants = [(v, signature, key_or_cert * 2 if v == "<rekor-cert twice>"
                     else v.encode()) for v in mutation["variants"]]
    for what, sig, pem in variants:
        try:
            logged = verify_set(read(inputs["set"]).decode(), trust_rekor(trust))
            key, cert = _key_or_cert(pem)
            check_rekord(logged.body, read(inputs["payload"]), sig, key, cert)
            if "expected_time" in case and logged.integrated_time != case["expected_time"]:
                raise Invalid("another integrated time")
            yield what, True, f"logged at {logged.integrated_time}"
        except Invalid as exc:
            yield what, False, exc.reason


def _key_or_cert(pem: bytes) -> tuple[Any, x509.Certificate | None]:
    if b"CERTIFICATE" in pem:
        cert = load_certificate(pem, "the logged certificate")
        return certificate_key(cert), cert
    return load_public_key(pem, "the logged key"), None


def _cert_signer_check(cert_pem: bytes, chain_pem: bytes | None, signer: Signer,
                       when: datetime.datetime) -> None:
    assert isinstance(signer, CertSigner)
    cert = load_certificate(cert_pem, "the certificate")
    signer.check(cert, load_certificates(chain_pem, "the chain") if chain_pem else [], when)


def _fulcio_cert(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    times = case["at_time"] if isinstance(case["at_time"], list) else [case["at_time"]]
    inputs = case["inputs"]
    for when in times:
        try:
            _cert_signer_check(read(inputs["certificate"]), literal(inputs["chain"]),
                               signers(trust)[0], at_time(when))
            yield f"at {when}", True, "chains and matches"
        except Invalid as exc:
            yield f"at {when}", False, exc.reason


def _rekor_fulcio(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    inputs = case["inputs"]
    payload = read(inputs["payload"])
    if (case.get("mutation") or {}).get("op") == "replace_payload":
        payload = case["mutation"]["value"].encode()
    sig_b64 = read(inputs["signature_b64"]).decode().strip()
    try:
        logged = verify_set(read(inputs["set"]).decode(), trust_rekor(trust))
        cert = load_certificate(read(inputs["certificate"]), "the certificate")
        check_rekord(logged.body, payload, sig_b64, certificate_key(cert), cert)
        if not verify(certificate_key(cert), b64decode(sig_b64, "sig"), payload):
            raise Invalid("the signature does not verify")
        _cert_signer_check(read(inputs["certificate"]), literal(inputs["chain"]),
                           signers(trust)[0], at_time(logged.integrated_time))
        yield "as is", True, "signature, SET, chain and identity check"
    except Invalid as exc:
        yield "as is", False, exc.reason


def _pki_cert(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    inputs = case["inputs"]
    try:
        _cert_signer_check(read(inputs["certificate"]), literal(inputs["chain"]),
                           signers(trust)[0], datetime.datetime.now(datetime.UTC))
        yield "as is", True, "chains and matches"
    except Invalid as exc:
        yield "as is", False, exc.reason


def _payload_signature(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    inputs = case["inputs"]
    payload = literal(inputs["payload"])
    signature = (literal(inputs["signature_b64"]) or b"").decode().strip()
    assert payload is not None
    digest = case.get("image_digest") or _named_digest(payload)
    reference = ReferenceRule("matchRepository", case["image_reference"]) \
        if "image_reference" in case else None
    if trust["type"] == "pinned_certificate":
        yield "as is", *_pinned(case, trust, payload, signature, digest)
        return
    annotations = {SIG_KEY: signature}
    for name, key in (("certificate", "dev.sigstore.cosign/certificate"),
                      ("rekor_bundle", "dev.sigstore.cosign/bundle")):
        if name in inputs:
            annotations[key] = read(inputs[name]).decode()
    sig = from_annotations(payload, annotations)
    assert isinstance(sig, LegacySignature)
    checks = [verify_legacy(sig, digest, s, trust_rekor(trust), reference=reference)
              for s in signers(trust)]
    passed = next((c for c in checks if c.ok), None)
    yield "as is", passed is not None, (passed or checks[0]).reason


def _named_digest(payload: bytes) -> str | None:
    try:
        value = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _pinned(case: dict[str, Any], trust: dict[str, Any], payload: bytes, signature: str,
            digest: str | None) -> tuple[bool, str]:
    cert = load_certificate(read(trust["certificate"]), "the pinned certificate")
    if trust.get("validity_override"):
        cert = _same_key_now(cert)
    when = case["inputs"].get("integrated_time")
    try:
        if not verify(certificate_key(cert), b64decode(signature, "sig"), payload):
            raise Invalid("the signature does not verify with the pinned certificate")
        check_payload(payload, digest)
        if trust.get("require_rekor_time") and when is None:
            raise Invalid("no transparency-log time, and one is required")
        if when is not None and not valid_at(cert, at_time(when)):
            raise Invalid("the certificate was not valid at the logged time")
    except Invalid as exc:
        return False, exc.reason
    return True, "signed with the pinned certificate"


def _same_key_now(cert: x509.Certificate) -> x509.Certificate:
    """A certificate for the same public key, valid only from now - 60 s to now + 60 s."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "validity override")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(cert.public_key()).serial_number(1)  # type: ignore[arg-type]
            .not_valid_before(now - datetime.timedelta(seconds=60))
            .not_valid_after(now + datetime.timedelta(seconds=60))
            .sign(issuer_key, hashes.SHA256()))


def _bundle(case: dict[str, Any], trust: dict[str, Any]) -> Run:
    raw = json.loads(read(case["bundle"]))
    digest = case["image_digest"]
    if digest.startswith("<"):
        digest = "sha256:" + hashlib.sha256(b"another image").hexdigest()
    for what, doc in _bundle_mutations(case, raw):
        bundle = parse_bundle(json.dumps(doc).encode())
        if not isinstance(bundle, SigstoreBundle):
            yield what, False, bundle.reason
            continue
        rekor_variants = [trust_rekor(trust)] if trust["type"] != "rekor" else \
            [rekor_keys([k]) for k in trust["rekor_keys"]]
        for keys in rekor_variants:
            checks = [verify_bundle(bundle, digest, s, keys) for s in signers(trust)]
            passed = next((c for c in checks if c.ok), None)
            yield what, passed is not None, (passed or checks[0]).reason


def _bundle_mutations(case: dict[str, Any],
                      raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    op = (case.get("mutation") or {}).get("op")
    if op is None:
        yield "as is", raw
    elif op == "bundle_type_mutations":
        env = raw["dsseEnvelope"]
        statement = json.loads(base64.b64decode(env["payload"]))
        doc = copy.deepcopy(raw)
        doc["dsseEnvelope"]["payloadType"] = "application/json"
        yield "payloadType", doc
        for field, value in (("_type", "https://example.com/Statement/v1"),
                             ("predicateType", "https://example.com/predicate/v1")):
            doc = copy.deepcopy(raw)
            changed = {**statement, field: value}
            doc["dsseEnvelope"]["payload"] = base64.b64encode(
                json.dumps(changed).encode()).decode()
            yield field, doc
    elif op == "dsse_signature_count":
        for count in case["mutation"]["variants"]:
            doc = copy.deepcopy(raw)
            sigs = doc["dsseEnvelope"]["signatures"]
            doc["dsseEnvelope"]["signatures"] = (sigs * 2)[:count]
            yield f"{count} signatures", doc
    else:
        raise AssertionError(f"unknown mutation {op}")


SCOPES = {
    "signature": _image,
    "image": _image,
    "rekor-set": _rekor_set,
    "fulcio-cert": _fulcio_cert,
    "rekor-fulcio": _rekor_fulcio,
    "pki-cert": _pki_cert,
    "payload-signature": _payload_signature,
    "bundle": _bundle,
}

__all__ = ["FIXTURES", "cases", "run_case", "serialization"]
