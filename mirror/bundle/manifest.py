"""``bundle.json``: what a bundle holds, versioned, and its ed25519 signature.

::

    {
      "bundleVersion": 1,
      "id": "<uuid4>",            "created": "2026-11-29T20:00:00.123456Z",
      "base": "<id>" | null,      "sequence": 0        (base's sequence + 1 for --since)
      "tool": {"name": "mirror", "version": "0.1.0"},
      "platforms": ["linux/amd64"] | [],              ([]: every platform)
      "references": [{"name": "docker.io/library/nginx:1.27", "registry": "docker.io",
                      "repository": "library/nginx", "tag": "1.27" | null,
                      "digest": "sha256:...", "mediaType": "...", "size": 1234}],
      "files": {"oci-layout": {"sha256": "...", "size": 30},
                "index.json": {"sha256": "...", "size": 800}},
      "blobs": [{"digest": "sha256:...", "size": 123}],      in this bundle
      "omitted": [{"digest": "sha256:...", "size": 456}]     in the base: the target has them
    }

One signature over these exact bytes commits to every file of the bundle: the two small
files by sha256, every blob by its digest (which import re-hashes anyway).
``bundle.json.sig`` is ``{"algorithm": "ed25519", "keyId": "sha256:<hex of the raw public
key>", "signature": "<base64>"}``. Keys are PEM files (``openssl genpkey -algorithm ed25519``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mirror.bundle import safejson
from mirror.errors import BundleError

BUNDLE_VERSION = 1
TOOL = "mirror"


@dataclass
class BundleManifest:
    """The parsed ``bundle.json``."""

    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC)
                         .strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    base: str | None = None
    sequence: int = 0
    tool_version: str = ""
    platforms: list[str] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, in this bundle
    omitted: dict[str, int] = field(default_factory=dict)  # digest -> size, in the base

    def to_bytes(self) -> bytes:
        """The bytes of ``bundle.json`` (these bytes are what is signed)."""
        document = {
            "bundleVersion": BUNDLE_VERSION, "id": self.id, "created": self.created,
            "base": self.base, "sequence": self.sequence,
            "tool": {"name": TOOL, "version": self.tool_version},
            "platforms": self.platforms, "references": self.references, "files": self.files,
            "blobs": [{"digest": d, "size": s} for d, s in self.blobs.items()],
            "omitted": [{"digest": d, "size": s} for d, s in self.omitted.items()],
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, where: str = "bundle.json") -> BundleManifest:
        """Parse and check ``bundle.json``.

        Raises:
            BundleError: not JSON, a version this mirror does not know, or a bad field.
        """
        doc = safejson.loads(data, where)
        if not isinstance(doc, dict):
            raise BundleError(f"{where} is not a JSON object")
        version = doc.get("bundleVersion")
        if version != BUNDLE_VERSION:
            raise BundleError(f"{where} has bundleVersion {version!r}; this mirror reads "
                              f"version {BUNDLE_VERSION} (a newer mirror made it?)")
        try:
            return cls(
                id=_text(doc["id"]), created=_text(doc["created"]),
                base=None if doc.get("base") is None else _text(doc["base"]),
                sequence=int(doc["sequence"]), tool_version=_text(doc["tool"]["version"]),
                platforms=[_text(p) for p in doc.get("platforms", [])],
                references=[r for r in doc["references"] if _reference_ok(r)],
                files={_text(k): dict(v) for k, v in doc["files"].items()},
                blobs=_blob_list(doc["blobs"]), omitted=_blob_list(doc.get("omitted", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None

    def check_file(self, name: str, data: bytes) -> None:
        """Check a small file of the layout against its sha256 here.

        Raises:
            BundleError: not listed, or changed since the bundle was made.
        """
        expected = self.files.get(name, {}).get("sha256")
        if expected is None:
            raise BundleError(f"{name} is not listed in bundle.json")
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"{name} does not match the sha256 in bundle.json (tampered "
                              "or damaged)")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _reference_ok(ref: Any) -> bool:
    if not isinstance(ref, dict):
        raise TypeError("a reference is not an object")
    for key in ("name", "registry", "repository", "digest", "mediaType"):
        _text(ref[key])
    if ref.get("tag") is not None:
        _text(ref["tag"])
    return True


def _blob_list(items: Any) -> dict[str, int]:
    found: dict[str, int] = {}
    for item in items:
        size = item["size"]
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad size {size!r}")
        found[_text(item["digest"])] = size
    return found


# --- signatures -----------------------------------------------------------------------------
def key_id(public: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw public key: what a signature names and import prints."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file (unencrypted PKCS#8, as openssl writes it).

    Raises:
        BundleError: unreadable, or not an ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file (``openssl pkey -pubout``).

    Raises:
        BundleError: unreadable, or not an ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an ed25519 public key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The ``bundle.json.sig`` document for ``data``."""
    signature = base64.b64encode(key.sign(data)).decode()
    return json.dumps({"algorithm": "ed25519", "keyId": key_id(key.public_key()),
                       "signature": signature}).encode()


def verify(data: bytes | None, signature: bytes | None,
           keys: Ed25519PublicKey | Sequence[Ed25519PublicKey]) -> str:
    """Check ``bundle.json``'s exact bytes against its signature by one of ``keys``, before
    anything parses them; returns the key id that verified.

    Raises:
        BundleError: no bundle.json, no signature, signed by a key not among ``keys``, or a
            bad signature.
    """
    trusted = {key_id(k): k for k in ([keys] if isinstance(keys, Ed25519PublicKey) else keys)}
    names = ", ".join(trusted)
    if data is None:
        raise BundleError(f"the bundle has no bundle.json, so no signature to check with key "
                          f"{names}")
    if signature is None:
        raise BundleError(f"the bundle is not signed (no bundle.json.sig); checked for key "
                          f"{names}")
    try:
        doc = safejson.loads(signature, "bundle.json.sig")
        raw = base64.b64decode(doc["signature"], validate=True)
        signed_by = doc.get("keyId")
    except (BundleError, ValueError, KeyError, TypeError, AttributeError):
        raise BundleError("bundle.json.sig is malformed") from None
    key = trusted.get(signed_by) if isinstance(signed_by, str) else None
    if key is None:
        which = f"not by {names}" if len(trusted) == 1 else f"which is not one of the " \
            f"trusted keys ({names})"
        raise BundleError(f"the bundle is signed by key {str(signed_by)[:80]}, {which}")
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise BundleError(f"the signature of bundle.json does not verify with key {signed_by} "
                          "(bundle.json or its signature was changed)") from None
    return str(signed_by)
