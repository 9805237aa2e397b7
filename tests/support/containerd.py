"""A private containerd daemon and its ``ctr`` client, for pulling through the mirror.

containerd is what Kubernetes nodes, k3s and Docker's containerd store pull
with: it resolves tags with HEAD, sends ``?ns=<registry>`` on every request to
a mirror, and verifies every digest as it commits content. The daemon here
runs with its own root, state and socket in a temp folder, with the CRI and
kernel-specific snapshotters disabled, so it needs no system set-up.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

_CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = "{root}/debug.sock"
"""


class Containerd:
    """A containerd daemon in ``workdir``; ``fetch`` pulls content with ``ctr``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "containerd.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(_CONFIG.format(root=self.workdir))
        with (self.workdir / "containerd.log").open("wb") as log:
            self._proc = subprocess.Popen(["containerd", "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not start:\n" + self.log_tail())
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "containerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def hosts_dir(self, registry_host: str, mirror_url: str,
                  headers: dict[str, str] | None = None, name: str = "certs.d") -> Path:
        """A ``hosts.toml`` sending ``registry_host`` to the mirror and nowhere else.

        The registry's own ``server`` is a closed port, so a mirror failure
        fails the pull instead of falling back. ``headers`` go on every request
        to the mirror (``[host."...".header]``: how a node passes credentials
        to a mirror); ``name`` is the folder, for several configurations.
        """
        folder = self.workdir / name
        (folder / registry_host).mkdir(parents=True, exist_ok=True)
        text = ('server = "http://127.0.0.1:1"\n'
                f'[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n')
        if headers:
            text += f'[host."{mirror_url}".header]\n' + "".join(
                f'  {key} = "{value}"\n' for key, value in headers.items())
        (folder / registry_host / "hosts.toml").write_text(text)
        return folder

    def fetch(self, ref: str, hosts_dir: Path, namespace: str = "test",
              all_platforms: bool = True, timeout: float = 120) -> str:
        """``ctr content fetch`` of ``ref``; returns ctr's output.

        Raises:
            RuntimeError: ctr failed (its output is in the message).
        """
        cmd = ["ctr", "--address", str(self.socket), "--namespace", namespace,
               "content", "fetch", "--hosts-dir", str(hosts_dir)]
        if all_platforms:
            cmd.append("--all-platforms")
        closed = "http://127.0.0.1:1"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HTTP_PROXY": closed,
               "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost"}
        proc = subprocess.run([*cmd, ref], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} {ref} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def content_digests(self, namespace: str = "test") -> set[str]:
        """Digests in the content store (each verified by containerd at commit)."""
        proc = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", namespace,
                               "content", "ls", "-q"], capture_output=True, text=True,
                              check=True, timeout=30)
        return {line.strip() for line in proc.stdout.splitlines() if line.strip()}
