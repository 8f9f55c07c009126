"""The graph front end without a database: dsl nodes, compile/validate, references, rewriting."""

from __future__ import annotations

from typing import Any

import pytest

from pgdurable_async import dsl
from pgdurable_async._base.errors import GraphError
from pgdurable_async._graph.compiler import compile_graph, walk
from pgdurable_async._graph.interpreter import truthy
from pgdurable_async._graph.mermaid import to_mermaid
from pgdurable_async._graph.references import (
    COLUMNS_KEY,
    ReferenceError_,
    public,
    rewrite,
    substitute_text,
    substitute_vars,
)
from pgdurable_async._graph.tokens import needs_select, references


def rows(columns: list[tuple[str, str]], *data: list[Any]) -> dict[str, Any]:
    """A SQL node's result: pg_durable's shape plus the private column types."""
    names = [n for n, _ in columns]
    return {"rows": [dict(zip(names, row, strict=True)) for row in data], "row_count": len(data),
            COLUMNS_KEY: [[n, t] for n, t in columns]}


# -- dsl ------------------------------------------------------------------------------------------
def test_operators_build_graph_json() -> None:
    graph = dsl.sql("SELECT 1") >> "SELECT 2" >> (dsl.sql("SELECT 3") & "SELECT 4") >> ("SELECT 5" | dsl.sleep(1))
    assert graph.to_json() == {"type": "seq", "steps": [
        {"type": "seq", "steps": [
            {"type": "seq", "steps": [{"type": "sql", "query": "SELECT 1"}, {"type": "sql", "query": "SELECT 2"}]},
            {"type": "join", "branches": [{"type": "sql", "query": "SELECT 3"}, {"type": "sql", "query": "SELECT 4"}]},
        ]},
        {"type": "race", "branches": [{"type": "sql", "query": "SELECT 5"}, {"type": "sleep", "seconds": 1}]},
    ]}
    tree = dsl.compile(graph)
    assert [s["type"] for s in tree["steps"]] == ["sql", "sql", "join", "race"]  # nested seqs flattened
    assert [s["id"] for s in tree["steps"]] == ["n0.0", "n0.1", "n0.2", "n0.3"]
    assert tree["steps"][2]["branches"][1]["id"] == "n0.2.1"
    assert ("SELECT 0" >> dsl.sql("SELECT 1")).to_json()["steps"][0] == {"type": "sql", "query": "SELECT 0"}


def test_bind_spellings_agree() -> None:
    assert dsl.sql("SELECT 1").bind("x") == dsl.as_("SELECT 1", "x")
    assert dsl.sql("SELECT 1").bind("x").to_json() == {"type": "bind", "name": "x",
                                                       "node": {"type": "sql", "query": "SELECT 1"}}


def test_node_functions() -> None:
    assert dsl.if_("SELECT true", "SELECT 1").to_json()["else"] is None
    assert dsl.loop("SELECT 1", "SELECT false", continue_on_failure=True).to_json()["continue_on_failure"] is True
    assert dsl.wait_for_signal("go", timeout=5).to_json() == {"type": "wait_for_signal", "name": "go", "timeout": 5}
    assert dsl.call("child", {"x": "$a"}).to_json() == {"type": "call", "name": "child", "input": {"x": "$a"}}
    assert dsl.http("https://h/x", "get").to_json()["method"] == "get"
    assert dsl.compile(dsl.http("https://h/x", "get"))["method"] == "GET"
    with pytest.raises(GraphError):
        dsl.sql("  ")


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"type": "teleport"}, "unknown node type"),
        (dsl.sql("SELECT $x"), r"\$x is used before it is bound"),
        (dsl.sql("SELECT 1").bind("a") >> "SELECT $b", r"\$b"),
        (dsl.race(dsl.sql("SELECT 1").bind("a"), "SELECT 2") >> "SELECT $a", r"\$a"),
        (dsl.join(dsl.sql("SELECT 1").bind("a"), "SELECT $a"), r"\$a"),
        (dsl.if_("SELECT true", dsl.sql("SELECT 1").bind("a"), "SELECT 2") >> "SELECT $a", r"\$a"),
        (dsl.wait_for_schedule("61 * * * *"), "cron"),
        (dsl.wait_for_schedule("* * *"), "cron"),
        (dsl.if_rows("nothing", "SELECT 1"), "not bound"),
        (dsl.fan_out(over="nothing", step="SELECT 1"), "not bound"),
        ({"type": "http", "url": "https://x", "method": "FETCH"}, "method"),
        ({"type": "sleep", "seconds": -1}, "sleep.seconds"),
        ({"type": "seq", "steps": []}, "at least one"),
        ([1, 2], "JSON object"),
        (dsl.sql("SELECT 1").bind("bad name"), "identifier"),
    ],
)
def test_invalid_graphs(graph: Any, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        dsl.compile(graph)


def test_valid_binding_paths() -> None:
    dsl.compile(dsl.join(dsl.sql("SELECT 1").bind("a"), dsl.sql("SELECT 2").bind("b")) >> "SELECT $a, $b")
    dsl.compile(dsl.if_("SELECT true", dsl.sql("SELECT 1").bind("a"), dsl.sql("SELECT 2").bind("a")) >> "SELECT $a")
    dsl.compile(dsl.loop(dsl.sql("SELECT 1").bind("a"), "SELECT $a < 3"))  # the condition runs after the body
    dsl.compile(dsl.wait_for_signal("approval", 5) >> "SELECT $approval.timed_out")  # signals bind their name
    dsl.compile(dsl.sql("SELECT $maybe?"))  # null-safe references may be unbound
    dsl.compile(dsl.sql("SELECT 1").bind("rows") >> dsl.fan_out(over="rows", step="SELECT $item.x"))
    tree = compile_graph({"type": "sql", "query": "SELECT $input.n"}, bound=frozenset({"input"}))
    assert tree["id"] == "n0"


# -- references and rewriting --------------------------------------------------------------------------
def test_references_skip_quotes_comments_and_dollar_bodies() -> None:
    sql = """SELECT $a, '$b', "$c", E'it\\'s $d', $$ $e $$, $tag$ $f $tag$, x$g -- $h
             /* $i /* nested $j */ $k */ $l.col, $m?, $n.*, $o.p?"""
    found = [(r.name, r.column, r.null_safe) for r in references(sql)]
    assert found == [("a", None, False), ("l", "col", False), ("m", None, True), ("n", "*", False),
                     ("o", "p", True)]


def test_rewrite_binds_parameters() -> None:
    bound = {"u": rows([("id", '"pg_catalog"."int4"'), ("email", '"pg_catalog"."text"')], [7, "a'b"])}
    sql, params = rewrite("SELECT * FROM t WHERE id = $u AND email = $u.email AND x = $u::text", bound)
    assert sql == ('SELECT * FROM t WHERE id = ($1::text::"pg_catalog"."int4") AND '
                   'email = ($2::text::"pg_catalog"."text") AND x = ($1::text)::text')
    assert params == ["7", "a'b"]


def test_rewrite_row_sets_and_null_safe() -> None:
    bound = {"b": rows([("id", '"pg_catalog"."int4"')], [1], [2]), "e": rows([("id", '"pg_catalog"."int4"')])}
    sql, params = rewrite("UPDATE d SET p = true WHERE id IN (SELECT id FROM $b.*)", bound)
    assert 'jsonb_to_recordset($1::text::jsonb) AS r("id" "pg_catalog"."int4")) AS "b")' in sql
    assert params == ['[{"id":1},{"id":2}]']
    sql, _ = rewrite("SELECT x.id FROM $b.* x", bound)
    assert sql.endswith(") x")  # the user's alias, no second one
    sql, params = rewrite("SELECT $e?, $e.id?", bound)
    assert params == [None, None]
    with pytest.raises(ReferenceError_, match="no rows"):
        rewrite("SELECT $e", bound)
    with pytest.raises(ReferenceError_, match="no column"):
        rewrite("SELECT $b.nope", bound)
    with pytest.raises(ReferenceError_, match="positional"):
        rewrite("SELECT $1", bound)


def test_rewrite_documents_and_variables() -> None:
    bound = {"sig": {"signal_name": "s", "timed_out": False, "data": {"k": 1}, "by": "o'neil"}}
    sql, params = rewrite("SELECT $sig.timed_out, $sig.by, $sig.data", bound)
    assert sql == "SELECT ($1::text::boolean), ($2::text::text), ($3::text::jsonb)"
    assert params == ["false", "o'neil", '{"k":1}']
    sql, params = rewrite("SELECT * FROM {tbl} WHERE sku = '{sku}' LIMIT {n}::int -- {z} '{unknown}'",
                          {}, {"tbl": "public.p", "sku": "W-1", "n": "3", "z": "zz"})
    assert sql == "SELECT * FROM public.p WHERE sku = 'W-1' LIMIT 3::int -- zz '{unknown}'"  # raw text, anywhere
    assert params == []


def test_variables_follow_pg_durable_scan() -> None:
    variables = {"a": "A", "b": "{a}", "sys_label": "L"}
    assert substitute_vars("{a}{b}{ a}{1x}{nope}{sys_label}", variables) == "A{a}{ a}{1x}{nope}L"
    assert substitute_vars('{"k": {a}} {a', variables) == '{"k": A} {a'  # pg_durable would leave this {a}
    bound = {"r": rows([("id", "integer")], [5])}
    assert rewrite("SELECT {col} FROM t", bound, {"col": "$r"}) == ("SELECT ($1::text::integer) FROM t", ["5"])


def test_rows_result_shape() -> None:
    result = rows([("answer", '"pg_catalog"."int4"'), ("b", "text")], [42, "x"])
    assert public(result) == {"rows": [{"answer": 42, "b": "x"}], "row_count": 1}
    assert public([result]) == [{"rows": [{"answer": 42, "b": "x"}], "row_count": 1}]
    plain = {"rows": [{"z": 1, "a": 2}], "row_count": 1}  # without column metadata: first key
    assert rewrite("SELECT $p, $p.a", {"p": plain}) == ("SELECT ($1::text::numeric), ($2::text::numeric)", ["1", "2"])


def test_expression_nodes_get_select() -> None:
    assert needs_select("$batch.done")
    assert needs_select("  1 > 0")
    assert not needs_select("select 1")
    assert not needs_select("-- hi\nWITH x AS (SELECT 1) SELECT * FROM x")
    assert not needs_select("(SELECT 1) UNION (SELECT 2)")
    assert rewrite("$x.done", {"x": rows([("done", "boolean")], [True])})[0] == "SELECT ($1::text::boolean)"


def test_substitute_text_for_http() -> None:
    bound = {"o": rows([("id", "integer")], [42])}
    assert substitute_text('{"id": $o, "who": "{user}"}', bound, {"user": "ann"}) == '{"id": 42, "who": "ann"}'


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (0, False), (2.5, True), ("yes", True), ("f", False), ("", False),
     ("0", False), (" No ", False), ("0.0", False), ("off", True), ("n", True), ("abc", True), ("1e3", True),
     (None, False), ([], False), ({"a": 1}, True)],
)
def test_truthiness(value: Any, expected: bool) -> None:
    assert truthy(rows([("v", "text")], [value])) is expected
    assert truthy(value) is expected


def test_no_rows_is_falsy() -> None:
    assert truthy(rows([("v", "text")])) is False


def test_mermaid() -> None:
    tree = dsl.compile(dsl.sql('SELECT "x" FROM t WHERE a > 1').bind("r") >> dsl.if_rows("r", "SELECT 1", "SELECT 2"))
    states = {n["id"]: "completed" for n in walk(tree)}
    states["n0.1.2"] = "skipped"
    text = to_mermaid(tree, states)
    assert text.startswith("flowchart TD\n")
    assert 'n0_0_0["sql: SELECT #quot;x#quot; FROM t WHERE a #gt; 1<br/><i>completed</i>"]:::completed' in text
    assert "n0_1 -->|else| n0_1_2" in text
    assert 'n0_1_2["sql: SELECT 2<br/><i>skipped</i>"]:::skipped' in text
