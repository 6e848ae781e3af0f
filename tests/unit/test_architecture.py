"""The package layering of docs/architecture.md holds: no module imports a package that the table does not
allow (imports inside functions and under TYPE_CHECKING count too), and no modules import each other in a
circle."""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megalign"

# package -> the megalign packages it may import (docs/architecture.md, "Packages, bottom to top")
ALLOWED: Dict[str, Set[str]] = {
    "errors": set(),
    "utils": {"errors"},
    "config": {"errors", "utils"},
    "ops": {"config", "errors"},
    "data": {"config", "errors", "utils", "_helpers"},
    "parallel": {"config", "ops", "errors"},
    "checkpoint": {"config", "parallel", "errors", "utils"},
    "model": {"config", "ops", "parallel", "errors"},
    "inference": {"checkpoint", "model", "parallel", "ops", "data", "config", "errors", "utils"},
    "align": {"inference", "data", "config", "errors", "utils"},
    "training": {"checkpoint", "model", "parallel", "data", "config", "ops", "errors", "utils"},
    "convert": {"checkpoint", "model", "data", "config", "errors", "utils"},
    "demo": {"align", "cli", "data", "errors", "inference", "utils", "config", "checkpoint", "model", "training",
             "convert"},
    "cli": {"errors"},
    "__init__": set(),
}


@functools.lru_cache(maxsize=1)
def _modules() -> Dict[str, Path]:
    """``{dotted module name: path}`` of every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> List[str]:
    """Every megalign module this file imports, wherever the import statement stands: ``from a.b import c``
    imports module ``a.b.c`` when there is one, else module ``a.b``."""
    modules = _modules()
    names: List[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.append(submodule if submodule in modules else node.module)
    return [name for name in names if name.split(".")[0] == "megalign"]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_is_in_the_table() -> None:
    packages = {_package(module) for module in _modules()}
    assert packages <= set(ALLOWED), sorted(packages - set(ALLOWED))


def _not_allowed(own: str, imported: List[str]) -> List[str]:
    return sorted({name for name in imported if _package(name) not in (own, "__init__", *ALLOWED[own])})


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_follow_the_layering(module: str) -> None:
    own = _package(module)
    wrong = _not_allowed(own, _imports(_modules()[module]))
    assert not wrong, f"{module} ({own}/) imports {wrong}: not allowed by docs/architecture.md"


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    source = tmp_path / "upward.py"
    source.write_text("def f():\n    from megalign.training.trainer import Trainer\n", encoding="utf-8")
    assert _not_allowed("model", _imports(source)) == ["megalign.training.trainer"]
    assert _not_allowed("demo", _imports(source)) == []


def _module_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(path):
            while name and name not in modules:  # the extension module megalign._helpers is no source file
                name = name.rpartition(".")[0]
            if name and name not in (module, "megalign"):
                targets.add(name)
        graph[module] = targets
    return graph


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert _circles(_module_graph()) == []


def test_the_circle_finder_finds_circles() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
