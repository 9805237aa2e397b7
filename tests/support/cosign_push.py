"""Sign images in a test registry the way cosign lays signatures out (SIGNATURE_SPEC,
BUNDLE_SPEC), with keys made here: the ``sha256-<hex>.sig`` manifest and its payload
blobs, or a sigstore bundle attached with the referrers tag schema (``sha256-<hex>``
index), for registries with no referrers API (Distribution 2.8)."""

from __future__ import annotations

import json
from typing import Any

from tests.support import cosign_sign as cs
from tests.support.images import Blob
from tests.support.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = Blob.of(b"{}", "application/vnd.oci.empty.v1+json")


def push_legacy(registry: Registry, repo: str, digest: str, key: cs.PrivateKey, *,
                signs: str | None = None) -> str:
    """Push cosign's ``.sig`` manifest for ``digest``, signed with ``key``.

    Args:
        signs: the digest the payload names (default ``digest``; another one makes a
            signature of the wrong image).

    Returns:
        The ``.sig`` manifest's digest.
    """
    body = cs.payload(signs or digest, reference=f"{registry.host}/{repo}")
    image = cs.sig_manifest([cs.legacy_layer(key, body)])
    config = Blob.of(b"{}", "application/vnd.oci.image.config.v1+json")
    blobs = [config] + [Blob.of(data, cs.SIMPLESIGNING) for data in image.blobs.values()]
    manifest = Blob.of(image.manifest, OCI_MANIFEST)
    registry.push_raw(repo, blobs, [(manifest, digest.replace(":", "-", 1) + ".sig")])
    return manifest.digest


def push_bundle(registry: Registry, repo: str, digest: str, size: int,
                key: cs.PrivateKey | None = None, *,
                document: dict[str, Any] | None = None) -> str:
    """Attach a sigstore bundle to ``digest`` as a referrer, through the referrers tag
    schema (an index under ``sha256-<hex>`` listing the bundle manifest).

    Args:
        key: sign a keyed DSSE bundle with it here; or
        document: a bundle made elsewhere (sigstore-js), as its JSON document.

    Returns:
        The bundle manifest's digest.
    """
    doc_bundle = document if document is not None else cs.dsse_bundle(_key(key), digest)
    bundle = Blob.of(json.dumps(doc_bundle).encode(), cs.BUNDLE_V03)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": cs.BUNDLE_V03,
           "config": EMPTY_CONFIG.descriptor(), "layers": [bundle.descriptor()],
           "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": size}}
    manifest = Blob.of(json.dumps(doc).encode(), OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**manifest.descriptor(), "artifactType": cs.BUNDLE_V03}]}
    registry.push_raw(repo, [EMPTY_CONFIG, bundle],
                      [(manifest, manifest.digest),
                       (Blob.of(json.dumps(index).encode(), OCI_INDEX),
                        digest.replace(":", "-", 1))])
    return manifest.digest


def _key(key: cs.PrivateKey | None) -> cs.PrivateKey:
    if key is None:
        raise ValueError("push_bundle wants a key or a bundle document")
    return key
