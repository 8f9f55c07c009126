"""Fuzzing the graph compiler: random graph JSON gives a valid graph or a GraphError, nothing else.

``compile_graph`` is the gate every graph passes (``df.start``'s JSON read back by the
worker, ``dsl.compile``, ``App.graph``).  Fed random nested JSON objects (known and unknown
node types, missing and wrong-typed fields, unhashable ``type`` values, deep nesting, huge
lists, NaN and huge numbers), it must either return a graph the interpreter can run or
raise :class:`GraphError` (a ``PgDurableError``): never a ``RecursionError``, ``KeyError``,
``TypeError`` ..., and never take long.

"Valid" is checked, not assumed: every node of a returned tree has a known type and a
stable id, its numbers are finite and within what a timer can hold, the tree is at most
:data:`MAX_DEPTH` nodes deep, compiling it again gives the same tree, and it encodes as
JSON (the worker stores it in history).
"""

from __future__ import annotations

import functools
import math
import operator
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgdurable_async import dsl
from pgdurable_async._base.errors import PgDurableError
from pgdurable_async._base.serde import encode
from pgdurable_async._graph.compiler import (
    MAX_DEPTH,
    MAX_JSON_DEPTH,
    MAX_SECONDS,
    NODE_TYPES,
    GraphError,
    children,
    compile_graph,
    walk,
)
from pgdurable_async._graph.tokens import references

FIELDS: dict[str, tuple[str, ...]] = {
    "sql": ("query",), "seq": ("steps",), "join": ("branches",), "race": ("branches",),
    "bind": ("name", "node"), "if": ("cond", "then", "else"), "if_rows": ("name", "cond", "then", "else"),
    "loop": ("body", "cond", "continue_on_failure"), "break": ("value",), "sleep": ("seconds",),
    "wait_for_schedule": ("cron",), "wait_for_signal": ("name", "timeout"),
    "http": ("url", "method", "body", "headers", "timeout"), "call": ("name", "input"),
    "activity": ("name", "input"), "fan_out": ("over", "step", "limit", "as"),
}
CHILD_FIELDS = {"node", "cond", "then", "else", "body", "step"}
LIST_FIELDS = {"steps", "branches"}

names = st.sampled_from(["x", "batch", "input", "item", "go", "_p", "a1", "", "1x", "a b", "é", "$x", "x.y"])
texts = st.one_of(
    names,
    st.sampled_from(["SELECT 1", "SELECT $x", "SELECT $x?", "SELECT * FROM $batch.*", "SELECT $1", "",
                     "   ", "https://h/x", "https://h/$x", "* * * * *", "0 12 * * 1-5", "61 * * * *",
                     "*/0 * * * *", "0-99999999999999 * * * *", "L * * * *", "@daily", "? * * * *",
                     "get", "post", "TRACE", "'; DROP TABLE t; --"]),
    st.text(max_size=30),
)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 30, 1e9, 1e12, 1e308, 10**400, 10**4000, 2**63, 2**64, -1, 0.5, MAX_SECONDS,
                     MAX_SECONDS + 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
known_types = st.sampled_from(sorted(NODE_TYPES))
junk_types = st.sampled_from(["SQL", "unknown", "", "seq ", "__class__", "id", [], {}, ["sql"], None, 0, 10**30,
                             10**4000, True, "x" * 300])
types = st.integers(0, 9).flatmap(lambda n: junk_types if n == 0 else known_types)  # mostly known: fuzz the fields


def _field_value(field: str, child: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right kind, sometimes anything."""
    if field in CHILD_FIELDS:
        right = child
    elif field in LIST_FIELDS:
        right = st.lists(child, max_size=4)
    elif field in ("seconds", "timeout", "limit"):
        right = numbers
    elif field == "headers":
        right = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
    elif field in ("input", "value", "body"):
        right = json_values
    else:
        right = texts
    return st.integers(0, 5).flatmap(lambda n: json_values if n == 0 else right)


def _node(child: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kind = draw(types)
        fields = FIELDS.get(kind, ()) if isinstance(kind, str) else ()
        node: dict[str, Any] = {} if draw(st.integers(0, 30)) == 0 else {"type": kind}
        for field in fields:
            if draw(st.integers(0, 5)) > 0:  # mostly present
                node[field] = draw(_field_value(field, child))
        if draw(st.integers(0, 6)) == 0:  # an unknown or reserved extra field
            node[draw(st.sampled_from(["extra", "id", "open", "type2"]))] = draw(json_values)
        return node

    return build()


leaf_nodes = st.one_of(
    texts,
    st.builds(lambda q: {"type": "sql", "query": q}, texts),
    st.builds(lambda s: {"type": "sleep", "seconds": s}, numbers),
    st.builds(lambda n: {"type": "wait_for_signal", "name": n}, names),
    st.just({"type": "break"}),
)
graphs = st.recursive(leaf_nodes, _node, max_leaves=25)

CHAIN = ["seq", "join", "race", "bind", "if", "if_rows", "loop", "fan_out"]


def _wrap(kind: str, inner: Any) -> dict[str, Any]:
    if kind == "seq":
        return {"type": "seq", "steps": [inner, "SELECT 1"]}  # a seq in a seq is flattened, not nested
    if kind in ("join", "race"):
        return {"type": kind, "branches": [inner, "SELECT 1"]}
    if kind == "bind":
        return {"type": "bind", "name": "b", "node": inner}
    if kind == "if":
        return {"type": "if", "cond": "SELECT true", "then": inner}
    if kind == "if_rows":
        return {"type": "if_rows", "cond": "SELECT 1", "then": "SELECT 2", "else": inner}
    if kind == "loop":
        return {"type": "loop", "body": inner}
    return {"type": "fan_out", "over": "input", "step": inner}


def _chain(depth: int, kinds: list[str]) -> tuple[Any, int]:
    """A chain of ``depth`` nested nodes; returns (graph, its depth in nodes once seqs are flattened)."""
    graph: Any = {"type": "sql", "query": "SELECT 1"}
    nodes = 1
    for i in range(depth - 1):
        kind = kinds[i % len(kinds)]
        nodes += kind != "seq" or graph["type"] != "seq"  # a seq in a seq is flattened
        graph = _wrap(kind, graph)
    return graph, nodes


depths = st.one_of(st.integers(1, 300), st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000]))
chain_kinds = st.lists(st.sampled_from(CHAIN), min_size=1, max_size=4)


def _seq_chain(length: int) -> Any:
    """What ``a >> b >> c ...`` builds in Python: left-nested seqs, flat once compiled."""
    graph: Any = "SELECT 0"
    for i in range(length):
        graph = {"type": "seq", "steps": [graph, f"SELECT {i}"]}
    return graph


def _check_valid(tree: Any, bound: frozenset[str] = frozenset()) -> None:
    """What the interpreter relies on in a compiled tree (compiled with the names ``bound``)."""
    assert isinstance(tree, dict)
    ids = set()
    depth = {tree["id"]: 1}
    for node in walk(tree):
        assert node["type"] in NODE_TYPES
        assert isinstance(node["id"], str) and node["id"] not in ids
        ids.add(node["id"])
        assert depth[node["id"]] <= MAX_DEPTH
        for key in ("seconds", "timeout", "limit"):
            value = node.get(key)
            if value is not None:
                assert not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                assert 0 <= value <= MAX_SECONDS or key == "limit" and value >= 1
        if node["type"] == "sleep":  # what the interpreter and the engine compute from it
            datetime.now(UTC) + timedelta(seconds=float(node["seconds"]))
        for key in ("name", "over", "as"):
            if key in node and node["type"] in ("bind", "wait_for_signal", "call", "activity", "fan_out"):
                assert isinstance(node[key], str) and node[key]
        for child in children(node):
            depth[child["id"]] = depth[node["id"]] + 1
    assert compile_graph(tree, bound=bound | _all_names(tree)) == tree  # compiling is idempotent
    encode({"input": {"graph": tree}}, what="graph")  # as the worker records it


def _all_names(tree: dict[str, Any]) -> set[str]:
    return {ref.name for node in walk(tree) if node["type"] == "sql" for ref in references(node["query"])} | {
        node["over"] for node in walk(tree) if node["type"] == "fan_out"} | {
        node["name"] for node in walk(tree) if node["type"] == "if_rows" and isinstance(node.get("name"), str)}


def _outcome(graph: Any, bound: frozenset[str] = frozenset()) -> dict[str, Any] | GraphError:
    started = time.perf_counter()
    try:
        tree = compile_graph(graph, bound=bound)
    except GraphError as exc:
        assert isinstance(exc, PgDurableError) and str(exc)
        return exc
    finally:
        assert time.perf_counter() - started < 2.0, "compile_graph took over 2 s"
    return tree


EXAMPLES = int(os.environ.get("PGDURABLE_FUZZ_EXAMPLES", "400"))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(graphs, st.frozensets(names, max_size=3))
@example({"type": []}, frozenset())  # an unhashable type raised TypeError
@example({"type": {"a": 1}}, frozenset())
@example({"type": "fan_out", "over": "input", "step": "SELECT 1", "as": []}, frozenset({"input"}))  # TypeError
@example({"type": "fan_out", "over": [], "step": "SELECT 1"}, frozenset())  # TypeError
@example({"type": "if_rows", "name": [], "then": "SELECT 1"}, frozenset())  # TypeError
@example({"type": "sleep", "seconds": float("nan")}, frozenset())  # accepted; the timer failed later
@example({"type": "sleep", "seconds": 1e308}, frozenset())  # accepted; OverflowError in the engine
@example({"type": "sleep", "seconds": 10**400}, frozenset())
@example({"type": "wait_for_signal", "name": "go", "timeout": float("inf")}, frozenset())
@example({"type": "fan_out", "over": "input", "step": "SELECT 1", "limit": float("inf")}, frozenset({"input"}))
@example({"type": "wait_for_schedule", "cron": "0-99999999999999 * * * *"}, frozenset())
@example({"type": "http", "url": "SELECT $x"}, frozenset({"x"}))  # recompiled without the caller's names
def test_random_graph_json_compiles_or_raises_graph_error(graph: Any, bound: frozenset[str]) -> None:
    outcome = _outcome(graph, bound)
    if not isinstance(outcome, GraphError):
        _check_valid(outcome, bound)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(depths, chain_kinds)
@example(MAX_DEPTH + 1, ["bind"])
@example(MAX_DEPTH, ["join"])
@example(5000, ["if"])  # RecursionError in copy.deepcopy
def test_deep_graphs_are_refused_past_the_depth_limit(depth: int, kinds: list[str]) -> None:
    graph, nodes = _chain(depth, kinds)
    outcome = _outcome(graph, frozenset({"input"}))
    if nodes > MAX_DEPTH:
        assert isinstance(outcome, GraphError), f"a graph {nodes} nodes deep compiled"
        assert f"more than {MAX_DEPTH} nodes deep" in str(outcome)
    else:
        assert not isinstance(outcome, GraphError), f"a graph {nodes} nodes deep was refused: {outcome}"
        _check_valid(outcome, frozenset({"input"}))


@settings(max_examples=15, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3000))
def test_long_sequences_are_not_deep(length: int) -> None:
    """``a >> b >> ...`` nests seqs in the JSON; compiled they are one flat seq, whatever the length."""
    tree = _outcome(_seq_chain(length))
    assert isinstance(tree, dict) and tree["type"] == "seq"
    assert all(step["type"] == "sql" for step in tree["steps"])


@pytest.mark.parametrize("length", [2, 300, 5000])
def test_long_python_pipelines_compile(length: int) -> None:
    """``reduce(operator.rshift, steps)`` of 300 steps raised RecursionError (Node.to_json recursed)."""
    pipeline = functools.reduce(operator.rshift, [dsl.sql(f"SELECT {i}") for i in range(length)])
    assert [s["query"] for s in dsl.compile(pipeline)["steps"]] == [f"SELECT {i}" for i in range(length)]
    joined = functools.reduce(operator.and_, [dsl.sql(f"SELECT {i}") for i in range(length)])
    if length <= MAX_DEPTH:
        assert dsl.compile(joined)["type"] == "join"
    else:  # each & nests one join deeper: past the limit, a GraphError (dsl.join(*branches) is flat)
        with pytest.raises(GraphError, match=f"more than {MAX_DEPTH} nodes deep"):
            dsl.compile(joined)


@settings(max_examples=10, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["join", "race", "seq"]), st.integers(1, 50_000))
def test_huge_lists_compile_quickly(kind: str, n: int) -> None:
    field = "steps" if kind == "seq" else "branches"
    tree = _outcome({"type": kind, field: [f"SELECT {i}" for i in range(n)]})
    assert isinstance(tree, dict) and len(tree[field]) == n


@pytest.mark.parametrize("depth", [10, 200, 300, 590, 600, 1000, 5000])
def test_deep_values_inside_a_node_compile_or_raise_graph_error(depth: int) -> None:
    """A call input nested 1000 levels deep raised RecursionError (copy.deepcopy); 300 levels
    compiled, and then the worker could not record it (orjson encodes at most 255 levels)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    outcome = _outcome({"type": "call", "name": "child", "input": value})  # the input starts at level 2
    if depth + 1 <= MAX_JSON_DEPTH:
        assert not isinstance(outcome, GraphError), outcome
        _check_valid(outcome)
    else:
        assert isinstance(outcome, GraphError) and f"more than {MAX_JSON_DEPTH} levels" in str(outcome)


def test_values_without_a_repr_or_a_json_form() -> None:
    """Messages never repr a huge integer (Python refuses past 4300 digits); values JSON or
    PostgreSQL cannot hold are refused at compile time, not when the worker stores them."""
    for graph in ({"type": 10**5000}, {"type": "http", "url": "https://h", "method": 10**5000},
                  {"type": "fan_out", "over": "x", "step": "SELECT 1", "as": 10**5000},
                  {"type": "call", "name": "c", "input": {"n": 2**64}}, {"type": "break", "value": [float("nan")]},
                  {"type": "sql", "query": "SELECT '\x00'"}, {"type": "call", "name": "c", "input": {"\x00": 1}}):
        assert isinstance(_outcome(graph, frozenset({"x"})), GraphError), graph


def test_a_seq_that_contains_itself_is_refused() -> None:
    graph: dict[str, Any] = {"type": "seq", "steps": ["SELECT 1"]}
    graph["steps"].append(graph)
    assert isinstance(_outcome(graph), GraphError)
