"""Transparency-log evidence, checked offline: Rekor's signed entry timestamps (SETs),
inclusion proofs with their signed checkpoints, and what a logged entry says.

A SET is Rekor's signature over the RFC 8785 JSON of ``{body, integratedTime, logID,
logIndex}``; it proves the entry was logged at ``integratedTime``. An inclusion proof
recomputes the Merkle root (RFC 6962/9162) from the entry's leaf hash, and the checkpoint
(a signed note) says the log signed that root.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.policy.crypto import Invalid, PublicKey, b64decode, canonical_json, key_id, verify

MAX_PROOF_HASHES = 64


@dataclass(frozen=True)
class LoggedEntry:
    """A Rekor entry whose SET or proof checked: its decoded body and when it was logged."""

    body: dict[str, Any]
    integrated_time: int
    log_id: str


def rekor_keys_by_id(keys: tuple[PublicKey, ...]) -> dict[str, PublicKey]:
    """The Rekor keys by log id (hex SHA-256 of the key's DER)."""
    return {key_id(k).hex(): k for k in keys}


def verify_set(annotation: str, rekor_keys: Mapping[str, PublicKey]) -> LoggedEntry:
    """Check the ``dev.sigstore.cosign/bundle`` annotation of a legacy signature.

    Returns:
        The logged entry (body decoded, integrated time).

    Raises:
        Invalid: not a Rekor bundle, no trusted key for its log, or the SET does not verify.
    """
    try:
        doc = json.loads(annotation)
        signed = b64decode(doc["SignedEntryTimestamp"], "the SET")
        payload = doc["Payload"]
        body_b64, time = payload["body"], payload["integratedTime"]
        index, log_id = payload["logIndex"], payload["logID"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise Invalid("the Rekor bundle is not valid") from None
    if not (isinstance(body_b64, str) and _is_int(time) and _is_int(index)
            and isinstance(log_id, str)):
        raise Invalid("the Rekor bundle is not valid")
    message = canonical_json({"body": body_b64, "integratedTime": time, "logID": log_id,
                              "logIndex": index})
    _check_log_signature(rekor_keys, log_id, signed, message)
    return LoggedEntry(body=_body(body_b64), integrated_time=time, log_id=log_id)


def verify_bundle_entry(entry: Mapping[str, Any],
                        rekor_keys: Mapping[str, PublicKey]) -> LoggedEntry:
    """Check a bundle's tlog entry: its inclusion promise (SET) and, when present, its
    inclusion proof and checkpoint. At least one of the two must be there.

    Raises:
        Invalid: malformed, from an untrusted log, or a promise or proof that fails.
    """
    try:
        log_id = b64decode(entry["logId"]["keyId"], "the log id").hex()
        body_b64 = str(entry["canonicalizedBody"])
        time, index = int(entry["integratedTime"]), int(entry["logIndex"])
        promise = entry.get("inclusionPromise")
        proof = entry.get("inclusionProof")
    except (KeyError, TypeError, ValueError):
        raise Invalid("the tlog entry is not valid") from None
    if promise is None and proof is None:
        raise Invalid("the tlog entry has neither an inclusion promise nor a proof")
    if promise is not None:
        signed = b64decode(str(promise.get("signedEntryTimestamp", "")), "the SET")
        message = canonical_json({"body": body_b64, "integratedTime": time, "logID": log_id,
                                  "logIndex": index})
        _check_log_signature(rekor_keys, log_id, signed, message)
    if proof is not None:
        _check_inclusion(proof, b64decode(body_b64, "the entry body"), rekor_keys, log_id)
    return LoggedEntry(body=_body(body_b64), integrated_time=time, log_id=log_id)


def _check_log_signature(keys: Mapping[str, PublicKey], log_id: str, signature: bytes,
                         message: bytes) -> None:
    key = keys.get(log_id.lower())
    if key is None:
        raise Invalid("the entry is from a transparency log that is not trusted")
    if not verify(key, signature, message):
        raise Invalid("the transparency log's signature (SET) does not verify")


def _check_inclusion(proof: Mapping[str, Any], body: bytes, keys: Mapping[str, PublicKey],
                     log_id: str) -> None:
    try:  # protobuf's JSON leaves out zero values: an index of 0, an empty path
        index, size = int(proof.get("logIndex", 0)), int(proof["treeSize"])
        root = b64decode(str(proof["rootHash"]), "the root hash")
        hashes = [b64decode(str(h), "a proof hash") for h in proof.get("hashes", [])]
        note = str(proof["checkpoint"]["envelope"])
    except (KeyError, TypeError, ValueError):
        raise Invalid("the inclusion proof is not valid") from None
    if len(hashes) > MAX_PROOF_HASHES or not 0 <= index < size:
        raise Invalid("the inclusion proof is not valid")
    leaf = hashlib.sha256(b"\x00" + body).digest()
    if root_from_proof(index, size, leaf, hashes) != root:
        raise Invalid("the inclusion proof does not lead to the logged root")
    check_checkpoint(note, root, size, keys, log_id)


def root_from_proof(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes | None:
    """The Merkle root an inclusion proof leads to (RFC 9162 2.1.3.2), or ``None``."""
    fn, sn, node = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            node = hashlib.sha256(b"\x01" + sibling + node).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = hashlib.sha256(b"\x01" + node + sibling).digest()
        fn, sn = fn >> 1, sn >> 1
    return node if sn == 0 else None


def check_checkpoint(note: str, root: bytes, size: int, keys: Mapping[str, PublicKey],
                     log_id: str) -> None:
    """Check a signed checkpoint (a signed note) names ``root`` at ``size``, signed by
    the log's key (the signature line starts with the key's 4-byte hint).

    Raises:
        Invalid: malformed, another root or size, or no signature by the log's key.
    """
    text, sep, signatures = note.partition("\n\n")
    lines = text.split("\n")
    if not sep or len(lines) < 3:
        raise Invalid("the checkpoint is not a signed note")
    if lines[1] != str(size) or lines[2] != base64.b64encode(root).decode():
        raise Invalid("the checkpoint names another tree")
    key = keys.get(log_id)
    if key is None:
        raise Invalid("the checkpoint's log is not trusted")
    hint = bytes.fromhex(log_id)[:4]
    for line in signatures.splitlines()[:8]:
        raw = _note_signature(line)
        if raw is not None and raw[:4] == hint and verify(key, raw[4:], (text + "\n").encode()):
            return
    raise Invalid("the checkpoint is not signed by the log")


def _note_signature(line: str) -> bytes | None:
    if not line.startswith("\u2014 "):
        return None
    _, _, sig = line[2:].rpartition(" ")
    try:
        return b64decode(sig, "a note signature")
    except Invalid:
        return None


def _body(body_b64: str) -> dict[str, Any]:
    try:
        body = json.loads(b64decode(body_b64, "the entry body"))
    except ValueError:
        raise Invalid("the logged entry is not JSON") from None
    if not isinstance(body, dict):
        raise Invalid("the logged entry is not a JSON object")
    return body


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
