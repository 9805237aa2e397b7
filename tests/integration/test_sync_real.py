"""Tests of record for warming: the mirror as a real process in front of real Distribution,
driven by the real `mirror sync` / `mirror warm` commands and pulled by skopeo. Upstream
requests are counted from Distribution's own access log."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import Image, Index, make_image, make_index, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, write_registries_conf
from tests.support.throttle import ThrottledProxy

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"




def _mirror_cli(*args: str, config: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _sync_once(process: MirrorProcess, *extra: str) -> dict[str, Any]:
    code, out = _mirror_cli("sync", "--once", "--json", *extra, config=process.config_path)
    assert code == 0, out
    report: dict[str, Any] = json.loads(out[out.index("{"):])
    return report


def _held(storage: Path, digest: str) -> bool:
    hex_ = digest.split(":", 1)[1]
    return (storage / "blobs" / "sha256" / hex_[:2] / hex_).is_file()


def _two_platforms(repo: str, tag: str, seed: int) -> Index:
    images = [make_image(repo, tag, fmt="oci", arch=arch,
                         layers=[make_layer(50_000 + k, seed * 10 + k),
                                 make_layer(120_000, seed * 10 + 5 + k)])
              for k, arch in enumerate(["amd64", "arm64"])]
    return make_index(repo, tag, images, "oci")


def _blobs(image: Image) -> list[str]:
    return [image.config.digest, *(layer.digest for layer in image.layers)]


def test_watched_tag_is_warmed_for_its_platform_only_and_the_pull_asks_upstream_nothing(
        registry_anon: Registry, mirrors: Mirrors, tmp_path: Path) -> None:
    repo = "sync/watched"
    registry_anon.push(_two_platforms(repo, "live", seed=7101))
    rule = {"name": "watched", "registry": UPSTREAM, "repositories": [repo], "tags": ["live"],
            "platforms": ["linux/arm64"], "interval": "1h"}
    mirror = mirrors.start(registry_anon.url, sync={"rules": [rule], "recheck": "0s"})

    fresh = _two_platforms(repo, "live", seed=7102)  # a new digest under the watched tag
    registry_anon.push(fresh)
    report = _sync_once(mirror)
    assert report["counts"] in ({"warmed": 1}, {"present": 1}), report
    storage = tmp_path / "cache"
    amd64, arm64 = fresh.children
    assert all(_held(storage, d) for d in _blobs(arm64))
    assert not any(_held(storage, d) for d in _blobs(amd64))

    mark = registry_anon.clear_log_mark()
    conf = write_registries_conf(tmp_path / "registries.conf", UPSTREAM,
                                 mirror.url.removeprefix("http://"))
    out = skopeo_copy(f"{UPSTREAM}/{repo}:live", tmp_path / "pulled", registries_conf=conf,
                      override_arch="arm64", override_os="linux")
    assert manifest_digest(out) == arm64.manifest.digest
    assert registry_anon.count("GET", "/blobs/", since=mark) == 0
    assert registry_anon.count("GET", path_regex=r"/manifests/sha256:", since=mark) == 0


def test_semver_rule_picks_exactly_the_right_tags(registry_anon: Registry,
                                                   tmp_path: Path) -> None:
    repo = "sync/semver"
    for n, tag in enumerate(["1.9", "1.25.3", "1.26.0-rc1", "2.0", "latest", "v1.27"]):
        registry_anon.push(make_image(repo, tag, fmt="oci",
                                      layers=[make_layer(1000 + n, 7200 + n)]))
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": UPSTREAM, "url": registry_anon.url, "default": True}])
    config["sync"] = {"rules": [{"name": "semver", "registry": UPSTREAM, "repositories": [repo],
                                 "tags": [{"semver": ">=1.25 <2"}]}]}
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps(config))
    # No server runs: the command works on the storage folder itself.
    code, out = _mirror_cli("sync", "--once", "--dry-run", "--json", config=path)
    assert code == 0, out
    report = json.loads(out[out.index("{"):])
    assert sorted(r["ref"] for r in report["results"]) == [
        f"{UPSTREAM}/{repo}:1.25.3", f"{UPSTREAM}/{repo}:v1.27"]
    assert all(r["result"] == "planned" and r["missing_blobs"] == 2 for r in report["results"])


def _manifest_get(mirror: MirrorProcess, path: str, source: str) -> None:
    """GET a manifest from the loopback address ``source`` (another client)."""
    connection = http.client.HTTPConnection(mirror.host, mirror.port, timeout=30,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()


def test_popular_keeps_the_two_most_pulled_warm_across_a_tag_change_and_a_restart(
        registry_anon: Registry, mirrors: Mirrors, tmp_path: Path) -> None:
    repos = {"sync/pop-a": 3, "sync/pop-b": 2, "sync/pop-c": 1}
    for n, repo in enumerate(repos):
        registry_anon.push(make_image(repo, "v1", fmt="oci",
                                      layers=[make_layer(30_000, 7300 + n)]))
    sync = {"popular": {"top": 2, "interval": "1h"}, "recheck": "0s"}
    mirror = mirrors.start(registry_anon.url, sync=sync)
    conf = write_registries_conf(tmp_path / "registries.conf", UPSTREAM,
                                 mirror.url.removeprefix("http://"))
    for repo, pulls in repos.items():
        # A client counts once per image (pulls, not requests): pulls come from
        # different machines, here loopback addresses; skopeo pulls from 127.0.0.1.
        skopeo_copy(f"{UPSTREAM}/{repo}:v1", tmp_path / repo.replace("/", "_"),
                    registries_conf=conf)
        for i in range(1, pulls):
            _manifest_get(mirror, f"/v2/{repo}/manifests/v1", f"127.0.0.{10 + i}")
    mirror.stop()  # the counts are saved at shutdown

    fresh = {repo: make_image(repo, "v1", fmt="oci", layers=[make_layer(40_000, 7400 + n)])
             for n, repo in enumerate(repos)}
    for image in fresh.values():
        registry_anon.push(image)
    mirror = mirrors.start(registry_anon.url, sync=sync, workdir="mirror-again")
    code, out = _mirror_cli("sync", "status", "--json", config=mirror.config_path)
    assert code == 0, out
    top = json.loads(out[out.index("{"):])["popular"]["top"]
    assert [t["repository"] for t in top] == list(repos)

    _sync_once(mirror, "--server", mirror.url)
    storage = tmp_path / "cache"
    assert all(_held(storage, d) for d in _blobs(fresh["sync/pop-a"]))
    assert all(_held(storage, d) for d in _blobs(fresh["sync/pop-b"]))
    assert not any(_held(storage, d) for d in _blobs(fresh["sync/pop-c"]))


def test_mirror_warm_reports_failures_with_a_non_zero_exit(
        registry_anon: Registry, mirrors: Mirrors, tmp_path: Path) -> None:
    repo = "sync/warm-cmd"
    index = _two_platforms(repo, "v1", seed=7501)
    registry_anon.push(index)
    mirror = mirrors.start(registry_anon.url, sync={})
    code, out = _mirror_cli("warm", f"{UPSTREAM}/{repo}:v1", f"{UPSTREAM}/{repo}:missing",
                            "--platform", "linux/amd64", config=mirror.config_path)
    assert code == 1, out
    assert f"failed: {UPSTREAM}/{repo}:missing" in out
    assert "1 of 2 image(s) held" in out
    assert all(_held(tmp_path / "cache", d) for d in _blobs(index.children[0]))


def test_a_warm_killed_midway_resumes_after_the_restart_with_what_is_missing(
        registry_anon: Registry, mirrors: Mirrors, tmp_path: Path) -> None:
    repo = "sync/killed"
    image = make_image(repo, "v1", fmt="oci",
                       layers=[make_layer(4 << 20, 7600 + i) for i in range(3)])
    registry_anon.push(image)
    throttle = ThrottledProxy("127.0.0.1", registry_anon.port, 4 << 20)  # 1 s per layer
    throttle.start()
    try:
        sync = {"blob_concurrency": 1, "rules": [
            {"name": "killed", "registry": UPSTREAM, "repositories": [repo], "tags": ["v1"]}]}
        mirror = mirrors.start(throttle.url, sync=sync)
        storage = tmp_path / "cache"
        blobs = _blobs(image)
        deadline = time.monotonic() + 60
        while sum(_held(storage, d) for d in blobs) < 2:  # config and one layer: midway
            assert time.monotonic() < deadline, mirror.log_tail()
            time.sleep(0.05)
        held_before = {d for d in blobs if _held(storage, d)}
        mark = registry_anon.clear_log_mark()
        mirror.kill9()
        assert held_before != set(blobs)

        mirror = mirrors.start(throttle.url, sync=sync, workdir="mirror-restarted")
        report = _sync_once(mirror)  # runs after (or is) the loop's first pass
        assert report["counts"] in ({"warmed": 1}, {"present": 1}), report
        assert all(_held(storage, d) for d in blobs)
        assert not list((storage / "tmp").iterdir())  # nothing half-written left behind
        fetched_again = [d for d in held_before
                         if registry_anon.count("GET", f"/blobs/{d}", since=mark)]
        assert fetched_again == []
    finally:
        throttle.stop()
