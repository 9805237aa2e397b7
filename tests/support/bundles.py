"""Bundles made by hand, entry by entry, as ``mirror export`` lays them out."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mirror.bundle import layout
from mirror.bundle.manifest import BundleManifest, sign
from tests.support.images import Image

Entries = list[tuple[str, bytes]]


def bundle_entries(registry: str, image: Image, key: Ed25519PrivateKey | None = None,
                   edit: Callable[[BundleManifest], None] = lambda _b: None) -> Entries:
    """The tar entries of a bundle of ``image`` under ``registry``, in export's order;
    signed with ``key`` if given. ``edit`` changes bundle.json before it is written
    (and signed)."""
    name = f"{registry}/{image.repo}:{image.tag}"
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        **image.manifest.descriptor(), "annotations": {layout.REF_NAME: name}}]}).encode()
    blobs = [image.manifest, image.config, *image.layers]
    bundle = BundleManifest(tool_version="test", references=[{
        "name": name, "registry": registry, "repository": image.repo, "tag": image.tag,
        "digest": image.manifest.digest, "mediaType": image.manifest.media_type,
        "size": image.manifest.size}])
    for file, data in ((layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.INDEX, index)):
        bundle.files[file] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    bundle.blobs = {b.digest: b.size for b in blobs}
    edit(bundle)
    data = bundle.to_bytes()
    entries = [(layout.OCI_LAYOUT, layout.LAYOUT_BYTES), (layout.BUNDLE, data)]
    if key is not None:
        entries.append((layout.SIGNATURE, sign(data, key)))
    entries.append((layout.INDEX, index))
    return entries + [(layout.blob_name(b.digest), b.data) for b in blobs]


def tar_of(entries: Entries, extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    """A PAX tar of ``entries`` in their order (``extra`` adds what entries cannot say:
    links, devices, odd headers)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return buffer.getvalue()
