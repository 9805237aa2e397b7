"""Imports point one way: each box of the data flow imports only the boxes below it.

server -> node -> sync -> pull service -> cache -> fetch -> sources -> storage -> upstream
-> log -> audit -> policy -> config
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
    "audit": 14,
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


#: Boxes that reach upstream only through the typed registry API of ``mirror.sources``
#: (:class:`mirror.sources.upstream.UpstreamSource`): none sees an HTTP response.
ABOVE_SOURCES = {box for box, rank in RANKS.items() if rank > RANKS["sources"]}
#: What only ``sources/`` and ``upstream/`` may use: the response type, and the helpers
#: that read one.
RESPONSE_NAMES = {"ClientResponse", "check_status", "read_limited", "fetch_manifest"}


def _response_reads(tree: ast.AST) -> list[str]:
    """Reads of a response: ``.status`` of what ``async with <x>.request(...) as r`` bound,
    and any use of the names only the sources seam may use."""
    found = []
    responses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncWith):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr == "request" \
                        and isinstance(item.optional_vars, ast.Name):
                    responses.add(item.optional_vars.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "status" \
                and isinstance(node.value, ast.Name) and node.value.id in responses:
            found.append(f"reads {node.value.id}.status (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr in RESPONSE_NAMES:
            found.append(f"uses {node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Name) and node.id in RESPONSE_NAMES:
            found.append(f"uses {node.id} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom):
            found.extend(f"imports {a.name} (line {node.lineno})" for a in node.names
                         if a.name in RESPONSE_NAMES)
    return found


def test_nothing_above_the_sources_sees_an_upstream_response() -> None:
    leaks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "mirror." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if _box(module.removesuffix(".__init__")) not in ABOVE_SOURCES:
            continue
        leaks.extend(f"{module} {leak}" for leak in _response_reads(ast.parse(path.read_text())))
    assert leaks == []


def test_the_response_check_sees_what_it_looks_for() -> None:
    """The check itself: it finds a status read and a response import."""
    code = ("from aiohttp import ClientResponse\n"
            "async def f(client):\n"
            "    async with client.request('HEAD', 'r', 's') as resp:\n"
            "        return resp.status\n")
    assert sorted(_response_reads(ast.parse(code))) == ["imports ClientResponse (line 1)",
                                                        "reads resp.status (line 4)"]


#: Boxes a box must not import although they rank below it: ``server/`` renders what the
#: pull service answers, through the types the pull service exports.
FORBIDDEN = {"server": ("fetch", "storage", "upstream")}


def test_server_reaches_content_through_the_pull_service_only() -> None:
    reaching = []
    for box, others in FORBIDDEN.items():
        for path in sorted((PACKAGE / box).rglob("*.py")):
            module = "mirror." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
            reaching += [f"{module} imports {target}" for target in _imports(path)
                         if _box(target) in others]
    assert reaching == []
