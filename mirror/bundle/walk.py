"""What an OCI layout needs: every manifest reachable from ``index.json``, read from the
bundle or the cache and checked against its digest, and the digests neither holds.

A layout may leave out children of an index (platforms not selected): those are missing
only when ``bundle.json`` says they should be there. Everything here blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mirror.bundle import safejson
from mirror.errors import BundleError, OciError
from mirror.oci import (
    MANIFEST_MAX_BYTES,
    Digest,
    manifest_media_type,
    parse_manifest,
    validate_name,
    validate_tag,
)
from mirror.storage.filesystem import FilesystemStore


class Walk:
    """Every manifest reachable from index.json, and what of it is missing."""

    def __init__(self, store: FilesystemStore, staged: Mapping[str, tuple[Path, int]],
                 listed: set[str]) -> None:
        """Args:
            store: the cache.
            staged: blobs of the bundle in temp files (digest -> path, size).
            listed: every digest bundle.json says the bundle holds or its base shipped.
        """
        self._store = store
        self._staged = staged
        self._listed = listed
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.order: list[str] = []  # children before parents
        self.missing: set[str] = set()
        self.referenced: set[str] = set()  # configs and layers of every manifest reached

    def have(self, digest: str) -> bool:
        """In the bundle, or in the cache (as a blob or a manifest)."""
        if digest in self._staged or digest in self.manifests:
            return True
        parsed = parse_digest(digest, digest)
        return self._store.blob_size(parsed) is not None or \
            self._store.manifest_path(parsed).is_file()

    def visit(self, descriptor: dict[str, Any], required: bool) -> None:
        digest = descriptor.get("digest")
        if not isinstance(digest, str) or digest in self.manifests:
            return
        data = self._load(digest)
        if data is None:
            # A layout may leave children out (platforms not selected): not an error
            # unless bundle.json says it should be here.
            if required or digest in self._listed:
                self.missing.add(digest)
            return
        safejson.loads(data, f"manifest {digest}")  # depth and size, before oci parses it
        try:
            media_type = manifest_media_type(data, descriptor.get("mediaType"))
            document = parse_manifest(data)
        except OciError as exc:
            raise BundleError(f"manifest {digest}: {exc.message}") from None
        self.manifests[digest] = (data, media_type)
        for child in document.get("manifests") or []:
            if isinstance(child, dict):
                self.visit(child, required=False)
        config = document.get("config")
        for blob in ([config] if isinstance(config, dict) else []) + \
                [b for b in document.get("layers") or [] if isinstance(b, dict)]:
            if isinstance(blob.get("digest"), str):
                self.referenced.add(blob["digest"])
                if not self.have(blob["digest"]):
                    self.missing.add(blob["digest"])
        self.order.append(digest)

    def _load(self, text: str) -> bytes | None:
        digest = parse_digest(text, text)
        staged = self._staged.get(text)
        path = staged[0] if staged is not None else None
        if path is None:
            stored = self._store.read_manifest(digest)
            if stored is not None:
                return stored[0]
            path = self._store.blob_path(digest)
        try:
            if path.stat().st_size > MANIFEST_MAX_BYTES:
                raise BundleError(f"manifest {text} is larger than {MANIFEST_MAX_BYTES} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data if digest.matches(data) else None


def tree(root: str, manifests: dict[str, tuple[bytes, str]]) -> set[str]:
    """Every digest an image's manifest reaches (manifests of the bundle, blobs)."""
    found: set[str] = set()
    pending = [root]
    while pending:
        digest = pending.pop()
        if digest in found:
            continue
        found.add(digest)
        if digest in manifests:
            document = parse_manifest(manifests[digest][0])
            pending += [m["digest"] for m in document.get("manifests") or []
                        if isinstance(m, dict) and m.get("digest") in manifests]
            config = document.get("config")
            for blob in ([config] if isinstance(config, dict) else []) + \
                    list(document.get("layers") or []):
                if isinstance(blob, dict) and isinstance(blob.get("digest"), str):
                    found.add(blob["digest"])
    return found


def check_reference(ref: dict[str, Any], manifests: dict[str, tuple[bytes, str]]) -> None:
    """A reference of bundle.json names a valid repository and tag, and an image here.

    Raises:
        BundleError: it does not.
    """
    try:
        validate_name(ref["repository"])
        if ref.get("tag") is not None:
            validate_tag(ref["tag"])
    except OciError as exc:
        raise BundleError(f"bundle.json reference {ref['name']!r}: {exc.message}") from None
    if ref["digest"] not in manifests:
        raise BundleError(f"bundle.json names {ref['digest']} for {ref['name']!r}, which "
                          "index.json does not lead to")


def parse_digest(text: str, where: str) -> Digest:
    try:
        return Digest.parse(text)
    except OciError as exc:
        raise BundleError(f"{where}: {exc.message}") from None
