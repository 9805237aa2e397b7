"""Pull images with the real podman (Debian's), hermetically, as root with vfs storage.

Every run has its own storage root and run root in a temp folder (``vfs``
needs no kernel overlay support), a clean HOME, an empty registries.conf,
and proxies pointing at a closed port, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.net import free_port


class PodmanError(RuntimeError):
    """podman exited non-zero; the message holds its command line and stderr."""


def podman_binary() -> str | None:
    """podman, if installed."""
    return shutil.which("podman")


def podman_pull(ref: str, workdir: Path, *, authfile: Path | None = None,
                creds: tuple[str, str] | None = None, timeout: float = 120) -> str:
    """``podman pull`` over plain HTTP; returns the pulled image's manifest digest.

    Raises:
        PodmanError: podman failed or timed out.
    """
    binary = podman_binary()
    if binary is None:
        raise PodmanError("podman is not on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pm-", dir="/tmp") as short:  # runroot: < 50 chars
        return _pull(binary, ref, workdir, Path(short), authfile=authfile, creds=creds,
                     timeout=timeout)


def _pull(binary: str, ref: str, workdir: Path, short: Path, *, authfile: Path | None,
          creds: tuple[str, str] | None, timeout: float) -> str:
    conf = workdir / "registries.conf"
    empty = workdir / "no-auth.json"  # the default auth file: holds nothing
    empty.write_text('{"auths": {}}')
    conf.write_text("unqualified-search-registries = []\n")
    base = [binary, "--root", str(short / "root"), "--runroot", str(short / "run"),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "none"]
    pull = [*base, "pull", "--quiet", "--tls-verify=false"]
    if authfile is not None:
        pull += ["--authfile", str(authfile)]
    if creds is not None:
        pull += ["--creds", ":".join(creds)]
    closed = f"http://127.0.0.1:{free_port()}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(workdir),
           "XDG_RUNTIME_DIR": str(short / "run"), "XDG_CONFIG_HOME": str(workdir),
           "CONTAINERS_REGISTRIES_CONF": str(conf), "REGISTRY_AUTH_FILE": str(empty),
           "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "http_proxy": closed,
           "https_proxy": closed, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    _run([*pull, ref], env, timeout)
    return _run([*base, "image", "inspect", "--format", "{{.Digest}}", ref], env, timeout).strip()


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise PodmanError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise PodmanError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout
