"""Imports point one way: each box of the data flow imports only the boxes below it.

server -> node -> sync -> pull service -> cache -> fetch -> sources -> storage -> upstream
-> policy -> config
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mirror"

#: Higher imports lower, never the other way. Modules not named share their package's rank.
RANKS = {
    "cli": 100, "__main__": 100, "sync_cli": 100, "launch": 100, "admin_client": 100,
    "server": 90,
    "node": 80,
    "sync": 75,
    "bundle": 75,
    "pull": 70,
    "cache": 60,
    "fetch": 50,
    "sources": 40,
    "cluster": 35,
    "storage": 30,
    "routing": 25,
    "upstream": 20,
    "log": 15,
    "policy": 11,
    "config": 10,
    "errors": 0, "oci": 0, "metrics": 0, "clock": 0, "tasks": 1, "version": 0,
    "worker": 0,
}


def _box(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mirror"):
            found.add(node.module)
            if node.module == "mirror":
                found.update(f"mirror.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mirror"))
    return found


def test_every_import_points_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "mirror." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        box = _box(module.removesuffix(".__init__"))
        if box == "__init__":
            continue
        for target in _imports(path):
            other = _box(target)
            if other and other != box and RANKS[other] > RANKS[box]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_every_box_has_a_rank() -> None:
    boxes = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or p.is_dir()) and p.name not in ("__init__.py", "__pycache__")}
    assert boxes <= set(RANKS)
