"""An upstream outage of record: real Distribution stopped and started again
under the mirror as a real process, with skopeo pulling through it.

While upstream is down, every image pulled before still pulls (tags stale,
content from disk), the circuit breaker opens after the configured failures
and no further connection is attempted; when upstream is back, one probe
closes the breaker and tags are revalidated upstream again.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import Image, Index
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration

UPSTREAM_NAME = "registry.test"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _metric(mirror: MirrorProcess, name: str, **labels: str) -> float:
    with _DIRECT.open(f"{mirror.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and wanted <= set(match.group(1).split(",")):
            return float(match.group(2))
    return 0.0


def _manifest_status(mirror: MirrorProcess, item: Image | Index) -> int:
    request = urllib.request.Request(f"{mirror.url}/v2/{item.repo}/manifests/{item.tag}",
                                     method="HEAD")
    with _DIRECT.open(request, timeout=30) as response:
        return int(response.status)


def _pull(mirror: MirrorProcess, item: Image | Index, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = skopeo_copy(f"127.0.0.1:{mirror.port}/{item.repo}:{item.tag}", dest,
                      all_platforms=True)
    assert manifest_digest(out) == item.manifest.digest
    assert verify_dir(out) == {blob.digest: blob.size for blob in item.blobs()}


@pytest.fixture
def registry(registry_bin: str, tmp_path: Path) -> Iterator[Registry]:
    upstream = Registry(tmp_path / "registry")
    upstream.start()
    yield upstream
    upstream.stop()


def test_outage_serves_stale_opens_the_breaker_and_recovers(
        registry: Registry, std_images: list[Image | Index], skopeo_bin: str,
        tmp_path: Path) -> None:
    items = std_images[:3]
    for item in items:
        registry.push(item)
    upstream = {"name": UPSTREAM_NAME, "url": registry.url, "default": True, "retries": 0,
                "connect_timeout": "2s", "breaker": {"failures": 2, "cool_down": "2s"}}
    config = mirror_config(free_port(), tmp_path / "cache", [upstream])
    config["cache"] = {"tag_ttl": "1s"}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        for item in items:
            _pull(mirror, item, tmp_path / "before" / item.repo.replace("/", "_"))
        registry.stop()
        time.sleep(1.1)  # past the TTL: every tag now needs upstream, which is gone
        for item in items:
            _pull(mirror, item, tmp_path / "during" / item.repo.replace("/", "_"))
            assert _manifest_status(mirror, item) == 200
        assert _metric(mirror, "mirror_upstream_breaker_state", registry=UPSTREAM_NAME) == 1
        # Two refused connections opened the breaker; no other one was tried.
        assert _metric(mirror, "mirror_upstream_errors_total", registry=UPSTREAM_NAME,
                       reason="connect") == 2
        assert "upstream_breaker_open" in mirror.log_text()
        assert "tag_served_stale" in mirror.log_text()

        registry.start()
        mark = registry.clear_log_mark()
        time.sleep(2.1)  # the cool-down: the next revalidation is the probe
        assert _manifest_status(mirror, items[0]) == 200
        assert _metric(mirror, "mirror_upstream_breaker_state", registry=UPSTREAM_NAME) == 0
        assert "upstream_breaker_closed" in mirror.log_text()
        heads = registry.count("HEAD", path_contains=f"/{items[0].repo}/manifests/", since=mark)
        assert heads == 1
