"""What the README says of a mirror on plain HTTP (as ``bash scripts/run.sh`` serves it),
checked with the real skopeo (podman reads registries.conf through the same library):
refused without ``insecure = true`` (or ``--tls-verify=false``), even on 127.0.0.1, and
a complete, digest-checked pull with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.images import Image, Index, sha256_digest
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.skopeo import write_registries_conf

pytestmark = pytest.mark.integration

PREFIX = "registry.test"


def _inspect(ref: str, conf: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``skopeo inspect --raw docker://REF`` with a clean HOME and no proxy."""
    binary = shutil.which("skopeo")
    if binary is None:
        pytest.skip("skopeo is not installed (scripts/setup.sh --test installs it)")
    with tempfile.TemporaryDirectory(prefix="skopeo-home-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "XDG_RUNTIME_DIR": home, "XDG_CONFIG_HOME": home,
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        return subprocess.run([binary, "--registries-conf", str(conf), "inspect", "--raw",
                               *flags, f"docker://{ref}"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_plain_http_needs_insecure_per_client_as_the_readme_says(
        tmp_path: Path, workers: int, registry_anon: Registry,
        std_images: list[Image | Index]) -> None:
    item = std_images[0]
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": PREFIX, "url": registry_anon.url, "default": True}])
    config["server"] = {"workers": workers}
    with MirrorProcess(tmp_path / "run", config) as mirror:
        mirror_host = f"127.0.0.1:{mirror.port}"
        ref = f"{item.repo}:{item.tag}"
        # registries.conf's mirror entry (podman, CRI-O, skopeo): refused without insecure
        strict = write_registries_conf(tmp_path / "strict.conf", PREFIX, mirror_host,
                                       insecure=False)
        refused = _inspect(f"{PREFIX}/{ref}", strict)
        assert refused.returncode != 0
        assert "HTTP response to HTTPS client" in refused.stderr
        relaxed = write_registries_conf(tmp_path / "insecure.conf", PREFIX, mirror_host)
        pulled = _inspect(f"{PREFIX}/{ref}", relaxed)
        assert pulled.returncode == 0, pulled.stderr
        assert sha256_digest(pulled.stdout.encode()) == item.manifest.digest

        # skopeo straight at the mirror: --tls-verify=false
        empty = tmp_path / "empty.conf"
        empty.write_text("unqualified-search-registries = []\n")
        assert _inspect(f"{mirror_host}/{ref}", empty).returncode != 0
        direct = _inspect(f"{mirror_host}/{ref}", empty, "--tls-verify=false")
        assert direct.returncode == 0, direct.stderr
        assert sha256_digest(direct.stdout.encode()) == item.manifest.digest
