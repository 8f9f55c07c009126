"""The house holds: no import cycles, small modules, SQL only in the store, no dev tooling in the wheel.

The layer and driver contracts themselves are import-linter's (``[tool.importlinter]``
in pyproject.toml, run by ``.ci/run``); these checks cover what it does not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp

import pgdurable_async

PACKAGE = Path(pgdurable_async.__file__).parent
MAX_LINES = 500
_SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|LISTEN|NOTIFY)\s+\S")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.find_modules_directly_imported_by(module):
            if not target.startswith("pgdurable_async"):
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("pgdurable_async") and module not in index:
            visit(module)
    return found


def test_no_import_cycles_counting_function_level_imports() -> None:
    # grimp records every import statement, at module level or inside a function; imports
    # under TYPE_CHECKING exist only for the type checker and are left out.
    graph = grimp.build_graph("pgdurable_async", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("pgdurable_async.a", "pgdurable_async.b", "pgdurable_async.c"):
        graph.add_module(name)
    graph.add_import(importer="pgdurable_async.a", imported="pgdurable_async.b")
    graph.add_import(importer="pgdurable_async.b", imported="pgdurable_async.a")
    graph.add_import(importer="pgdurable_async.c", imported="pgdurable_async.a")
    assert _cycles(graph) == [["pgdurable_async.a", "pgdurable_async.b"]]


def test_modules_stay_small() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_sql_lives_in_the_store() -> None:
    """Outside ``_store`` no string literal is a SQL statement (the graph rewriter builds fragments only)."""
    offenders = []
    for path in _modules():
        if "_store" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if _SQL.match(node.value):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value[:40]!r}")
    assert offenders == []


def test_no_benchmark_code_in_the_package() -> None:
    assert [p for p in _modules() if "bench" in p.name] == []
    assert (PACKAGE.parent / "benchmarks" / "harness.py").is_file()


def test_every_subpackage_says_what_it_holds() -> None:
    for init in PACKAGE.glob("_*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), init


def test_no_merge_conflict_markers_anywhere() -> None:
    root = PACKAGE.parent
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)
    suspects = [p for p in [*root.glob("*.md"), *root.glob("*.toml"), root / ".ci" / "run", *root.rglob("*.py"),
                            *root.rglob("*.sql"), *root.rglob("*.html"), *root.rglob("*.css"), *root.rglob("*.js")]
                if ".venv" not in p.parts and ".git" not in p.parts and p.is_file()]
    assert [str(p) for p in suspects if marker.search(p.read_text(encoding="utf-8", errors="replace"))] == []
