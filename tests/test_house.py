"""The house rules that a review would otherwise have to find by hand (issue 25): no import cycle among mmspec's
modules (function-level imports included: a lazy import is still a dependency), files under 500 lines, functions
under 80 (DESIGN.md, Style)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mmspec": "mmspec", "adapters": "mmspec.adapters", "data_tools": "mmspec.data_tools",
            "demos": "mmspec.demos"}  # folder -> installed name (pyproject's package-dir)
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The mmspec modules `name` imports anywhere in its file (`from . import x` counts x when x is a module)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert "mmspec.engine" in graph["mmspec.pipeline"]  # the walker sees the imports at all
    assert cycles(graph) == []


def test_no_private_names_cross_modules():
    """A name with a leading underscore is its module's own: another module importing it reaches past an interface
    (make it public, or move it where it is used)."""
    known = modules()
    crossing = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mmspec")):
                crossing += [f"{name} imports {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


def long_files(folder: str) -> dict[str, int]:
    return {str(p.relative_to(ROOT)): n for p in (ROOT / folder).glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}


def test_files_fit_the_style():
    long = {**long_files("mmspec"), **long_files("adapters"), **long_files("demos")}
    assert long == {}, f"files over {MAX_FILE_LINES} lines: split them along their seams"


def long_functions(folder: str) -> dict[str, int]:
    out = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{folder}/{path.name}:{node.name}"] = n
    return out


def test_functions_fit_on_a_screen():
    assert {**long_functions("mmspec"), **long_functions("adapters"), **long_functions("demos")} == {}


def test_data_tools_functions_fit_on_a_screen():
    assert long_functions("data_tools") == {}
