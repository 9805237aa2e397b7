"""Two real mirror processes sharing one S3 bucket, in front of real Distribution.

skopeo pulls every standard image through node A, then through node B, which
has its own empty disk. Upstream requests are counted from Distribution's own
access log: through B there must be no blob request and no manifest-by-digest
request at all; only tags are asked upstream (each node revalidates its tags).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import Image, Index
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.s3 import MotoS3, s3_config
from tests.support.skopeo import child_manifests, manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

PREFIX = "region-eu"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _node(name: str, registry: Registry, moto_s3: MotoS3, bucket: str,
          tmp_path: Path, **s3_extra: Any) -> MirrorProcess:
    upstream = {"name": "registry.test", "url": registry.url, "default": True}
    config = mirror_config(free_port(), tmp_path / f"{name}-cache", [upstream])
    config["storage"]["s3"] = s3_config(moto_s3, bucket, tmp_path / "creds", prefix=PREFIX,
                                        **s3_extra)
    process = MirrorProcess(tmp_path / name, config)
    process.start()
    return process


def _pull_and_verify(node: MirrorProcess, ref: str, item: Image | Index, dest: Path) -> None:
    out = skopeo_copy(f"127.0.0.1:{node.port}/{ref}", dest, all_platforms=True)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == {blob.digest: blob.size for blob in item.blobs()}
    children = item.children if isinstance(item, Index) else []
    assert child_manifests(out) == {c.manifest.digest: c.manifest.size for c in children}


def _expected_keys(items: list[Image | Index]) -> set[str]:
    keys = set()
    for item in items:
        children = item.children if isinstance(item, Index) else []
        for manifest in [item.manifest, *(c.manifest for c in children)]:
            keys.add(f"{PREFIX}/manifests/sha256/{manifest.digest.split(':')[1]}")
        keys |= {f"{PREFIX}/blobs/sha256/{b.digest.split(':')[1]}" for b in item.blobs()}
    return keys


def _wait_for_uploads(moto_s3: MotoS3, bucket: str, keys: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not keys <= set(moto_s3.keys(bucket, PREFIX)):
        if time.monotonic() > deadline:
            missing = keys - set(moto_s3.keys(bucket, PREFIX))
            raise AssertionError(f"node A did not upload {len(missing)} objects: {missing}")
        time.sleep(0.2)


def test_image_pulled_through_a_is_pulled_through_b_with_zero_upstream_blob_requests(
        registry_anon: Registry, moto_s3: MotoS3, skopeo_bin: str,
        std_images: list[Image | Index], tmp_path: Path) -> None:
    bucket = moto_s3.new_bucket("two-nodes")
    node_a = _node("a", registry_anon, moto_s3, bucket, tmp_path)
    try:
        for item in std_images:
            _pull_and_verify(node_a, f"{item.repo}:{item.tag}", item,
                             tmp_path / f"a-{item.repo.replace('/', '_')}")
        _wait_for_uploads(moto_s3, bucket, _expected_keys(std_images))
    finally:
        node_a.stop()
    mark = registry_anon.clear_log_mark()
    node_b = _node("b", registry_anon, moto_s3, bucket, tmp_path)
    try:
        for item in std_images:
            _pull_and_verify(node_b, f"{item.repo}:{item.tag}", item,
                             tmp_path / f"b-{item.repo.replace('/', '_')}")
            _pull_and_verify(node_b, f"{item.repo}@{item.manifest.digest}", item,
                             tmp_path / f"b-digest-{item.repo.replace('/', '_')}")
    finally:
        node_b.stop()
    upstream = registry_anon.requests_since(mark)
    assert [e.path for e in upstream if "/blobs/" in e.path] == []
    assert [e.path for e in upstream if "/manifests/sha256:" in e.path] == []
    assert {e.path.rsplit("/", 1)[1] for e in upstream if "/manifests/" in e.path} <= \
        {item.tag for item in std_images}
    lines = [json.loads(line) for line in node_b.log_text().splitlines()
             if line.startswith("{")]
    fills = [e for e in lines if e.get("event") == "fill_done"]
    blobs = {blob.digest for item in std_images for blob in item.blobs()}
    assert {f["digest"] for f in fills} == blobs
    assert {f["source"] for f in fills} == {"s3"}
    requests = [e for e in lines if e.get("event") == "request"]
    misses = [r for r in requests if r.get("route") == "blob" and r.get("cache") == "miss"]
    assert len(misses) == len(blobs)
    assert {r["source"] for r in misses} == {"s3"}


def _peak_rss(pid: int | None) -> int:
    """VmHWM of a process, in bytes."""
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_64_mib_layer_goes_up_in_parts_and_comes_back_in_bounded_memory(
        registry_anon: Registry, big_image: Image, moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = moto_s3.new_bucket("big")
    layer = big_image.layers[0]
    key = f"{PREFIX}/blobs/sha256/{layer.digest.split(':')[1]}"
    node_a = _node("a", registry_anon, moto_s3, bucket, tmp_path, part_size="8MiB")
    try:
        base_a = _peak_rss(node_a.pid)
        assert _sha256_of(f"{node_a.url}/v2/{big_image.repo}/blobs/{layer.digest}") == layer.digest
        _wait_for_uploads(moto_s3, bucket, {key})
        peak_a = _peak_rss(node_a.pid)
    finally:
        node_a.stop()
    # Over 64 MiB in 8 MiB parts: a multipart upload, whose ETag counts its parts.
    etag = moto_s3.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert int(etag.rsplit("-", 1)[1]) == -(-layer.size // (8 << 20))
    mark = registry_anon.clear_log_mark()
    node_b = _node("b", registry_anon, moto_s3, bucket, tmp_path)
    try:
        base_b = _peak_rss(node_b.pid)
        assert _sha256_of(f"{node_b.url}/v2/{big_image.repo}/blobs/{layer.digest}") == layer.digest
        peak_b = _peak_rss(node_b.pid)
    finally:
        node_b.stop()
    assert registry_anon.count(path_contains="/blobs/", since=mark) == 0
    print(f"\npeak RSS: A {base_a >> 20} -> {peak_a >> 20} MiB (fill, then upload), "
          f"B {base_b >> 20} -> {peak_b >> 20} MiB (fill from S3)")
    # Never the 64 MiB blob at once: B streams in chunks; A holds a few 8 MiB parts.
    assert peak_b - base_b < 32 << 20
    assert peak_a - base_a < 56 << 20


def _sha256_of(url: str) -> str:
    hasher = hashlib.sha256()
    with _DIRECT.open(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
