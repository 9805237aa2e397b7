"""Pull images with the real skopeo client and verify every byte it got.

skopeo copies to a ``dir:`` destination (not ``oci:``, which would convert
Docker schema2 manifests and change their digests). Every run is hermetic: a
clean HOME, an explicit ``--registries-conf`` (skopeo 1.9.3 ignores
CONTAINERS_REGISTRIES_CONF), and HTTP(S)_PROXY pointing at a closed loopback
port so that any attempt to reach beyond 127.0.0.1 fails instead of leaking
to the internet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.net import free_port

_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHILD_MANIFEST = re.compile(r"^([0-9a-f]{64})\.manifest\.json$")


class SkopeoError(RuntimeError):
    """skopeo exited non-zero; the message holds its command line and stderr."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_registries_conf(
    path: Path, prefix: str, mirror_location: str, insecure: bool = True
) -> Path:
    """Write a registries.conf that sends ``prefix`` to a mirror and nowhere else.

    The primary ``location`` is a closed loopback port: when the mirror fails,
    containers/image falls back to the primary, and that fallback must fail
    too rather than succeed or reach the internet.

    Args:
        path: file to write.
        prefix: the registry prefix clients use, e.g. ``"registry.test"``.
        mirror_location: ``"127.0.0.1:PORT"`` or ``"127.0.0.1:PORT/some/prefix"``;
            it replaces ``prefix`` textually in every reference.
        insecure: talk plain HTTP to the mirror.

    Returns:
        ``path``.
    """
    flag = "true" if insecure else "false"
    path.write_text(
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        f'prefix = "{prefix}"\n'
        f'location = "127.0.0.1:{free_port()}"\n'
        "insecure = true\n\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror_location}"\n'
        f"insecure = {flag}\n"
    )
    return path


def skopeo_copy(
    src_ref: str,
    dest_dir: Path,
    *,
    registries_conf: Path | None = None,
    all_platforms: bool = False,
    override_arch: str | None = None,
    override_os: str | None = None,
    src_creds: tuple[str, str] | None = None,
    src_authfile: Path | None = None,
    timeout: float = 120,
) -> Path:
    """Run ``skopeo copy docker://SRC dir:DEST`` hermetically.

    Args:
        src_ref: reference without transport, e.g. ``"127.0.0.1:5000/std/app:v1"``.
        dest_dir: destination folder (created by skopeo).
        registries_conf: registries.conf to use; an empty one if None.
        all_platforms: copy every platform of an index (``--all``).
        override_arch: ``--override-arch`` for picking a platform.
        override_os: ``--override-os`` for picking a platform.
        src_creds: ``(user, password)`` for ``--src-creds``.
        src_authfile: an ``auth.json`` (as ``podman login`` writes it) for
            ``--src-authfile``.
        timeout: seconds before the process is killed.

    Returns:
        ``dest_dir``.

    Raises:
        SkopeoError: if skopeo fails or times out.
    """
    binary = shutil.which("skopeo")
    if binary is None:
        raise SkopeoError("skopeo is not on PATH")
    closed = f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="skopeo-home-") as home:
        conf = registries_conf
        if conf is None:
            conf = Path(home) / "registries.conf"
            conf.write_text("unqualified-search-registries = []\n")
        cmd = [
            binary,
            "--insecure-policy",
            "--registries-conf",
            str(conf),
            "copy",
            "--src-tls-verify=false",
        ]
        if all_platforms:
            cmd.append("--all")
        if src_creds is not None:
            cmd += ["--src-creds", ":".join(src_creds)]
        if src_authfile is not None:
            cmd += ["--src-authfile", str(src_authfile)]
        global_flags = []
        if override_arch:
            global_flags += ["--override-arch", override_arch]
        if override_os:
            global_flags += ["--override-os", override_os]
        cmd[1:1] = global_flags
        cmd += [f"docker://{src_ref}", f"dir:{dest_dir}"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_RUNTIME_DIR": home,
            "XDG_CONFIG_HOME": home,
            "HTTP_PROXY": closed,
            "HTTPS_PROXY": closed,
            "http_proxy": closed,
            "https_proxy": closed,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SkopeoError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise SkopeoError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return dest_dir


def verify_dir(dest_dir: Path) -> dict[str, int]:
    """Check that every blob in a ``dir:`` layout hashes to its file name.

    Args:
        dest_dir: a folder written by ``skopeo_copy``.

    Returns:
        ``{"sha256:<hex>": size}`` for every blob file (configs and layers).

    Raises:
        AssertionError: on the first blob whose content does not match its name.
    """
    blobs: dict[str, int] = {}
    for path in sorted(dest_dir.iterdir()):
        if _HEX.match(path.name):
            actual = _sha256_file(path)
            assert actual == path.name, f"{path}: content hashes to sha256:{actual}"
            blobs[f"sha256:{path.name}"] = path.stat().st_size
    return blobs


def manifest_digest(dest_dir: Path) -> str:
    """Return ``"sha256:<hex>"`` of the top-level ``manifest.json`` skopeo stored."""
    return "sha256:" + _sha256_file(dest_dir / "manifest.json")


def child_manifests(dest_dir: Path) -> dict[str, int]:
    """Check and return the per-platform manifests stored by ``--all`` copies.

    skopeo stores them as ``<hex>.manifest.json``; each must hash to its name.

    Returns:
        ``{"sha256:<hex>": size}``.

    Raises:
        AssertionError: if a manifest does not match its name.
    """
    found: dict[str, int] = {}
    for path in sorted(dest_dir.iterdir()):
        match = _CHILD_MANIFEST.match(path.name)
        if match:
            actual = _sha256_file(path)
            assert actual == match[1], f"{path}: content hashes to sha256:{actual}"
            found[f"sha256:{actual}"] = path.stat().st_size
    return found


def write_auth_json(path: Path, host: str, user: str, password: str) -> Path:
    """An ``auth.json`` holding credentials for ``host``, as ``podman login`` writes it."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path
