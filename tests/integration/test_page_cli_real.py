"""``mirror cache ls``, ``warm`` and ``sync`` lines that tell the truth, with real parts.

The mirror runs as a real process (one and two workers) in front of real
Distribution; the real ``mirror`` commands talk to it or to its storage folder;
skopeo pulls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.images import Index, make_image, make_index, make_layer
from tests.support.mirrorproc import Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"




def _cli(*args: str, config: Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _two_platforms(repo: str, tag: str, seed: int) -> Index:
    images = [make_image(repo, tag, fmt="oci", arch=arch,
                         layers=[make_layer(40_000 + k, seed * 10 + k)])
              for k, arch in enumerate(["amd64", "arm64"])]
    return make_index(repo, tag, images, "oci")


def _image_line(listing: str, ref: str) -> str:
    lines = [line for line in listing.splitlines() if line.strip().startswith(ref + " ")]
    assert len(lines) == 1, listing
    return lines[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_warm_sync_and_cache_ls_say_what_is_held(
        workers: int, registry_anon: Registry, mirrors: Mirrors,
        tmp_path: Path) -> None:
    repo = f"page/warmed{workers}"
    registry_anon.push(_two_platforms(repo, "v1", seed=8100 + workers))
    ref = f"{UPSTREAM}/{repo}:v1"
    rule = {"name": "base", "registry": UPSTREAM, "repositories": [repo], "tags": ["v1"],
            "platforms": ["linux/arm64"], "interval": "1h"}
    mirror = mirrors.start(registry_anon.url, workers, sync={"rules": [rule]})

    code, out, err = _cli("warm", ref, "--platform", "linux/arm64", config=mirror.config_path)
    assert code == 0, out + err
    # The sync loop may have warmed it first: either way the line names the platform.
    assert re.search(rf"(warmed|present): {re.escape(ref)} \[linux/arm64\]", out), out

    code, out, err = _cli("sync", "--once", "--dry-run", config=mirror.config_path)
    assert code == 0, out + err
    line = next(x for x in out.splitlines() if ref in x)
    assert line.startswith("present") and "to fetch" not in line and "[linux/arm64]" in line
    assert "warning" not in err  # the file is the server's config: same rules

    code, out, err = _cli("sync", "status", config=mirror.config_path)
    assert code == 0 and "None" not in out, out

    code, listing, err = _cli("cache", "ls", config=mirror.config_path)
    assert code == 0, err
    row = _image_line(listing, ref)
    assert "complete (1 of 2 platforms)" in row
    pin = re.search(rf"pinned by warm-until:(\d+):{re.escape(ref)} \(until (\S+)\)", row)
    assert pin is not None, row
    assert pin.group(2).startswith(time.strftime("%Y-", time.gmtime(int(pin.group(1)))))
    code, out, err = _cli("cache", "ls", "--json", config=mirror.config_path)
    document = json.loads(out)
    [entry] = [e for e in document["images"][UPSTREAM] if e["reference"] == ref]
    assert entry["pinned"] and entry["state"] == "complete" and entry["platforms"] == [1, 2]


@pytest.mark.parametrize("workers", [1, 2])
def test_dry_run_of_another_file_warns_and_local_plans_from_the_file(
        workers: int, registry_anon: Registry, mirrors: Mirrors,
        tmp_path: Path) -> None:
    repo = f"page/plan{workers}"
    for n, tag in enumerate(("v1", "v2")):
        registry_anon.push(make_image(repo, tag, fmt="oci",
                                      layers=[make_layer(30_000, 8200 + workers * 10 + n)]))
    rule = {"name": "base", "registry": UPSTREAM, "repositories": [repo], "tags": ["v1"],
            "interval": "1h"}
    mirror = mirrors.start(registry_anon.url, workers, sync={"rules": [rule]})
    new = yaml.safe_load(mirror.config_path.read_text())
    new["sync"]["rules"][0]["tags"] = ["v2"]
    new_path = tmp_path / "new.yaml"
    new_path.write_text(yaml.safe_dump(new))

    code, out, err = _cli("sync", "--once", "--dry-run", config=new_path)
    assert code == 0, out + err
    assert "warning: the server at" in err and "differing: base" in err and "--local" in err
    assert f"{repo}:v1" in out and f"{repo}:v2" not in out  # the server's rules ran

    code, out, err = _cli("sync", "--once", "--dry-run", "--local", config=new_path)
    assert code == 0, out + err
    assert f"{repo}:v2" in out and f"{repo}:v1" not in out and "planned" in out
    assert "warning" not in err

    code, out, err = _cli("sync", "--once", "--local", config=new_path)
    assert code == 1 and "--dry-run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_ls_marks_partial_and_evicted_and_keeps_what_was_pulled_after_an_evict(
        workers: int, registry_anon: Registry, mirrors: Mirrors,
        tmp_path: Path) -> None:
    images = [make_image(f"page/ls{workers}-{n}", "v1", fmt="oci",
                         layers=[make_layer(20_000, 8300 + workers * 10 + n),
                                 make_layer(50_000, 8350 + workers * 10 + n)])
              for n in range(3)]
    for image in images:
        registry_anon.push(image)
    mirror = mirrors.start(registry_anon.url, workers)
    host = f"127.0.0.1:{mirror.port}"
    for n, image in enumerate(images):
        out = skopeo_copy(f"{host}/{image.repo}:v1", tmp_path / f"pull-{n}")
        assert manifest_digest(out) == image.manifest.digest
    refs = [f"{UPSTREAM}/{image.repo}:v1" for image in images]
    partial, evicted, again = images
    config = mirror.config_path

    # A digest alone, though a cached image uses it (--shared): what LRU eviction does.
    assert _cli("cache", "evict", partial.layers[1].digest, "--shared", config=config)[0] == 0
    assert _cli("cache", "evict", evicted.manifest.digest, "--shared", config=config)[0] == 0
    code, listing, err = _cli("cache", "ls", config=config)
    assert code == 0, err
    assert "partial: 1 blob(s) missing" in _image_line(listing, refs[0])
    assert "evicted: manifest gone" in _image_line(listing, refs[1])
    assert re.search(r"\scomplete$", _image_line(listing, refs[2]))

    # Evict an image, pull it again at once: it is listed and can be pinned, no restart.
    assert _cli("cache", "evict", refs[2], config=config)[0] == 0
    out = skopeo_copy(f"{host}/{again.repo}:v1", tmp_path / "pull-again")
    assert manifest_digest(out) == again.manifest.digest
    _wait_listed(config, refs[2])
    code, out, err = _cli("cache", "pin", refs[2], config=config)
    assert code == 0, out + err
    code, listing, err = _cli("cache", "ls", config=config)
    row = _image_line(listing, refs[2])
    assert re.search(r"\scomplete\s+pinned by ", row) and f"pinned by {refs[2]}" in row


def _wait_listed(config: Path, ref: str) -> None:
    """Until ``cache ls`` lists ``ref`` as complete (the server notices an eviction made
    by another process within its refresh interval, 10 s): a state, not a time."""
    deadline = time.monotonic() + 30
    listing = ""
    while time.monotonic() < deadline:
        _code, listing, _err = _cli("cache", "ls", config=config)
        if any(line.strip().startswith(ref + " ") and "complete" in line
               for line in listing.splitlines()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{ref} never listed as complete:\n{listing}")

