"""The modules of mirror/config import each other without a circle.

Every import counts, ``if TYPE_CHECKING:`` ones too: a circle there is still a circle a
reader must hold in their head. ``python tests/unit/test_config_imports.py`` prints the
graph, lowest module first.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "mirror" / "config"
PACKAGE = "mirror.config"


def _module(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _targets(node: ast.AST, modules: set[str]) -> set[str]:
    """The config modules one import statement reads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if not isinstance(node, ast.ImportFrom) or node.module is None:
        return set()
    if node.module == PACKAGE:  # `from mirror.config import cpus` or `... import Settings`
        return {f"{PACKAGE}.{a.name}" if f"{PACKAGE}.{a.name}" in modules else PACKAGE
                for a in node.names}
    return {node.module} if node.module in modules else set()


def import_graph() -> dict[str, set[str]]:
    """Each module of mirror/config -> the modules of mirror/config it imports."""
    paths = sorted(CONFIG.glob("*.py"))
    modules = {_module(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found |= _targets(node, modules)
        graph[name] = found - {name}
    return graph


def test_config_imports_have_no_circle() -> None:
    graph = import_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle in mirror/config: {' -> '.join(exc.args[1])}") \
            from None
    assert set(order) == set(graph)


def test_the_graph_sees_the_imports() -> None:
    graph = import_graph()  # a checker that sees nothing finds no circle either
    assert "mirror.config.values" in graph["mirror.config.sections"]
    assert "mirror.config.secret" in graph["mirror.config.settings"]
    assert "mirror.config.cpus" in graph["mirror.config.settings"]
    assert graph["mirror.config.secret"] == set()


if __name__ == "__main__":
    for module in TopologicalSorter(import_graph()).static_order():
        print(module, "->", ", ".join(sorted(import_graph()[module])) or "-")
