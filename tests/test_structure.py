"""The package's shape: no import circle (module-level and function-level imports alike), no file
over 500 lines (``cli.py`` 300, ``train.py`` 450)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rargen"


def rargen_imports(path: Path) -> set[str]:
    """The rargen modules a file imports anywhere in it (``rargen`` itself is ``__init__``)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` never run (annotations only), so they cannot make a circle.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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


# The command line and the training loop stay short enough to read in one sitting.
LINE_LIMITS = {"cli.py": 300, "train.py": 450}


def test_no_file_over_500_lines() -> None:
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > LINE_LIMITS.get(name, 500)} == {}


def test_readme_layout_names_every_module() -> None:
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:src/rargen/)?(\w+\.py)`", layout))
    assert sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in named) == []
    assert sorted(name for name in named if not (PACKAGE / name).is_file()) == []


ARRAY_TYPES = re.compile(r"\b(Tensor|ndarray|GaussianStats|FeatureStats)\b")


def test_no_dataclass_compares_tensors_or_arrays() -> None:
    """Generated equality of a dataclass holding a tensor or array raises ("Boolean value of Tensor
    ... is ambiguous") the first time two equal instances meet in ``in`` or ``list.remove``: the
    server's decoding thread died of it (issue 25). Such dataclasses compare by identity."""
    import dataclasses
    import importlib

    comparing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":  # running it is the command line
            continue
        module = importlib.import_module(
            ".".join(("rargen", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        )
        for name, value in vars(module).items():
            if not (dataclasses.is_dataclass(value) and isinstance(value, type)):
                continue
            if value.__module__ != module.__name__ or not value.__dataclass_params__.eq:
                continue
            if any(ARRAY_TYPES.search(str(field.type)) for field in dataclasses.fields(value)):
                comparing.append(f"{module.__name__}.{name}")
    assert comparing == []
