"""The images the benchmark pulls, generated fast and pushed into the upstream.

The pull set is about twenty small images (3 to 5 layers of 1 to 20 MiB, the
first layer one of three base layers shared between repositories), one
multi-platform image (an OCI index whose two platforms share a base layer),
and one image with a single large layer.

Layers are real gzip tarballs with the right ``diff_ids``, but compressed at
level 0 (stored blocks): random content does not compress anyway, and
deflating a gigabyte at level 1 costs a minute on these machines. The random
bytes come from AES-CTR, an order of magnitude faster than ``random.randbytes``.
The large layer is streamed to a file and uploaded from it, never held in memory.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.support.images import (
    DOCKER_LAYER,
    Blob,
    Format,
    Image,
    Index,
    make_image,
    make_index,
)
from tests.support.registry import PushError, Registry

MiB = 1 << 20
KiB = 1 << 10
_CHUNK = 4 * MiB
_RECORD = 10240  # tar pads archives to whole records, as tarfile does


@dataclass(frozen=True)
class SeedPlan:
    """Sizes of everything the benchmark generates (bytes)."""

    images: int
    base_sizes: tuple[int, ...]
    own_sizes: tuple[int, ...]
    multi_sizes: tuple[int, ...]
    large_size: int


def make_plan(smoke: bool, large_size: int) -> SeedPlan:
    """Return the full plan, or tiny sizes for the smoke mode.

    Args:
        smoke: tiny images (kilobytes) so that a run takes seconds.
        large_size: bytes of random content in the large layer.
    """
    if smoke:
        return SeedPlan(4, (48 * KiB, 32 * KiB, 16 * KiB), (4 * KiB, 12 * KiB, 8 * KiB),
                        (8 * KiB, 6 * KiB), large_size)
    return SeedPlan(20, (20 * MiB, 12 * MiB, 8 * MiB),
                    tuple(n * MiB for n in (1, 2, 3, 5, 1, 8, 2, 4, 1, 12, 3, 6)),
                    (2 * MiB, 3 * MiB), large_size)


@dataclass(frozen=True)
class ImageSet:
    """What was pushed upstream, and the blobs the scenarios single out.

    ``pull_set`` is what the cold and warm scenarios pull; ``hot_blob`` is the
    largest base layer and ``small_blob`` an image config (about 1 KiB);
    ``large_file`` holds the large layer's bytes (its Blob carries no data).
    """

    pull_set: list[Image | Index]
    large: Image
    large_file: Path
    hot_blob: Blob
    small_blob: Blob
    hot_repo: str


def platform_image(item: Image | Index, arch: str = "amd64") -> Image:
    """The image a linux/``arch`` client pulls for ``item``."""
    if isinstance(item, Image):
        return item
    return next(child for child in item.children if child.arch == arch)


def pulled_bytes(items: list[Image | Index]) -> int:
    """Unique bytes a client pulls for ``items``: manifests, configs and layers."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item.manifest.digest] = item.manifest.size
        image = platform_image(item)
        for blob in (image.manifest, *image.blobs()):
            seen[blob.digest] = blob.size
    return sum(seen.values())


def _random_chunks(size: int, seed: int) -> Iterator[bytes]:
    key = hashlib.sha256(f"bench-layer-{seed}".encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    left = size
    while left > 0:
        n = min(left, _CHUNK)
        yield encryptor.update(bytes(n))
        left -= n


def _tar_stream(size: int, seed: int) -> Iterator[bytes]:
    info = tarfile.TarInfo(f"data/seed-{seed}.bin")
    info.size, info.mtime, info.mode = size, 0, 0o644
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    yield header
    yield from _random_chunks(size, seed)
    total = len(header) + size
    pad = -size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    total += pad
    yield bytes(pad + (-total % _RECORD))


def write_layer(size: int, seed: int, out: BinaryIO) -> Blob:
    """Write a gzip tarball of one file with ``size`` random bytes to ``out``.

    Args:
        size: bytes of random content.
        seed: same seed, same bytes.
        out: where the compressed bytes go.

    Returns:
        A Blob with digest, size and ``diff_id`` and no data.
    """
    raw_hash, gz_hash = hashlib.sha256(), hashlib.sha256()
    gz = zlib.compressobj(0, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    written = 0
    for chunk in _tar_stream(size, seed):
        raw_hash.update(chunk)
        part = gz.compress(chunk)
        gz_hash.update(part)
        out.write(part)
        written += len(part)
    tail = gz.flush()
    gz_hash.update(tail)
    out.write(tail)
    written += len(tail)
    return Blob(b"", "sha256:" + gz_hash.hexdigest(), written, DOCKER_LAYER,
                "sha256:" + raw_hash.hexdigest())


def make_fast_layer(size: int, seed: int) -> Blob:
    """Like :func:`write_layer`, in memory: a Blob that carries its bytes."""
    buf = io.BytesIO()
    blob = write_layer(size, seed, buf)
    return Blob(buf.getvalue(), blob.digest, blob.size, blob.media_type, blob.diff_id)


def build(plan: SeedPlan, workdir: Path) -> ImageSet:
    """Generate every image of ``plan``; the large layer goes to ``workdir``."""
    bases = [make_fast_layer(size, 1000 + i) for i, size in enumerate(plan.base_sizes)]
    pull_set: list[Image | Index] = []
    seed = 2000
    for i in range(plan.images):
        own = []
        for _ in range(2 + i % 3):
            own.append(make_fast_layer(plan.own_sizes[seed % len(plan.own_sizes)], seed))
            seed += 1
        fmt: Format = "docker" if i % 2 == 0 else "oci"
        pull_set.append(make_image(f"bench/app-{i:02d}", "v1", layers=[bases[i % 3], *own],
                                   fmt=fmt))
    children = [
        make_image("bench/multi", "v1", fmt="oci", arch=arch, layers=[
            bases[0], *(make_fast_layer(s, 3000 + 10 * k + j)
                        for j, s in enumerate(plan.multi_sizes))])
        for k, arch in enumerate(("amd64", "arm64"))
    ]
    pull_set.append(make_index("bench/multi", "v1", children, "oci"))
    workdir.mkdir(parents=True, exist_ok=True)
    large_file = workdir / "large-layer.tar.gz"
    with large_file.open("wb") as out:
        large_layer = write_layer(plan.large_size, 4000, out)
    large = make_image("bench/large", "v1", layers=[large_layer], fmt="docker")
    first = pull_set[0]
    assert isinstance(first, Image)
    return ImageSet(pull_set, large, large_file, hot_blob=bases[0], small_blob=first.config,
                    hot_repo=first.repo)


def _upload_file(registry: Registry, repo: str, blob: Blob, path: Path) -> None:
    """Push one blob from a file with a monolithic PUT, streamed from disk."""
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=600,
                                      blocksize=MiB)
    headers = registry.auth_header(repo)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 202:
            raise PushError(f"start upload in {repo}: {resp.status}")
        location = urlsplit(resp.headers["Location"])
        sep = "&" if location.query else ""
        with path.open("rb") as body:
            conn.request("PUT", f"{location.path}?{location.query}{sep}digest={blob.digest}",
                         body=body, headers={**headers, "Content-Length": str(blob.size),
                                             "Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
        if resp.status != 201:
            raise PushError(f"upload {blob.digest} in {repo}: {resp.status}")
    finally:
        conn.close()


def seed(registry: Registry, images: ImageSet) -> None:
    """Push every image of ``images`` into ``registry`` (the large layer from its file)."""
    for item in images.pull_set:
        registry.push(item)
    _upload_file(registry, images.large.repo, images.large.layers[0], images.large_file)
    registry.push(images.large)  # the layer is there already: HEAD 200, skipped
