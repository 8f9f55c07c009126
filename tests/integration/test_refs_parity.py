"""One truth for the ``$name`` tokenizer: Python's ``references()`` and SQL's ``df._refs()`` agree.

Both implementations find ``$name`` references in SQL text outside quoted strings, quoted
identifiers, dollar-quoted bodies and comments.  The worker substitutes what the Python one
finds; ``df.start`` validates with what the SQL one finds, so they must find the same.

Every input below runs through both, and both must give the expected value written beside it.
Expected values follow PostgreSQL's own lexer (src/backend/parser/scan.l, with
standard_conforming_strings on):

* ``'...'`` ends at the first lone quote (``''`` is a quote; a backslash is an ordinary
  character); ``E'...'`` also takes backslash escapes, and the ``E`` must be a token of its own
  (in ``a$e'...'`` the ``e`` ends the identifier ``a$e`` and the string is a standard one);
* identifiers start with a letter, ``_`` or any non-ASCII character and continue with those,
  digits and ``$``: a ``$`` inside an identifier (``a$b``, ``café$x``, ``€$x``) is no reference;
* dollar-quote tags are made of the same characters but ``$`` (so ``$é$`` is a tag);
* ``--`` comments end at a newline, which is ``\\n`` or ``\\r``; ``/* */`` comments nest.

The reference grammar itself is pgdurable's: ``$name``, ``$name?``, ``$name.column``,
``$name.column?`` and ``$name.*`` (no ``?`` after ``.*``: a row set is never null-safe), names
being ASCII ``[A-Za-z_][A-Za-z0-9_]*``.  A positional parameter (``$1``) is refused by both:
the SQL function raises, the Python tokenizer yields a ``param`` token that the worker's
rewrite refuses (``POSITIONAL`` below).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from pgdurable_async._graph.tokens import references, tokens

Outcome = list[tuple[str, bool]] | str
POSITIONAL = "positional parameter refused"


def r(name: str, null_safe: bool = False) -> tuple[str, bool]:
    return (name, null_safe)


CASES: list[tuple[str, Outcome]] = [
    # plain references, order and repeats
    ("", []),
    ("SELECT 1", []),
    ("$x", [r("x")]),
    ("SELECT $x, $y", [r("x"), r("y")]),
    ("SELECT $a + $b * $a", [r("a"), r("b"), r("a")]),
    ("SELECT $X, $x, $_private, $x1", [r("X"), r("x"), r("_private"), r("x1")]),
    # the reference forms
    ("SELECT $x.col", [r("x")]),
    ("SELECT $x?", [r("x", True)]),
    ("SELECT $x.col?", [r("x", True)]),
    ("SELECT * FROM $x.*", [r("x")]),
    ("SELECT * FROM $x.*?", [r("x")]),  # `?` after `.*` is SQL's own operator, not null-safety
    ("SELECT $x.col.sub, $y.\"Col\"", [r("x"), r("y")]),
    ("SELECT $x.?", [r("x")]),
    ("SELECT $x::int + $y::jsonb->>'k'", [r("x"), r("y")]),
    ("SELECT ($x)||$y-$z, -$w", [r("x"), r("y"), r("z"), r("w")]),
    ("SELECT $x--c\n, $y/*c*/$z", [r("x"), r("y"), r("z")]),
    ("SELECT $, $ x", []),
    # positional parameters
    ("SELECT $1", POSITIONAL),
    ("SELECT $x, $12", POSITIONAL),
    # `$` inside identifiers
    ("SELECT a$b, x1$y", []),
    ("SELECT café$x, $y", [r("y")]),
    ("SELECT €$x, $y", [r("y")]),
    # single-quoted strings
    ("SELECT '$x'", []),
    ("SELECT 'it''s $x', $y", [r("y")]),
    ("SELECT 'a\\', $x", [r("x")]),  # a backslash does not escape in a standard string
    ("'\\' || $x", [r("x")]),  # ... not even in one that opens the text
    ("'abc' || $x", [r("x")]),
    ("SELECT U&'\\', $x", [r("x")]),
    ("SELECT x'1F', b'01', n'$y', $z", [r("z")]),
    ("SELECT 'unterminated $x", []),
    # E'' strings
    ("SELECT E'\\'' || $x", [r("x")]),
    ("SELECT E'\\' $x'", []),
    ("SELECT e'\\\\', $x", [r("x")]),
    ("SELECT E'it''s $x', $y", [r("y")]),
    ("SELECT a$e'\\', $x", [r("x")]),  # `a$e` is an identifier: a standard string follows
    ("SELECT 1 AS e'\\' $x'", []),  # a lone `e` before a quote opens an E'' string
    # double-quoted identifiers
    ('SELECT "$x" FROM t', []),
    ('SELECT "a""$x", $y', [r("y")]),
    ('SELECT "unterminated $x', []),
    # dollar-quoted bodies
    ("SELECT $$ $x $$, $y", [r("y")]),
    ("SELECT $tag$ $x $$ $y $tag$, $z", [r("z")]),
    ("DO $outer$ BEGIN PERFORM $inner$ $x $inner$; END $outer$; SELECT $y", [r("y")]),
    ("SELECT $x$ $y", []),  # `$x$` opens a dollar quote that never closes
    ("SELECT $$a$$$x", [r("x")]),  # the `$` after a closing `$$` starts a new token
    ("SELECT $é$ $x $é$, $y", [r("y")]),
    ("SELECT $_é$ $x $_é$, $y", [r("y")]),
    # comments
    ("SELECT 1 -- $x\n, $y", [r("y")]),
    ("SELECT 1 -- $x\r, $y", [r("y")]),  # a carriage return ends a line comment too
    ("SELECT 1 -- $x", []),
    ("SELECT /* $x /* nested $y */ still $z */ $w", [r("w")]),
    ("SELECT /* $x", []),
    ("SELECT /* a */ $x, 2-$y", [r("x"), r("y")]),
    # unicode
    ("SELECT 'héllo ☃ $x', \"naïve\", $y", [r("y")]),
    ("SELECT $xé", [r("x")]),  # a name is ASCII: it ends where the letters do
]


def python_outcome(text: str) -> Outcome:
    if any(kind == "param" for kind, _, _ in tokens(text)):
        return POSITIONAL
    return [(ref.name, ref.null_safe) for ref in references(text)]


async def sql_outcome(conn: asyncpg.Connection[Any], text: str) -> Outcome:
    try:
        rows = await conn.fetch("SELECT name, null_safe FROM df._refs($1)", text)
    except asyncpg.RaiseError as exc:
        if "positional parameters" in str(exc):
            return POSITIONAL
        raise
    return [(row["name"], row["null_safe"]) for row in rows]


def test_the_table_is_large_and_has_no_repeats() -> None:
    texts = [text for text, _ in CASES]
    assert len(texts) >= 30
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("text", [text for text, _ in CASES], ids=repr)
def test_python_spans_cover_the_text(text: str) -> None:
    """tokens() cuts the text into contiguous spans (the worker re-joins them into the statement)."""
    spans = list(tokens(text))
    assert "".join(text[s:e] for _, s, e in spans) == text
    assert all(0 <= s < e <= len(text) for _, s, e in spans)
    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:], strict=False))


async def test_both_tokenizers_give_the_expected_references(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        results = [(text, expected, python_outcome(text), await sql_outcome(conn, text)) for text, expected in CASES]
    finally:
        await conn.close()
    wrong = [row for row in results if not (row[1] == row[2] == row[3])]
    if wrong:
        pytest.fail(_report(wrong), pytrace=False)


def _report(rows: list[tuple[str, Outcome, Outcome, Outcome]]) -> str:
    def show(outcome: Outcome) -> str:
        if isinstance(outcome, str):
            return outcome
        return "[" + ", ".join(f"${n}{'?' if safe else ''}" for n, safe in outcome) + "]"

    def lines() -> Iterator[str]:
        yield f"{len(rows)} of {len(CASES)} inputs give an unexpected result:"
        for text, expected, python, sql in rows:
            yield f"  {text!r}"
            for label, got, blame in (("expected", expected, None), ("python", python, expected),
                                      ("sql", sql, expected)):
                mark = "" if blame is None or got == blame else "   <- wrong"
                yield f"      {label:<8} {show(got)}{mark}"

    return "\n".join(lines())
