"""The import graph: no cycle between the project's modules, counting the imports inside functions
too (a cycle closed by a lazy import is still a cycle), and every module imports on its own in a
fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gadchat", "applications", "inference")


def project_modules() -> dict:
    """``{dotted name: file}`` of every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict) -> dict:
    """``{module: set of project modules it imports}``, anywhere in its file (top level or inside a
    function). ``from package import submodule`` is an edge to the submodule, not the package."""

    def owner(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in modules else owner(node.module))
        graph[name] = edges - {None, name}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_closed_by_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_imports_inside_functions(tmp_path):
    (tmp_path / "one.py").write_text("def f():\n    from two import thing\n")
    (tmp_path / "two.py").write_text("import one\n")
    graph = import_graph({"one": tmp_path / "one.py", "two": tmp_path / "two.py"})
    assert graph == {"one": {"two"}, "two": {"one"}} and cycles(graph) == [["one", "two"]]


def test_no_import_cycle_in_the_project():
    assert cycles(import_graph(project_modules())) == []


def test_every_module_imports_alone_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    names = [name for name in project_modules() if not name.endswith("__main__")]
    failures = []
    for start in range(0, len(names), 4):  # four interpreters at a time
        batch = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name in names[start : start + 4]}
        for name, process in batch.items():
            _, err = process.communicate(timeout=300)
            if process.returncode != 0:
                failures.append(f"{name}: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    assert not failures, "\n".join(failures)
