"""OCI vocabulary: name, tag and digest grammars, media types, manifest helpers.

Everything here is pure: no I/O, no state. Values from the network are turned
into :class:`Digest` and validated names at the edge and nothing below sees a
raw string.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mirror.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid

# Repository path grammar of the distribution spec; lowercase only.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
NAME_MAX = 255
_LOWER_HEX = re.compile(r"[0-9a-f]+")

# Algorithms we can verify, and the exact length of their lowercase hex.
HASH_HEX_LENGTH = {"sha256": 64, "sha512": 128}

MANIFEST_MAX_BYTES = 4 * 1024 * 1024

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
#: What the mirror asks upstream for: every modern type, never schema 1.
UPSTREAM_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated content digest such as ``sha256:ab12...``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse and validate a digest string.

        Raises:
            DigestInvalid: the value is not a digest, or uses an algorithm
                this mirror cannot verify.
        """
        match = DIGEST_RE.fullmatch(value)
        if match is None:
            raise DigestInvalid(f"invalid digest {value[:150]!r}")
        algorithm, encoded = match.groups()
        length = HASH_HEX_LENGTH.get(algorithm)
        if length is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}: "
                                "the mirror only serves content it can verify (sha256, sha512)")
        if len(encoded) != length or _LOWER_HEX.fullmatch(encoded) is None:
            raise DigestInvalid(f"invalid {algorithm} digest: expected {length} lowercase hex")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        """A new hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` hashes to this digest."""
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


def is_number(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits, the only numbers HTTP and the
    distribution spec know (``str.isdigit`` also takes ``²``, ``٣`` and full-width digits)."""
    return text.isascii() and text.isdigit()


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name.

    Raises:
        NameInvalid: it breaks the OCI name grammar or the length limit.
    """
    if len(name) > NAME_MAX or NAME_RE.fullmatch(name) is None:
        raise NameInvalid(f"invalid repository name {name[:150]!r}")
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag.

    Raises:
        TagInvalid: it breaks the OCI tag grammar.
    """
    if TAG_RE.fullmatch(tag) is None:
        raise TagInvalid(f"invalid tag {tag[:150]!r}")
    return tag


def is_digest_reference(reference: str) -> bool:
    """Whether a manifest reference names a digest rather than a tag."""
    return ":" in reference


def accepted_types(header_values: Iterable[str]) -> frozenset[str] | None:
    """The media types a client accepts, from every ``Accept`` header line.

    Returns:
        The set of types without parameters, or ``None`` when the client
        accepts anything (no header, or ``*/*``).
    """
    types: set[str] = set()
    for value in header_values:
        for item in value.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type in ("*/*", "application/*"):
                return None
            if media_type:
                types.add(media_type)
    return frozenset(types) if types else None


def client_accepts(accepted: frozenset[str] | None, media_type: str) -> bool:
    """Whether a client with this Accept set may be sent ``media_type``."""
    return accepted is None or media_type in accepted


def manifest_media_type(data: bytes, content_type: str | None) -> str:
    """Decide the media type of manifest bytes received from upstream.

    The ``mediaType`` field wins when present; otherwise the upstream
    ``Content-Type``; otherwise the type is inferred from the structure.

    Raises:
        ManifestInvalid: the bytes are not a JSON manifest we can serve.
    """
    document = parse_manifest(data)
    declared = document.get("mediaType")
    header = (content_type or "").split(";", 1)[0].strip().lower()
    if isinstance(declared, str) and declared:
        media_type = declared
    elif header in MANIFEST_TYPES:
        media_type = header
    elif "manifests" in document:
        media_type = OCI_INDEX
    elif "layers" in document or "config" in document:
        media_type = OCI_MANIFEST
    else:
        raise ManifestInvalid("upstream sent a document that is not an image manifest")
    if media_type in (SCHEMA1, SCHEMA1_SIGNED) or document.get("schemaVersion") == 1:
        raise ManifestInvalid("schema 1 manifests are not supported (deprecated by every client)")
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type[:100]!r}")
    _check_shape(document, media_type)
    return media_type


def _check_shape(document: dict[str, Any], media_type: str) -> None:
    """An index lists manifests; an image has a config and layers (all descriptors)."""
    if media_type in INDEX_TYPES:
        ok = _descriptors(document.get("manifests"))
    else:
        ok = isinstance(document.get("config"), dict) and _descriptors(document.get("layers"))
    if not ok:
        raise ManifestInvalid(f"upstream sent a {media_type} that does not have its shape")


def _descriptors(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _size(value: Any) -> int:
    """A descriptor's size, or 0 when it is not a whole number (a hint only)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse manifest JSON, for reading only: the bytes are never re-serialized.

    Raises:
        ManifestInvalid: not a JSON object.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestInvalid(f"upstream sent a manifest that is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestInvalid("upstream sent a manifest that is not a JSON object")
    return document


#: BuildKit's annotation on an attestation manifest in an image index (and its value).
REFERENCE_TYPE = "vnd.docker.reference.type"
ATTESTATION = "attestation-manifest"


def is_attestation(entry: dict[str, Any]) -> bool:
    """Whether an index entry is a BuildKit attestation manifest (platform unknown/unknown)."""
    annotations = entry.get("annotations")
    return isinstance(annotations, dict) and annotations.get(REFERENCE_TYPE) == ATTESTATION


def is_platform_image(entry: dict[str, Any]) -> bool:
    """Whether an index entry is the image of a platform, which platform filters choose
    among, rather than content beside the images: an attestation manifest, a SOCI
    index (``com.amazon.soci.*`` annotations), an artifact (``artifactType``), an entry
    with no platform or ``unknown/unknown``. Filters keep those: lazy pullers and
    verifiers need them."""
    platform = entry.get("platform")
    if not isinstance(platform, dict) or entry.get("artifactType"):
        return False
    if "unknown" in (platform.get("os"), platform.get("architecture")):
        return False
    annotations = entry.get("annotations")
    return not (isinstance(annotations, dict) and (
        REFERENCE_TYPE in annotations
        or any(str(key).startswith("com.amazon.soci") for key in annotations)))


def pick_platform(index: dict[str, Any], os: str = "linux", arch: str = "amd64") -> str | None:
    """The digest of the ``os/arch`` entry of an index, or ``None``.

    Used when a client that does not accept manifest lists asks for one by
    tag: the reference registry answers with the linux/amd64 child.
    """
    for entry in index.get("manifests", []):
        if not isinstance(entry, dict):
            continue
        platform = entry.get("platform") or {}
        if platform.get("os") == os and platform.get("architecture") == arch:
            digest = entry.get("digest")
            return digest if isinstance(digest, str) else None
    return None


def referenced_digests(document: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(kind, digest, size) of every descriptor a manifest or index points to.

    ``kind`` is ``manifest`` for children of an index, else ``blob``.
    Malformed entries are skipped: this serves prefetch and pinning, never
    verification.
    """
    found: list[tuple[str, str, int]] = []
    for entry in document.get("manifests", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            found.append(("manifest", entry["digest"], _size(entry.get("size"))))
    config = document.get("config")
    blobs = [config] if isinstance(config, dict) else []
    blobs += [layer for layer in document.get("layers", []) or [] if isinstance(layer, dict)]
    for blob in blobs:
        if isinstance(blob.get("digest"), str):
            found.append(("blob", blob["digest"], _size(blob.get("size"))))
    return found
