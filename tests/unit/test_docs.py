"""The docs stand alone in a fresh clone, and the deployment files are valid.

Every relative link in the READMEs, CHANGELOG and docs/ must name a file inside
the repository (and a heading that exists, when it has an anchor). The
systemd unit passes ``systemd-analyze verify``; the image's baked-in config
passes ``mirror config check``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "helm" / "mirror" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    anchors = set()
    for heading in _HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _dead_links(path: Path) -> list[str]:
    dead = []
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            dead.append(f"{target} (no such file in the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            dead.append(f"{target} (no such heading)")
    return dead


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_links_point_inside_the_repository(path: Path) -> None:
    assert path.exists()
    assert _dead_links(path) == []


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    # The unit names /opt/mirror; verify it against this checkout's own command.
    mirror = Path(sys.executable).parent / "mirror"
    unit = (ROOT / "config" / "mirror.service").read_text()
    (tmp_path / "mirror.service").write_text(unit.replace("/opt/mirror/bin/mirror", str(mirror)))
    proc = subprocess.run([analyze, "verify", str(tmp_path / "mirror.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_the_images_default_config_is_valid() -> None:
    proc = subprocess.run([sys.executable, "-m", "mirror", "config", "check",
                           str(ROOT / "config" / "mirror.container.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "upstreams: docker.io (default)" in proc.stdout
