"""Two real mirror processes sharing one S3 bucket, in front of real Distribution.

skopeo pulls every standard image through node A, then through node B, which
has its own empty disk. Upstream requests are counted from Distribution's own
access log: through B there must be no blob request and no manifest-by-digest
request at all; only tags are asked upstream (each node revalidates its tags).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.images import Image, Index
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.s3 import MotoS3, s3_config
from tests.support.skopeo import child_manifests, manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

PREFIX = "region-eu"


def _node(name: str, registry: Registry, moto_s3: MotoS3, bucket: str,
          tmp_path: Path) -> MirrorProcess:
    upstream = {"name": "registry.test", "url": registry.url, "default": True}
    config = mirror_config(free_port(), tmp_path / f"{name}-cache", [upstream])
    config["storage"]["s3"] = s3_config(moto_s3, bucket, tmp_path / "creds", prefix=PREFIX)
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
    fills = [json.loads(line) for line in node_b.log_text().splitlines()
             if '"event": "fill_done"' in line]
    blobs = {blob.digest for item in std_images for blob in item.blobs()}
    assert {f["digest"] for f in fills} == blobs
    assert {f["registry"] for f in fills} == {"s3"}
    requests = [json.loads(line) for line in node_b.log_text().splitlines()
                if '"event": "request"' in line]
    misses = [r for r in requests if r.get("route") == "blob" and r.get("cache") == "miss"]
    assert len(misses) == len(blobs)
    assert {r["source"] for r in misses} == {"s3"}
