"""A private Docker daemon (Debian ``docker.io``) and a base image made without a registry.

No container registry is reachable from the test machines, so ``FROM
python:3.11-slim`` cannot be pulled. The base image is made instead:
``debootstrap --variant=minbase`` writes a Debian bookworm root with python3
and venv, which is pruned and kept as a tar in a cache folder, so only the
first run on a machine pays for it (about 40 s); every run imports the tar
into its own daemon with ``docker import``.

The daemon runs with its own data-root, exec-root, pidfile, socket and
``daemon.json`` in a temp folder, the ``vfs`` storage driver (no kernel
overlay needed), no iptables rules and no bridge: containers use the host's
network. Its data-root is a tmpfs where one can be mounted: vfs copies the
whole root filesystem for every layer and container, and deleting those
copies from a disk took two minutes on a loaded 2-core machine, where
unmounting a tmpfs takes none. Everything is removed when it stops.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SUITE = "bookworm"
_PACKAGES = "python3,python3-venv"
# Parts of the debootstrapped root that an image never needs: downloaded
# packages, package lists, docs, man pages and translations.
_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
          "usr/share/locale", "usr/share/info")


class DockerError(RuntimeError):
    """A docker command failed; the message holds the command and its output."""


def debian_mirror() -> str:
    """The Debian archive URI this machine's apt uses (deb822 or one-line sources)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        match = re.search(r"^URIs:\s*(\S+)", deb822.read_text(), re.MULTILINE)
        if match:
            return match[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        match = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+\s", legacy.read_text(),
                          re.MULTILINE)
        if match and "security" not in match[1]:
            return match[1]
    return "http://deb.debian.org/debian"


def base_rootfs_tar(cache_dir: Path) -> Path:
    """A tar of a minimal Debian root with python3 and venv, made once and cached.

    Args:
        cache_dir: a folder kept between runs (made if missing).

    Returns:
        The tar file (``docker import`` reads it).

    Raises:
        RuntimeError: debootstrap failed (its log tail is in the message).
    """
    key = hashlib.sha256(f"{SUITE} minbase {_PACKAGES} {_PRUNE}".encode()).hexdigest()[:12]
    tar = cache_dir / f"debian-{SUITE}-python3-{key}.tar"
    if tar.exists():
        return tar
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir))
    try:
        root = work / "root"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={_PACKAGES}", SUITE, str(root),
             debian_mirror()], capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise RuntimeError(f"debootstrap failed ({proc.returncode}):\n{tail}")
        for part in _PRUNE:
            shutil.rmtree(root / part, ignore_errors=True)
        partial = work / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True,
                       timeout=300)
        os.replace(partial, tar)  # only a complete tar ever has the cached name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def _docker_client() -> str:
    # Prefer the client of Debian's docker.io: it matches the daemon's API.
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if found is None:
        raise DockerError("no docker client on PATH (Debian package: docker.io)")
    return found


class Dockerd:
    """``dockerd`` with everything of its own under a temp folder; stopped by PID."""

    def __init__(self, tmpfs_size: str = "8g", daemon_config: dict[str, Any] | None = None
                 ) -> None:
        # A short path: the socket paths under it must stay below 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dkr-", dir="/tmp"))
        self.tmpfs_size = tmpfs_size
        self.daemon_config = daemon_config or {}  # e.g. registry-mirrors, insecure-registries
        self.socket = self.root / "docker.sock"
        self.log_path = self.root / "dockerd.log"
        self._client = _docker_client()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and wait until it answers ``docker version``.

        Raises:
            DockerError: it exited or did not answer in time (log tail attached).
        """
        config = self.root / "daemon.json"
        # never the machine's /etc/docker/daemon.json
        config.write_text(json.dumps(self.daemon_config) + "\n")
        data = self.root / "data"
        data.mkdir()
        # Pages are used only as files are written; without a tmpfs, the disk serves.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size},mode=0710",
                        "tmpfs", str(data)], capture_output=True, check=False, timeout=30)
        cmd = ["dockerd", "--config-file", str(config),
               "--data-root", str(data), "--exec-root", str(self.root / "exec"),
               "--pidfile", str(self.root / "docker.pid"), "--host", f"unix://{self.socket}",
               "--storage-driver", "vfs", "--iptables=false", "--ip-masq=false",
               "--bridge", "none", "--userland-proxy=false", "--log-level", "warn"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise DockerError(f"dockerd exited ({self._proc.returncode}):\n{self.log_tail()}")
            if self.socket.exists() and self.run("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DockerError(f"dockerd did not answer in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Remove every container, stop the daemon (by PID) and delete its folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            ids = self.run("ps", "-aq", check=False).stdout.split()
            if ids:
                self.run("rm", "-f", *ids, check=False, timeout=60)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._unmount_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _unmount_leftovers(self) -> None:
        # The data-root tmpfs, and what dockerd leaves: the nsfs mount of its default
        # network namespace (and, if killed, its data-root bind mount). Deepest first.
        prefix = f"{self.root}/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)

    def env(self) -> dict[str, str]:
        """The environment for the docker client: this daemon, its built-in BuildKit.

        BuildKit, not the classic builder: on vfs the classic builder copies the
        whole root filesystem for every instruction, even ENV or LABEL (141 s
        against 29 s for the mirror's image on the 2-core test machine).
        """
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root),
                "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.root / "cli"),
                "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"}

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            stdin: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this daemon.

        Args:
            args: the docker command line after ``docker``.
            check: raise DockerError on a non-zero exit.
            timeout: seconds before the client is killed.
            stdin: a file fed to the client's standard input (``docker import -``).

        Raises:
            DockerError: it failed and ``check`` is set.
        """
        with (stdin.open("rb") if stdin else open(os.devnull, "rb")) as feed:
            proc = subprocess.run([self._client, *args], env=self.env(), stdin=feed,
                                  capture_output=True, timeout=timeout, check=False)
        result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                             proc.stdout.decode(errors="replace"),
                                             proc.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} failed ({result.returncode}):\n"
                              f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of dockerd's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
