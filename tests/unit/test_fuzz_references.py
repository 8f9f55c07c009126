"""Fuzzing the reference rewriter: a bound value never changes the statement.

``rewrite(sql, bound)`` turns ``$name``, ``$name.col``, ``$name?``, ``$name.col?`` and
``$name.*`` references into bind parameters.  Random SQL-ish texts (keywords, quoted strings
with ``''`` and ``E'\\''`` escapes, quoted identifiers, ``$$`` and ``$tag$`` bodies, nested
comments, references, positional parameters, and raw random text) are rewritten against
random bound values (strings full of quotes, semicolons, ``$$``, ``--``, ``/*``, unicode;
numbers; nested JSON; row sets), each drawn twice for one *shape* (the result kinds, column
names and types, row counts and which cells are NULL: what a statement may depend on).

(a) The statement text depends on the shape only: both value assignments give the same text,
    and the same number of parameters.  (The columns of a row set ``$name.*`` over documents
    are their keys: shape.  They enter the statement as quoted identifiers.)
(b) Every value appears only in the parameters: a marker carried by each string value is in
    some parameter and never in the statement, except inside a quoted identifier (a column
    name of a row set, such as ``k☃mark"); DROP TABLE t; --``).
(c) ``rewrite`` returns or raises ``ReferenceError_``, nothing else, and never takes long.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgdurable_async._graph.references import COLUMNS_KEY, ReferenceError_, rewrite
from pgdurable_async._graph.tokens import tokens

MARK = "\u2603mark"  # carried by every string value; no SQL text below contains it
NAMES = ["x", "y", "batch", "sig", "doc"]
COLUMNS = ["a", "b", "id", "Mixed", 'q"uote', "sp ace", "_c1", f'k{MARK}"); DROP TABLE t; --']
TYPES = ["integer", "text", "jsonb", "json", "numeric", "boolean", "character varying", "bigint",
         "timestamp with time zone", '"public"."my type"', "int); DROP TABLE t; --", '"x""y"', "INT"]


# -- SQL-ish text -------------------------------------------------------------------------------
def _quoted(body: str, quote: str) -> str:
    return quote + body.replace(quote, quote * 2) + quote


nasty = st.sampled_from(["'", "''", '"', "$$", "$x", "$x$", "$1", "--", "/*", "*/", ";", "\\", "\\'", "\n", "\r",
                         " ", "é", "€", "☃", "{v}", "?", ".", "*", "e'", "E'"])
body_text = st.lists(st.one_of(nasty, st.text(max_size=6).filter(lambda s: MARK not in s)), max_size=8).map("".join)
references_ = st.builds(
    lambda name, form: f"${name}{form}",
    st.sampled_from(NAMES * 4 + ["unbound", "X"]),
    st.sampled_from(["", "", "", "?", "?", ".a", ".a?", ".a?", ".b?", ".id", ".missing?", ".*", ".*", ".Mixed?",
                     ".signal_name?", ".data?", ".timed_out?", "::int", "::text", ".a::jsonb", "?::text"]),
)
code = st.sampled_from([
    "SELECT ", "select ", "WITH t AS (SELECT 1) ", "FROM ", "WHERE ", " AND ", ", ", "(", ")", " = ", " + ", "||",
    "->>", "::int", "::jsonb", "1", "a$b", "x1", "e", "E", "U&", " AS t", " ", "\n", "\t", "-", "/", "*", ";", "$",
    "$ ", "INSERT INTO t VALUES ", "UPDATE t SET a = ", "DO ", " ORDER BY 1", " LIMIT ", "café$x", "a$e'\\'",
])
quoted = st.one_of(
    st.builds(lambda b: _quoted(b, "'"), body_text),
    st.builds(lambda b: "E'" + b.replace("\\", "\\\\").replace("'", "\\'") + "'", body_text),
    st.builds(lambda b: _quoted(b, '"'), body_text),
    st.builds(lambda b: f"$$ {b.replace('$$', '')} $$", body_text),
    st.builds(lambda t, b: f"${t}$ {b.replace(f'${t}$', '')} ${t}$", st.sampled_from(["tag", "q", "_é", "a1"]),
              body_text),
    st.builds(lambda b: "--" + b.replace("\n", " ").replace("\r", " ") + "\n", body_text),
    st.builds(lambda b: "/*" + b.replace("*/", "").replace("/*", "") + "*/", body_text),
    st.builds(lambda a, b: f"/* {a.replace('*/', '')} /* {b.replace('*/', '')} */ */", body_text, body_text),
)
unterminated = st.sampled_from(["'unterminated ", '"unterminated ', "/* unterminated ", "$$ unterminated ",
                                "-- to the end", "$tag$ unterminated"])
raw = st.text(max_size=10).filter(lambda s: MARK not in s)


def _fragment(n: int) -> st.SearchStrategy[str]:
    """Weighted: mostly code, references and quoted text; rarely what ends or refuses the rest."""
    if n < 30:
        return code
    if n < 60:
        return references_
    if n < 90:
        return quoted
    if n < 95:
        return raw
    if n < 98:
        return unterminated
    return st.sampled_from(["$1", "$12"])


fragments = st.integers(0, 99).flatmap(_fragment)
sql_texts = st.lists(fragments, min_size=1, max_size=25).map("".join)


# -- shapes and values ------------------------------------------------------------------------------
# A shape: ("rows", [(column, type)], [[is_null, ...] per row]) | ("doc", {field: kind}) | ("list", [...])
# | ("scalar", kind).  A kind is the JSON type: text, int, float, bool, json, null.
kinds = st.sampled_from(["text", "int", "float", "bool", "json", "null"])
row_shapes = st.builds(
    lambda cols, rows: ("rows", cols, [[n for n in row[:len(cols)]] for row in rows]),
    st.lists(st.tuples(st.sampled_from(COLUMNS), st.sampled_from(TYPES[:8] * 3 + TYPES[8:])), min_size=0,
             max_size=4, unique_by=lambda c: c[0]),
    st.lists(st.lists(st.booleans(), min_size=4, max_size=4), max_size=3),
)
doc_shapes = st.builds(lambda fields: ("doc", fields), st.dictionaries(st.sampled_from(COLUMNS + ["data"]), kinds,
                                                                       max_size=4))
signal_shapes = st.builds(lambda k, timed_out: ("doc", {"signal_name": "text", "timed_out": "bool", "data": k}),
                          kinds, st.booleans())
list_shapes = st.builds(lambda items: ("list", items),
                        st.lists(st.one_of(doc_shapes, kinds.map(lambda k: ("scalar", k))), max_size=3))
shapes = st.one_of(row_shapes, doc_shapes, signal_shapes, list_shapes, kinds.map(lambda k: ("scalar", k)))
bound_shapes = st.fixed_dictionaries({}, optional={name: shapes for name in NAMES}).filter(lambda d: len(d) >= 2)

unicode = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=8)
injections = st.sampled_from(["x'); DROP TABLE t; --", "'; SELECT pg_sleep(10); --", "$$; DROP TABLE t; $$",
                              "*/ DROP TABLE t; /*", "\\x00"])
nasty_strings = st.lists(st.one_of(nasty, injections, unicode), max_size=6).map(lambda parts: "".join(parts) + MARK)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), nasty_strings)
json_docs = st.recursive(json_leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(nasty_strings, inner, max_size=3)),
                         max_leaves=8)


def _value(draw: st.DrawFn, kind: str) -> Any:
    if kind == "null":
        return None
    if kind == "text":
        return draw(nasty_strings)
    if kind == "int":
        return draw(st.integers(-(2**63), 2**63 - 1))
    if kind == "float":
        return draw(st.floats(allow_nan=False, allow_infinity=False))
    if kind == "bool":
        return draw(st.booleans())
    # "json": a list in a list, so that its type is jsonb whatever it holds, and so that a row
    # set over it (`$x.*`) has one column "value" (an object's keys would be its columns).
    return [[draw(json_docs)]]


def _cell(draw: st.DrawFn, type_name: str, is_null: bool) -> Any:
    if is_null:
        return None
    if type_name in ("jsonb", "json"):
        return draw(json_docs.filter(lambda v: v is not None))  # JSON null reads as NULL
    if type_name in ("integer", "bigint", "numeric", "INT"):
        return draw(st.integers(-(2**63), 2**63 - 1))
    if type_name == "boolean":
        return draw(st.booleans())
    return draw(nasty_strings)


def _realize(draw: st.DrawFn, shape: tuple[Any, ...]) -> Any:
    kind = shape[0]
    if kind == "rows":
        _, cols, rows = shape
        data = [{c: _cell(draw, t, nulls[i]) for i, (c, t) in enumerate(cols)} for nulls in rows]
        return {"rows": data, "row_count": len(data), COLUMNS_KEY: [[c, t] for c, t in cols]}
    if kind == "doc":
        return {field: _value(draw, k) for field, k in shape[1].items()}
    if kind == "list":
        return [_realize(draw, item) for item in shape[1]]
    return _value(draw, shape[1])


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any]]:
    sql = draw(sql_texts)
    shape = draw(bound_shapes)
    one = {name: _realize(draw, s) for name, s in shape.items()}
    two = {name: _realize(draw, s) for name, s in shape.items()}
    return sql, one, two


def _rewrite(sql: str, bound: dict[str, Any]) -> tuple[str, list[str | None]] | ReferenceError_:
    started = time.perf_counter()
    try:
        return rewrite(sql, bound)
    except ReferenceError_ as exc:
        return exc
    finally:
        assert time.perf_counter() - started < 2.0, "rewrite took over 2 s"


def _strings(value: Any) -> list[str]:
    """The marked strings in a value (keys and values)."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and MARK in item:
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(k for k in item if k != COLUMNS_KEY)
            stack.extend(v for k, v in item.items() if k != COLUMNS_KEY)
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _nested(depth: int, leaf: str = "a") -> Any:
    value: Any = leaf + MARK
    for _ in range(depth):
        value = [value]
    return value


_PARAM = re.compile(r"\$(\d+)")

EXAMPLES = int(os.environ.get("PGDURABLE_FUZZ_EXAMPLES", "300"))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(cases())
@example(("SELECT $x", {"x": "a" + MARK}, {"x": "'); DROP TABLE t; --" + MARK}))
@example(("SELECT * FROM $x.*", {"x": [{"a": 1}]}, {"x": [{"a": 2}]}))
@example(("SELECT $x::jsonb", {"x": [[[[[[1]]]]]]}, {"x": [[[[[[2]]]]]]}))
def test_values_never_change_the_statement(case: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
    sql, one, two = case
    first, second = _rewrite(sql, one), _rewrite(sql, two)
    if isinstance(first, ReferenceError_) or isinstance(second, ReferenceError_):
        assert type(first) is type(second), f"one assignment raised, the other did not: {first!r} / {second!r}"
        return
    (text_one, params_one), (text_two, params_two) = first, second
    assert text_one == text_two  # (a) the text depends on the shape only
    assert len(params_one) == len(params_two)
    for text, params, bound in ((text_one, params_one, one), (text_two, params_two, two)):
        # (b) no value in the statement; a marked column name (a key of an object that a row
        # set `$x.*` reads: shape, not value) only as a quoted identifier
        idents = [(s, e) for kind, s, e in tokens(text) if kind == "ident"]
        at = text.find(MARK)
        while at >= 0:
            assert any(s < at < e for s, e in idents), f"a value in the statement: {text!r}"
            at = text.find(MARK, at + 1)
        assert all(p is None or isinstance(p, str) for p in params)
        used = {int(m[1]) for kind, s, e in tokens(text) if kind == "param" for m in [_PARAM.match(text, s)] if m}
        assert used <= set(range(1, len(params) + 1))
        joined = "\x00".join(p for p in params if p is not None)
        for value in _marked_values_read(sql, bound):
            assert value in joined or _json_escaped(value) in joined


def _marked_values_read(sql: str, bound: dict[str, Any]) -> list[str]:
    """Marked scalar strings that a plain ``$name`` reference of ``sql`` reads (first column, first row)."""
    out = []
    for kind, s, e in tokens(sql):
        if kind != "ref":
            continue
        ref = sql[s:e]
        name = ref[1:].rstrip("?")
        value = bound.get(name)
        if isinstance(value, str) and MARK in value:
            out.append(value)
    return out


def _json_escaped(value: str) -> str:
    import orjson

    return orjson.dumps(value).decode()[1:-1]


@pytest.mark.parametrize("depth", [300, 5000])
def test_deep_values_are_parameters_or_a_reference_error(depth: int) -> None:
    """orjson stops at 255 levels: a deep bound value raised TypeError, not ReferenceError_."""
    sql = "SELECT $x, $y.*"
    cases = ({"x": _nested(depth), "y": [{"a": _nested(depth)}]},
             {"x": _nested(depth, "b"), "y": [{"a": _nested(depth, "b")}]})
    outcomes = [_rewrite(sql, bound) for bound in cases]
    if depth < 900:
        assert not isinstance(outcomes[0], ReferenceError_) and not isinstance(outcomes[1], ReferenceError_)
        assert outcomes[0][0] == outcomes[1][0] and MARK not in outcomes[0][0]
    else:
        assert all(isinstance(o, ReferenceError_) for o in outcomes)


def _seconds(sql: str, bound: dict[str, Any]) -> float:
    started = time.perf_counter()
    rewrite(sql, bound)
    return time.perf_counter() - started


@pytest.mark.parametrize("piece", ["$x ", "$x.* "])
def test_many_references_rewrite_in_linear_time(piece: str) -> None:
    """Each reference once looked at the whole rest of the statement: 640,000 took minutes, not seconds.

    A statement may be megabytes long (the payload limit is 4 MiB), and the rewrite runs inside
    a turn, blocking the worker's event loop; 8 times the references must cost about 8 times
    the time, not 64 times.
    """
    bound = {"x": {"rows": [{"a": 1}], "row_count": 1, COLUMNS_KEY: [["a", "integer"]]}}
    small = min(_seconds("SELECT " + piece * 12_500, bound) for _ in range(3))
    large = _seconds("SELECT " + piece * 100_000, bound)
    assert large < 24 * small + 0.05, f"{large:.2f} s for 100,000 references, {small:.3f} s for 12,500"
