"""The package's shape (issue 26): the core flat at the top, one folder per task wing; no import
circle, no file over 500 lines, the command line short, one home for every name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rargen"
WINGS = ("cli", "data", "demo", "evaluation", "hub", "sampling", "serve", "tokenizers", "train")


def module_name(path: Path) -> str:
    """``rargen.sampling.engine`` for src/rargen/sampling/engine.py; a package is its folder's name."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def typing_only_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: they never run (annotations only), so make no circle."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }


def rargen_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The rargen modules a file imports anywhere in it (``from rargen.x import y``: ``rargen.x.y``
    when that is a module, else ``rargen.x``)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = typing_only_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        found.update(name for name in names if name.split(".")[0] == "rargen")
    return found - {module_name(path)}


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: rargen_imports(path, known) for name, path in known.items()}
    assert "rargen.convert" in graph["rargen.checkpoint"]  # the walk sees them
    assert "rargen.sampling.next_token" in graph["rargen.sampling.speculative"]
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


# The training loop stays short enough to read in one sitting; the model holds all of its arithmetic
# (training, prefill, decoding, attention over the cache) in one file.
LINE_LIMITS = {"train/generator.py": 450, "model.py": 520}


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_file_over_500_lines() -> None:
    lengths = {str(p.relative_to(PACKAGE)): lines(p) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > LINE_LIMITS.get(name, 500)} == {}


def test_the_command_line_is_short() -> None:
    """Its flags come from the configs and the functions the commands call (``rargen.cli.flags``),
    so the command line holds the commands' own arguments and runners only."""
    assert sum(lines(p) for p in (PACKAGE / "cli").glob("*.py")) < 700


def test_the_core_is_flat_and_every_other_module_is_in_a_wing() -> None:
    """A newcomer finds where a new tokenizer, sampling rule, metric or command goes from the folder
    names alone: the core (model, cache, orders, checkpoints, conversion) at the top, wings below."""
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(WINGS)
    core = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert core == sorted(
        ["__init__", "__main__", "checkpoint", "convert", "distributed", "kv_cache", "model", "orders"]
        + ["progress", "resize", "version", "weight_files"]
    )


def test_no_module_re_exports_another_modules_names() -> None:
    """One name, one home: a name imported from another rargen module is used where it is imported,
    never passed on (unused, or in ``__all__``). Only the package's public ``__init__`` passes names on."""
    passed_on = []
    for name, path in modules().items():
        if path.name == "__init__.py":
            assert name == "rargen" or path.read_text(encoding="utf-8").count("import") == 0, name
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.asname or alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rargen")
            for alias in node.names
        }
        exported: set[str] = set()
        used: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                exported |= {elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)}
            elif isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # string annotations
                used.update(re.findall(r"\w+", node.value))
        for imported_name in sorted(imported):
            if imported_name in exported or imported_name not in used:
                passed_on.append(f"{name}: {imported_name}")
    assert passed_on == [], passed_on


def test_every_name_is_imported_from_its_home() -> None:
    """``from rargen.a import n`` where ``a`` only imported ``n`` from ``rargen.b`` gives ``n`` two
    homes; every import names the module that defines it (the public ``rargen`` aside)."""
    known = modules()
    defined: dict[str, set[str]] = {}
    for name, path in known.items():
        names = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        defined[name] = names
    roots = [PACKAGE.parents[1] / d for d in ("src", "tests", "benchmarks", "examples")]
    borrowed = []
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module in known and node.module != "rargen"):
                continue
            for alias in node.names:
                if f"{node.module}.{alias.name}" not in known and alias.name not in defined[node.module]:
                    borrowed.append(f"{path.name}: {alias.name} from {node.module}")
    assert borrowed == [], borrowed


def test_readme_layout_has_one_row_per_wing() -> None:
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in layout.splitlines() if line.startswith("| `")]
    named_wings = {m for row in rows for m in re.findall(r"`src/rargen/(\w+)/`", row)}
    assert named_wings == set(WINGS)
    core = set(re.findall(r"`(?:src/rargen/)?(\w+)\.py`", layout))
    assert sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in core) == []
    assert len(rows) == len(WINGS) + 4  # one row per wing, four for the core


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
