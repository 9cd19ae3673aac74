"""The package's shape: no import cycles, a torch-free metadata layer, one public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ctscreen

PACKAGE_ROOT = Path(ctscreen.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of ctscreen that ``path`` imports anywhere (functions included), except
    under ``if TYPE_CHECKING:``, which never runs."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ctscreen"):
                return
            for alias in node.names:  # ``from . import x`` may name a submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_inside_ctscreen() -> None:
    graph = import_graph()
    assert "ctscreen.screener" in graph and "ctscreen.backends.openvino_backend" in graph
    assert "ctscreen.hardware" in graph["ctscreen.screener"]
    assert find_cycles(graph) == []


def test_leaf_modules_import_nothing_heavier_than_errors() -> None:
    graph = import_graph()
    for leaf in ("ctscreen.hardware", "ctscreen._version", "ctscreen.interrupts"):
        assert graph[leaf] <= {"ctscreen.errors"}, (leaf, graph[leaf])
    # every file write defers Ctrl-C until the file is whole
    assert graph["ctscreen.fileio"] <= {"ctscreen.errors", "ctscreen.interrupts"}


def test_public_api_and_metadata_import_without_torch() -> None:
    code = (
        "import sys, ctscreen, ctscreen.results, ctscreen.report, ctscreen.card, "
        "ctscreen.data.registry, ctscreen.cli\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from ctscreen import Screener, StudyResult\n"
        "print(Screener.__module__, StudyResult.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ctscreen.screener", "ctscreen.results"]
