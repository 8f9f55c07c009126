"""Fuzzing against PostgreSQL: rewritten statements prepare as written, ``df.start`` never breaks.

1. Random select lists mixing references with quoted strings, quoted identifiers, dollar-quoted
   bodies and comments (some holding ``$name`` text that must stay text) are rewritten against
   random bound values, then PREPAREd and run on PostgreSQL: the statement has exactly
   ``len(params)`` parameters, every reference reads back its value unchanged (a value like
   ``x'); DROP TABLE t; --`` included), and every quoted ``$name`` comes back as written.

2. Random DSL expressions (the operators ``~>`` ``&`` ``|`` ``|=>`` ``?>`` ``!>`` ``@>`` over
   random strings and node functions) and random graph JSON text go through
   ``SELECT df.start(...)`` in a transaction that is rolled back, under a 5 s
   ``statement_timeout``.  Each gives an 8-hex instance id or a clean PostgreSQL error (an
   ``asyncpg.PostgresError`` with a message): never a lost connection, a timeout, or an
   internal error (SQLSTATE class XX).  And a graph ``df.start`` accepts, the worker's compiler
   accepts too: otherwise the instance would fail at its first turn instead of at the start.
"""

from __future__ import annotations

import decimal
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pgdurable_async._graph.compiler import MAX_DEPTH, MAX_SECONDS, GraphError, compile_graph
from pgdurable_async._graph.references import COLUMNS_KEY, ReferenceError_, rewrite
from pgdurable_async._store.node_store import rows_result
from tests.unit.test_fuzz_graph import graphs

EXAMPLES = int(os.environ.get("PGDURABLE_FUZZ_EXAMPLES", "80"))  # raise it for a longer hunt
DB_FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])
INJECTIONS = ["x'); DROP TABLE t; --", "'; DROP TABLE t; --", "$$; DROP TABLE t; $$", "*/ DROP TABLE t; /*",
              "\\'; DROP TABLE t; --", "\" OR 1=1 --", "$x", "$1", "{v}", "é€☃ 😀", "", " ", "--", "/*", "''", "\\"]
texts = st.one_of(st.sampled_from(INJECTIONS),
                  st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
                          max_size=12),
                  st.lists(st.sampled_from(INJECTIONS), max_size=4).map("".join))
ints = st.integers(-(2**31), 2**31 - 1)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=6,
)


# -- 1. rewritten statements on PostgreSQL -------------------------------------------------------
@dataclass
class Select:
    """A select list: fragments, the values PostgreSQL must return, and the bound results."""

    items: list[str] = field(default_factory=list)
    expected: list[Any] = field(default_factory=list)
    bound: dict[str, Any] = field(default_factory=dict)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


noise = st.sampled_from(["", " ", "\n", "/* $x */ ", "-- $x ' \" $$\n", "/* a /* $y */ b */", "\t"])


@st.composite
def selects(draw: st.DrawFn) -> Select:
    sel = Select()
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["text", "int", "json", "cell", "rows", "missing", "literal", "dollar",
                                     "ident", "estring"]))
        name = f"v{i}"
        gap = draw(noise)
        if kind == "text":
            value = draw(texts)
            sel.bound[name] = value
            sel.items.append(f"{gap}${name}")
            sel.expected.append(value)
        elif kind == "int":
            value = draw(ints)
            sel.bound[name] = {"n": value}
            sel.items.append(f"${name}.n{gap}")
            sel.expected.append(str(value))  # a numeric is read back as text (Decimal)
        elif kind == "json":
            value = draw(json_values)
            sel.bound[name] = [value]  # a list: jsonb whatever it holds
            sel.items.append(f"${name}::text")
            sel.expected.append(("json", [value]))
        elif kind == "cell":
            value = draw(texts)
            number = draw(ints)
            sel.bound[name] = {"rows": [{"t": value, "i": number}], "row_count": 1,
                               COLUMNS_KEY: [["t", '"pg_catalog"."text"'], ["i", '"pg_catalog"."int4"']]}
            sel.items.append(f"${name}.t || {gap}${name}.i::text")
            sel.expected.append(value + str(number))
        elif kind == "rows":
            values = draw(st.lists(texts, max_size=4))
            sel.bound[name] = {"rows": [{"a": v} for v in values], "row_count": len(values),
                               COLUMNS_KEY: [["a", '"pg_catalog"."text"']]}
            sel.items.append(f"(SELECT string_agg(a, '|' ORDER BY a COLLATE \"C\") FROM ${name}.* {gap})")
            sel.expected.append("|".join(sorted(values)) if values else None)  # "C": code point order
        elif kind == "missing":
            sel.items.append(f"${name}?{gap}")
            sel.expected.append(None)
        elif kind == "literal":  # text that looks like references stays text
            value = draw(texts) + f" ${name} $x.y"
            sel.items.append(f"{gap}{_literal(value)}")
            sel.expected.append(value)
        elif kind == "dollar":
            value = draw(texts).replace("$", "") + f" ${name} '"
            sel.items.append(f"$q{i}${value}$q{i}$")
            sel.expected.append(value)
        elif kind == "ident":
            sel.items.append(f'(SELECT "${name}" FROM (SELECT 1 AS "${name}") s)')
            sel.expected.append(1)
        else:
            value = draw(texts)
            escaped = value.replace("\\", "\\\\").replace("'", "\\'")
            sel.items.append(f"E'{escaped} ${name}'")
            sel.expected.append(value + f" ${name}")
    return sel


async def _connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await conn.execute("SET statement_timeout = '5s'")
    return conn


@DB_FUZZ
@given(sel=selects())
@example(sel=Select(["$v", "(SELECT count(*) FROM $w.*)", "'$v'"], ["x'); DROP TABLE t; --", 0, "$v"],
                    {"v": "x'); DROP TABLE t; --", "w": {"rows": [], "row_count": 0, COLUMNS_KEY: []}}))
async def test_rewritten_statements_prepare_with_their_parameters(dsn: str, sel: Select) -> None:
    sql = "SELECT " + ", ".join(f"({item}) AS c{i}" for i, item in enumerate(sel.items))
    text, params = rewrite(sql, sel.bound)
    conn = await _connect(dsn)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("CREATE TABLE t (a int)")
        stmt = await conn.prepare(text)
        assert len(stmt.get_parameters()) == len(params), text
        row = await stmt.fetchrow(*params)
        assert row is not None
        got = [format(v, "f") if isinstance(v, decimal.Decimal) else v for v in row.values()]
        got = [json.loads(g) if isinstance(e, tuple) and g is not None else g
               for g, e in zip(got, sel.expected, strict=True)]
        want = [orjson.loads(orjson.dumps(e[1])) if isinstance(e, tuple) else e for e in sel.expected]
        assert got == want, text
        assert await conn.fetchval("SELECT to_regclass('t') IS NOT NULL")  # nothing was dropped
        assert rows_result(stmt.get_attributes(), [row])["row_count"] == 1  # what a SQL node returns
    finally:
        await tx.rollback()
        await conn.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=st.lists(st.sampled_from(["$x", "$x?", "$x.a", "$x.*", "'$x'", "$$ $x $$", "/* $x */", "\"$x\"", " ",
                                     "-- $x\n", "E'\\' $x'", ",", "(", ")", "1", "SELECT", "::int", "a$x"]),
                    min_size=1, max_size=12).map(" ".join),
       value=texts)
async def test_any_rewrite_has_as_many_parameters_as_postgresql_sees(dsn: str, sql: str, value: str) -> None:
    """Whatever PostgreSQL makes of a random text (often a syntax error), it sees no value, and
    it never finds a parameter the rewrite did not bind."""
    value += "\u2603"  # a mark no fragment holds
    bound = {"x": {"rows": [{"a": value}], "row_count": 1, COLUMNS_KEY: [["a", '"pg_catalog"."text"']]}}
    try:
        text, params = rewrite(sql, bound)
    except ReferenceError_:
        return
    assert "\u2603" not in text
    conn = await _connect(dsn)
    try:
        stmt = await conn.prepare(text)
    except asyncpg.PostgresError as exc:
        assert not exc.sqlstate.startswith("XX")
        assert not re.search(r"there is no parameter \$\d", str(exc)), text
    else:
        assert len(stmt.get_parameters()) == len(params), text
    finally:
        await conn.close()


# -- 2. df.start: a graph or a clean error -------------------------------------------------------
def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


sql_strings = st.sampled_from([
    *["SELECT 1", "SELECT $x?", "SELECT $go.timed_out?", "SELECT * FROM $batch.*", "UPDATE t SET a = $x"] * 4,
    "SELECT 1", "SELECT $x", "SELECT $x?", "SELECT * FROM $x.*", "SELECT $1", "", "   ", "{", "{}", "[1]",
    '{"type": "bogus"}', '{"type": "sleep", "seconds": "abc"}', '{"type": "sleep", "seconds": 1e400}',
    '{"type": "seq", "steps": 5}', '{"type": "join", "branches": []}', '{"type": "bind", "name": "x"}',
    '{"type": "fan_out", "over": "x", "step": "SELECT 1"}', '{"type": "if_rows", "name": "x", "then": "SELECT 1"}',
    "SELECT '$x'", "SELECT 1 -- $x", "DO $$ BEGIN PERFORM $x; END $$", "x'); DROP TABLE t; --",
]).map(_q)
names = st.sampled_from([*["x", "go", "batch"] * 5, "", "1x", "a b", "é", "x'y", "$x", "NULL"]).map(
    lambda n: n if n == "NULL" else _q(n))
numbers = st.sampled_from([*["0", "1", "0.5", "30"] * 4, "-1", "1e12", "1e308", "'NaN'", "'Infinity'", "'-Infinity'",
                           "NULL", str(MAX_SECONDS), str(MAX_SECONDS + 1), "2147483648"])
crons = st.sampled_from(["* * * * *", "0 12 * * 1-5", "*/15 * * * *", "61 * * * *", "*/0 * * * *", "0 0 31 2 *",
                         "abc * * * *", "5-1 * * * *", "0 0 * * 8", "L * * * *", "", "* * * *", "0 0 29 2 *",
                         "jan * * * *", "0 0 1 jan mon", "0 0 1 foo *", "0-59/60 * * * *", "0 0 31 4,6 *",
                         "* * * * sun-sat", "1,2,,3 * * * *"]).map(_q)
json_lits = st.sampled_from(["NULL", "'{}'", "'[1, 2]'", "'\"$x\"'", "'{\"a\": \"$x.col\"}'", "'1e400'",
                             "'" + "[" * 300 + "]" * 300 + "'", "'" + "[" * 2000 + "]" * 2000 + "'"])
methods = st.sampled_from(["'GET'", "'post'", "'TRACE'", "NULL", "''"])
urls = st.sampled_from(["'https://h/x'", "'ftp://h'", "'$x'", "'{v}'", "NULL", "''"])


def _dsl(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda a, op, b: f"({a} {op} {b})", inner, st.sampled_from(["~>", "&", "|", "?>", "!>"]), inner),
        st.builds(lambda a, op, b, c: f"({a} {op} {b} ~> {c})", inner, st.sampled_from(["&", "|", "?>"]), inner,
                  inner),
        st.builds(lambda a, n: f"({a} |=> {n})", inner, names),
        st.builds(lambda a: f"(@> {a})", inner),
        st.builds(lambda a: f"df.loop({a})", inner),
        st.builds(lambda a, b, c: f"df.loop({a}, {b}, {c})", inner, inner, st.sampled_from(["true", "false", "NULL"])),
        st.builds(lambda a, b: f"df.seq({a}, {b})", inner, inner),
        st.builds(lambda a, b, c: f"df.seq({a}, {b}, {c})", inner, inner, inner),
        st.builds(lambda a, b, c: f"df.join3({a}, {b}, {c})", inner, inner, inner),
        st.builds(lambda a, b: f"df.join({a}, {b})", inner, inner),
        st.builds(lambda a, b: f"df.race({a}, {b})", inner, inner),
        st.builds(lambda a, b, c: f"df.if({a}, {b}, {c})", inner, inner, inner | st.just("NULL")),
        st.builds(lambda n, a: f"df.if_rows({n}, {a})", names, inner),
        st.builds(lambda a, n: f"df.as({a}, {n})", inner, names),
    )


leaves_ = st.one_of(
    sql_strings,
    st.builds(lambda s: f"df.sql({s})", sql_strings),
    st.builds(lambda n: f"df.sleep({n})", numbers),
    st.builds(lambda n, t: f"df.wait_for_signal({n}, {t})", names, numbers),
    st.builds(lambda n: f"df.wait_for_signal({n})", names),
    st.just("df.break()"),
    st.builds(lambda v: f"df.break({v})", json_lits),
    st.builds(lambda c: f"df.wait_for_schedule({c})", crons),
    st.builds(lambda n, i: f"df.call({n}, {i})", names, json_lits),
    st.builds(lambda u, m: f"df.http({u}, {m})", urls, methods),
)
leaves = st.integers(0, 49).flatmap(lambda n: st.just("NULL") if n == 0 else leaves_)
expressions = st.recursive(leaves, _dsl, max_leaves=12)


def _chain(depth: int, op: str) -> str:
    expr = "'SELECT 0'"
    for i in range(depth):
        expr = f"df.loop({expr})" if op == "loop" else f"({expr} {op} 'SELECT {i}')"
    return expr


async def _start(dsn: str, expr: str, *args: Any) -> str | asyncpg.PostgresError:
    """``SELECT df.start(expr)`` in a transaction that is rolled back; the id, or the clean error."""
    conn = await _connect(dsn)
    outcome: str | asyncpg.PostgresError
    graph: Any = None
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            outcome = await conn.fetchval(f"SELECT df.start({expr})", *args)
            graph = await conn.fetchval("SELECT input->>'graph' FROM pgdurable.instances WHERE instance_id = $1",
                                        outcome)
        except asyncpg.PostgresError as exc:
            outcome = exc
        finally:
            await tx.rollback()
        assert await conn.fetchval("SELECT 1") == 1  # the session survived
    finally:
        await conn.close()
    if isinstance(outcome, asyncpg.PostgresError):
        event(f"error: {re.sub(r'[0-9]+', 'N', str(outcome))[:50]}")
        assert outcome.sqlstate != "57014", f"df.start timed out on {expr[:200]}"
        assert not outcome.sqlstate.startswith("XX"), f"internal error {outcome.sqlstate}: {outcome}"
        assert str(outcome), "an error without a message"
        return outcome
    assert isinstance(outcome, str) and re.fullmatch(r"[0-9a-f]{8}", outcome), outcome
    event("started")
    try:  # what df.start accepted, the worker runs: its compiler must agree
        compile_graph(orjson.loads(graph))
    except GraphError as exc:
        raise AssertionError(f"df.start accepted a graph the worker refuses ({exc}): {graph[:300]}") from None
    return outcome


@DB_FUZZ
@given(expr=expressions)
@example(expr="df.sleep('NaN')")
@example(expr="df.sleep(1e308)")
@example(expr="df.wait_for_signal('go', 'Infinity')")
@example(expr="df.wait_for_schedule('0 0 31 2 *')")
@example(expr="df.call('x', '" + "[" * 2000 + "]" * 2000 + "')")
@example(expr="df.call('x', '1e400')")
@example(expr=_chain(MAX_DEPTH + 10, "&"))
@example(expr=_chain(MAX_DEPTH + 10, "loop"))
@example(expr=_chain(MAX_DEPTH - 1, "&"))
async def test_df_start_gives_an_instance_or_a_clean_error(dsn: str, expr: str) -> None:
    await _start(dsn, expr)


@DB_FUZZ
@given(graph=graphs)
@example(graph={"type": "sleep", "seconds": "abc"})  # each of these df.start accepted, and the worker refused
@example(graph={"type": "sql"})
@example(graph={"type": "if_rows", "cond": None, "then": "SELECT 1"})
@example(graph={"type": "fan_out", "over": "x", "step": "SELECT 1", "as": None})
@example(graph={"type": "call", "name": "x", "input": "$x"})
async def test_df_start_of_random_graph_json(dsn: str, graph: Any) -> None:
    try:
        text = json.dumps(graph, allow_nan=True)
    except (ValueError, TypeError):
        return
    if "\\u0000" in text:
        return
    await _start(dsn, "$1::text", text)
