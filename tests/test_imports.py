"""Every module of the package imports on its own, in any order: no import cycles.

A cycle hidden by function-level imports shows up only when the modules are
imported in some orders, so each check runs in a fresh interpreter (a
subprocess: nothing already imported by pytest helps), once in alphabetical
order and once in reverse. A static check follows every ``import`` of a
package module, at module level or inside functions, and looks for cycles.
"""
from __future__ import annotations

import ast
import pkgutil
import sys
from pathlib import Path

import pytest

import mpimig
from conftest import base_env, run_cmd

PACKAGE_DIR = Path(mpimig.__file__).resolve().parent
SKIP = {"mpimig.__main__"}          # runs the command line when imported


def all_modules() -> list[str]:
    """Every module and package under mpimig (walk_packages, without importing them), sorted."""
    names = {"mpimig"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="mpimig."):
        names.add(info.name)
    return sorted(names - SKIP)


IMPORT_IN_ORDER = """
import importlib, sys
names = sys.argv[1:]
for name in names:
    importlib.import_module(name)
    print("imported", name, flush=True)
print("all", len(names), "imported")
"""


def test_the_module_list_is_complete():
    names = all_modules()
    files = {p.relative_to(PACKAGE_DIR.parent).with_suffix("") for p in PACKAGE_DIR.rglob("*.py")}
    expected = {".".join(f.parts[:-1] if f.name == "__init__" else f.parts) for f in files}
    assert set(names) == expected - SKIP
    assert {"mpimig.apps.heat2d", "mpimig.bench.migrate", "mpimig.bench.migrate_strategies"} <= set(names)


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order, tmp_path):
    names = all_modules()
    if order == "reverse":
        names = names[::-1]
    res = run_cmd([sys.executable, "-c", IMPORT_IN_ORDER, *names], timeout=180, env=base_env(), cwd=tmp_path)
    done = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("imported ")]
    assert done == names and f"all {len(names)} imported" in res.stdout, (
        f"stopped after {done[-1:] or 'nothing'} (next: {names[len(done)] if len(done) < len(names) else '-'})"
        f"\n{res.stderr[-4000:]}")
    assert res.returncode == 0, res.stderr[-4000:]


# --- static: the import graph between the package's modules ---

def _target(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from X import ...`` in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for
    annotations only, never run: a type-only back reference is not a cycle)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                continue
            todo.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(names: list[str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (functions too)."""
    known = set(names)
    graph: dict[str, set[str]] = {}
    for name in names:
        rel = Path(*name.split(".")[1:])
        path = PACKAGE_DIR / rel / "__init__.py"
        is_pkg = path.exists()
        if not is_pkg:
            path = (PACKAGE_DIR / rel).with_suffix(".py")
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _target(name, is_pkg, node)
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)   # from . import submodule
        # importing a.b.c runs a and a.b first; a package's __init__ is not a dependency of its modules
        graph[name] = {d for d in deps if d in known and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_type_checking_imports_are_not_edges(tmp_path):
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nimport b\n"
    found = set()
    for node in _runtime_nodes(ast.parse(src)):
        if isinstance(node, ast.Import):
            found.update(x.name for x in node.names)
    assert found == {"b"}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# Every part of the package, and the package as a whole ("mpimig" matches every module),
# is without import cycles, function-level imports included.
CYCLE_FREE = ["mpimig", "mpimig.apps", "mpimig.bench", "mpimig.checkpoint", "mpimig.ft", "mpimig.lab", "mpimig.launch",
              "mpimig.migration", "mpimig.verify"]


@pytest.mark.parametrize("part", CYCLE_FREE)
def test_no_import_cycle_through(part):
    found = [c for c in cycles(import_graph(all_modules()))
             if any(m == part or m.startswith(part + ".") for m in c)]
    assert found == [], f"import cycles through {part}: {found}"


def test_every_public_name_resolves():
    """``mpimig.X`` for every name in ``mpimig.__all__`` (the public API is loaded lazily:
    a module that moved without its entry in ``_LAZY`` shows only when the name is used)."""
    res = run_cmd([sys.executable, "-c", "import mpimig\nfor n in mpimig.__all__: getattr(mpimig, n)\nprint('ok')"],
                  env=base_env(), cwd="/", timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-4000:]
