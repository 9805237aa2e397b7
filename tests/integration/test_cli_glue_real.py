"""`mirror sync status` without a server says what the server said (issue 24 item 4): a
real mirror process (one worker and two) in front of real Distribution, pulled by
skopeo, driven by the real `mirror sync` command through the admin-API client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, write_registries_conf

pytestmark = pytest.mark.integration

UPSTREAM = "registry.test"


def _status(config: Path, *server: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "mirror", "sync", "status", "--json",
                           "--config", str(config), *server],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


def _sync_once(config: Path, server: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mirror", "sync", "--once", "--config",
                           str(config), "--server", server],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _what_both_know(status: dict[str, Any]) -> dict[str, Any]:
    """The status without what only a running loop knows (next runs, pauses)."""
    return {"enabled": status["enabled"], "last_run": status["last_run"],
            "rules": [{k: v for k, v in r.items() if k != "next_run"} for r in status["rules"]],
            "records": [{k: v for k, v in r.items() if k != "next_run"}
                        for r in status["records"]]}


def _window_far_from_now() -> str:
    start = time.gmtime(time.time() + 12 * 3600)
    return f"{start.tm_hour:02d}:00-{start.tm_hour:02d}:30"


@pytest.mark.parametrize("workers", [1, 2])
def test_sync_status_without_a_server_is_what_the_server_answered(
        registry_anon: Registry, tmp_path: Path, workers: int) -> None:
    repo = f"glue/app{workers}"
    registry_anon.push(make_image(repo, "v1", fmt="oci",
                                  layers=[make_layer(20_000, 8100 + workers)]))
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": UPSTREAM, "url": registry_anon.url, "default": True}])
    config["server"] = {"workers": workers}
    config["sync"] = {"rules": [{"name": "apps", "registry": UPSTREAM, "repositories": [repo],
                                 "tags": ["v1"], "interval": "1h"}],
                      "popular": {"top": 2, "interval": "1h"}, "recheck": "0s",
                      # the scheduled loop waits (half a day away): only --once runs
                      "off_peak": [_window_far_from_now()]}
    mirror = MirrorProcess(tmp_path / "mirror", config)
    mirror.start()
    try:
        conf = write_registries_conf(tmp_path / "registries.conf", UPSTREAM,
                                     mirror.url.removeprefix("http://"))
        skopeo_copy(f"{UPSTREAM}/{repo}:v1", tmp_path / "pulled", registries_conf=conf)
        _sync_once(mirror.config_path, mirror.url)  # POST /admin/sync, the local token
        online = _status(mirror.config_path, "--server", mirror.url)
    finally:
        mirror.stop()  # every worker saves its counts and records
    offline = _status(mirror.config_path)  # nothing answers: read from the folder

    assert offline["source"] == str(tmp_path / "cache" / "sync")
    assert "source" not in online
    assert [r["name"] for r in offline["rules"]] == ["apps", "popular"]
    assert [r["ref"] for r in offline["records"]] == [f"{UPSTREAM}/{repo}:v1"]
    assert _what_both_know(offline) == _what_both_know(online)
    # the pull counted by whichever worker answered it, read from its own file
    assert [(t["repository"], t["tag"]) for t in offline["popular"]["top"]] == [(repo, "v1")]
