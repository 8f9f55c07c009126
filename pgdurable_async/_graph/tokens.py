"""The SQL tokenizer behind named-result references.

It walks SQL text, skipping single-quoted strings (with ``E''`` escapes),
double-quoted identifiers, dollar-quoted bodies and comments, and finds
``$name``, ``$name.column``, ``$name?``, ``$name.column?`` and ``$name.*``
references (and ``$1``-style positional parameters, which graphs may not use).

Quotes, comments and identifiers follow PostgreSQL's lexer (``scan.l``, with
standard_conforming_strings on): identifiers (which may hold ``$``, as in ``a$b``) start
with a letter, ``_`` or any non-ASCII character; dollar-quote tags use the same characters
but ``$``; ``E'...'`` needs its ``E`` to be a token of its own; a ``--`` comment ends at
``\n`` or ``\r``.  ``df._refs`` in the schema is the SQL twin of this tokenizer, and
tests/integration/test_refs_parity.py holds both to one table of cases.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = frozenset("0123456789")
TEXT_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*|\*))?(\?)?")
_STATEMENT_WORDS = frozenset(
    "select with values table insert update delete merge call create alter drop truncate grant revoke do "
    "set reset lock analyze vacuum refresh comment notify explain copy declare prepare execute listen "
    "unlisten reindex cluster discard security import show checkpoint load savepoint release".split()
)


@dataclass(frozen=True)
class Ref:
    name: str
    column: str | None  # None, a column name, or "*"
    null_safe: bool
    start: int
    end: int


# -- tokenizer ---------------------------------------------------------------------------
def _ident_char(c: str, *, first: bool = False) -> bool:
    """PostgreSQL's ident_start (``first``) / ident_cont: letters, ``_``, non-ASCII; then digits and ``$``."""
    if not c.isascii():
        return True
    return c.isalpha() or c == "_" or (not first and (c.isdigit() or c == "$"))


def _quoted_end(sql: str, i: int, quote: str, backslash: bool) -> int:
    """End of the quoted text whose opening ``quote`` is just before ``i`` (the text's end if unterminated)."""
    n = len(sql)
    while i < n:
        if backslash and sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if not sql.startswith(quote, i + 1):
                return i + 1
            i += 2  # a doubled quote stands for itself
        else:
            i += 1
    return n


def tokens(sql: str) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) spans: code, string, estring, ident, dollar, comment, ref, param.

    The spans are contiguous and cover ``sql``.
    """
    i, n, code_start = 0, len(sql), 0

    def flush(upto: int) -> Iterator[tuple[str, int, int]]:
        if upto > code_start:
            yield ("code", code_start, upto)

    while i < n:  # i is always at the start of a token, never inside an identifier
        c = sql[i]
        if c == "'" or (c in "eE" and sql.startswith("'", i + 1)):
            escaped = c != "'"
            yield from flush(i)
            end = _quoted_end(sql, i + (2 if escaped else 1), "'", escaped)
            yield ("estring" if escaped else "string", i, end)
            i = code_start = end
        elif c == '"':
            yield from flush(i)
            end = _quoted_end(sql, i + 1, '"', False)
            yield ("ident", i, end)
            i = code_start = end
        elif c == "-" and sql.startswith("--", i):
            yield from flush(i)
            end = i + 2
            while end < n and sql[end] not in "\n\r":
                end += 1
            yield ("comment", i, end)
            i = code_start = end
        elif c == "/" and sql.startswith("/*", i):
            yield from flush(i)
            start, depth = i, 0
            while i < n:
                if sql.startswith("/*", i):
                    depth += 1
                    i += 2
                elif sql.startswith("*/", i):
                    depth -= 1
                    i += 2
                    if depth == 0:
                        break
                else:
                    i += 1
            yield ("comment", start, i)
            code_start = i
        elif c == "$":
            tag_end = i + 1
            if tag_end < n and _ident_char(sql[tag_end], first=True):
                tag_end += 1
                while tag_end < n and sql[tag_end] != "$" and _ident_char(sql[tag_end]):
                    tag_end += 1
            match = IDENT.match(sql, i + 1)
            if tag_end < n and sql[tag_end] == "$":  # $$ or $tag$: a dollar-quoted body
                tag = sql[i:tag_end + 1]
                yield from flush(i)
                close = sql.find(tag, tag_end + 1)
                end = n if close < 0 else close + len(tag)
                yield ("dollar", i, end)
                i = code_start = end
            elif match:
                yield from flush(i)
                end = _ref_end(sql, match.end())
                yield ("ref", i, end)
                i = code_start = end
            elif i + 1 < n and sql[i + 1] in _DIGITS:
                yield from flush(i)
                j = i + 1
                while j < n and sql[j] in _DIGITS:
                    j += 1
                yield ("param", i, j)
                i = code_start = j
            else:
                i += 1
        elif _ident_char(c, first=True):  # an identifier or keyword: any `$` in it is its own
            i += 1
            while i < n and _ident_char(sql[i]):
                i += 1
        else:
            i += 1
    yield from flush(n)


def _ref_end(sql: str, i: int) -> int:
    if i < len(sql) and sql[i] == ".":
        if i + 1 < len(sql) and sql[i + 1] == "*":
            return i + 2
        match = IDENT.match(sql, i + 1)
        if match:
            i = match.end()
    if i < len(sql) and sql[i] == "?":
        i += 1
    return i


def parse_ref(text: str, start: int, end: int) -> Ref:
    match = TEXT_REF.fullmatch(text, start, end)
    assert match is not None
    return Ref(match[1], match[2], bool(match[3]), start, end)


def references(text: str, *, sql: bool = True) -> list[Ref]:
    """The ``$name`` references of ``text`` (in SQL, outside quotes and comments)."""
    if not sql:
        return [Ref(m[1], m[2], bool(m[3]), m.start(), m.end()) for m in TEXT_REF.finditer(text)]
    return [parse_ref(text, s, e) for kind, s, e in tokens(text) if kind == "ref"]


def needs_select(sql: str) -> bool:
    """True when ``sql`` is an expression (``$x.done``, ``1 > 0``) rather than a statement."""
    for kind, s, e in tokens(sql):
        if kind == "comment":
            continue
        if kind != "code":
            return True
        head = sql[s:e].lstrip()
        if not head:
            continue
        if head[0] == "(":
            return False
        word = IDENT.match(head)
        return word is None or word[0].lower() not in _STATEMENT_WORDS
    return False
