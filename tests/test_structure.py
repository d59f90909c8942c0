"""The package's shape: no import circle (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rargen"


def rargen_imports(path: Path) -> set[str]:
    """The rargen modules a file imports anywhere in it (``rargen`` itself is ``__init__``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "rargen":  # from rargen import x: a submodule, or a name of __init__
                names = [
                    f"rargen.{a.name}" if (PACKAGE / f"{a.name}.py").exists() else "rargen"
                    for a in node.names
                ]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rargen":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - {path.stem}


def test_no_import_circle() -> None:
    graph = {path.stem: rargen_imports(path) for path in PACKAGE.glob("*.py")}
    assert "convert" in graph["checkpoint"] and "weight_files" in graph["convert"]  # the walk sees them
    circles = []
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
