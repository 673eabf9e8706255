"""No import cycles inside a package, counting imports inside functions too.

The graph is built from the source with :mod:`ast` (nothing is imported): an edge A -> B for
every ``import``/``from ... import`` in module A that names module B of the same package
(absolute or relative, at module level or inside a function or method; ``from P import m``
also reaches ``P.m`` when that is a module), and for ``__import__("...")`` /
``importlib.import_module("...")`` with a constant name. Imports under ``if TYPE_CHECKING:``
are skipped: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under src/."""
    root = SRC / package
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Every dotted name ``module`` imports (run-time imports only)."""
    pkg = module if is_package else module.rpartition(".")[0]

    def walk(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from walk(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                yield node.args[0].value
        for child in ast.iter_child_nodes(node):
            yield from walk(child)

    yield from walk(tree)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports. ``import a.b.c`` runs ``a``,
    ``a.b`` and ``a.b.c``; the packages that contain the importing module are left out (they
    are always initialised before it), as are self-imports."""
    mods = modules(package)
    graph = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text(), str(f))
        parts_self = name.split(".")
        ancestors = {".".join(parts_self[:k]) for k in range(1, len(parts_self) + 1)}
        targets = set()
        for dotted in _imported_names(tree, name, f.name == "__init__.py"):
            parts = dotted.split(".")
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if prefix in mods and prefix not in ancestors:
                    targets.add(prefix)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["enec", "kvserve"])
def test_no_import_cycles(package):
    graph = import_graph(package)
    assert len(graph) > 5
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_cycles(tmp_path, monkeypatch):
    """The checker finds a cycle made by a function-level relative import and ignores one under
    ``if TYPE_CHECKING:``."""
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
                              "def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("import pkgx.a\n")
    (pkg / "d.py").write_text("def h():\n    return __import__('pkgx.e')\n")
    (pkg / "e.py").write_text("from pkgx.d import h\n")
    for i in range(3):
        (pkg / f"z{i}.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    graph = import_graph("pkgx")
    assert graph["pkgx.a"] == {"pkgx.b"}
    assert sorted(map(tuple, cycles(graph))) == [("pkgx.a", "pkgx.b"), ("pkgx.d", "pkgx.e")]
