"""Deterministic test images: real gzip tarballs, configs, manifests and indexes.

Every JSON document is serialized once, with ``indent=3`` (unusual whitespace on
purpose: a proxy that re-serializes a manifest changes its digest and is caught),
and the exact bytes are kept.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["docker", "oci"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_TYPES: dict[str, dict[str, str]] = {
    "docker": {
        "manifest": DOCKER_MANIFEST,
        "index": DOCKER_LIST,
        "config": DOCKER_CONFIG,
        "layer": DOCKER_LAYER,
    },
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG, "layer": OCI_LAYER},
}


def sha256_digest(data: bytes) -> str:
    """Return ``"sha256:<hex>"`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes: a layer, a config or a manifest.

    ``media_type`` is the type used in descriptors (for a manifest, its own
    media type). ``diff_id`` is set on layers only: the digest of the
    uncompressed tar.
    """

    data: bytes = field(repr=False)
    digest: str
    size: int
    media_type: str
    diff_id: str | None = None

    @classmethod
    def of(cls, data: bytes, media_type: str, diff_id: str | None = None) -> Blob:
        """Build a Blob from bytes, computing digest and size."""
        return cls(data, sha256_digest(data), len(data), media_type, diff_id)

    def descriptor(self) -> dict[str, Any]:
        """Return the OCI descriptor ``{mediaType, digest, size}`` of this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest, config and layers."""

    repo: str
    tag: str
    manifest: Blob
    config: Blob
    layers: list[Blob]
    arch: str = "amd64"
    os: str = "linux"

    def blobs(self) -> list[Blob]:
        """Return the config and layers (everything pushed to ``/blobs/``)."""
        return [self.config, *self.layers]


@dataclass(frozen=True)
class Index:
    """A multi-platform image: an OCI index or Docker manifest list and its children."""

    repo: str
    tag: str
    manifest: Blob
    children: list[Image]

    def blobs(self) -> list[Blob]:
        """Return every distinct blob of every child (configs and layers)."""
        seen: dict[str, Blob] = {}
        for child in self.children:
            for blob in child.blobs():
                seen.setdefault(blob.digest, blob)
        return list(seen.values())


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=3).encode()


def make_layer(size: int, seed: int, media_type: str = DOCKER_LAYER) -> Blob:
    """Make a gzip tarball holding one file of ``size`` incompressible bytes.

    Args:
        size: bytes of random content in the file (the blob is slightly larger).
        seed: seed of the pseudo-random content; same seed, same bytes.
        media_type: descriptor media type (Docker's by default; ``make_image``
            retypes the layer for OCI images).

    Returns:
        The compressed layer, with ``diff_id`` set.
    """
    content = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/seed-{seed}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    compressed = gzip.compress(raw, compresslevel=1, mtime=0)
    return Blob.of(compressed, media_type, diff_id=sha256_digest(raw))


def _retype(blob: Blob, media_type: str) -> Blob:
    if blob.media_type == media_type:
        return blob
    return Blob(blob.data, blob.digest, blob.size, media_type, blob.diff_id)


def make_image(
    repo: str,
    tag: str,
    *,
    layers: list[Blob],
    fmt: Format,
    arch: str = "amd64",
    os: str = "linux",
) -> Image:
    """Make a single-platform image in Docker schema2 or OCI format.

    Args:
        repo: repository name, e.g. ``"std/docker-image"``.
        tag: tag the image is pushed under.
        layers: layers from ``make_layer`` (retyped to the format's layer type).
        fmt: ``"docker"`` or ``"oci"``.
        arch: config ``architecture``.
        os: config ``os``.

    Returns:
        The image, with exact manifest and config bytes.
    """
    types = _TYPES[fmt]
    typed = [_retype(layer, types["layer"]) for layer in layers]
    config_doc = {
        "architecture": arch,
        "os": os,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"test.repo": repo}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in typed]},
        "history": [{"created_by": f"test layer {i}"} for i in range(len(typed))],
    }
    config = Blob.of(_dumps(config_doc), types["config"])
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": types["manifest"],
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in typed],
    }
    manifest = Blob.of(_dumps(manifest_doc), types["manifest"])
    return Image(repo, tag, manifest, config, typed, arch=arch, os=os)


def make_index(repo: str, tag: str, images: list[Image], fmt: Format) -> Index:
    """Make an OCI index or a Docker manifest list over ``images``.

    Args:
        repo: repository name.
        tag: tag the index is pushed under (children are pushed by digest).
        images: the per-platform images; their ``arch``/``os`` become ``platform``.
        fmt: ``"oci"`` (image index) or ``"docker"`` (manifest list).

    Returns:
        The index with exact bytes.
    """
    media_type = _TYPES[fmt]["index"]
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {**img.manifest.descriptor(), "platform": {"architecture": img.arch, "os": img.os}}
            for img in images
        ],
    }
    return Index(repo, tag, Blob.of(_dumps(doc), media_type), list(images))


def standard_set(prefix: str) -> list[Image | Index]:
    """Return the four standard test images under ``prefix``.

    A Docker schema2 image, an OCI image, an OCI index (linux/amd64 + linux/arm64)
    and a Docker manifest list (linux/amd64 + linux/arm64), all tagged ``v1``,
    in repositories ``{prefix}/docker-image``, ``oci-image``, ``oci-index`` and
    ``docker-list``. Layers are 20 KiB to 1 MiB; seeds differ per repository so
    that no two repositories share a blob.
    """

    def layers(seed: int, sizes: list[int]) -> list[Blob]:
        return [make_layer(size, seed * 100 + i) for i, size in enumerate(sizes)]

    base = sum(prefix.encode()) * 1000
    docker = make_image(
        f"{prefix}/docker-image",
        "v1",
        layers=layers(base + 1, [20_000, 300_000, 1 << 20]),
        fmt="docker",
    )
    oci = make_image(
        f"{prefix}/oci-image", "v1", layers=layers(base + 2, [40_000, 500_000]), fmt="oci"
    )
    sets: list[Image | Index] = [docker, oci]
    kinds: list[tuple[str, Format]] = [("oci-index", "oci"), ("docker-list", "docker")]
    for n, (name, fmt) in enumerate(kinds):
        repo = f"{prefix}/{name}"
        children = [
            make_image(
                repo,
                "v1",
                layers=layers(base + 10 + 2 * n + k, [30_000, 200_000]),
                fmt=fmt,
                arch=arch,
            )
            for k, arch in enumerate(["amd64", "arm64"])
        ]
        sets.append(make_index(repo, "v1", children, fmt))
    return sets
