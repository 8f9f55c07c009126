"""Named-result references in SQL text, rewritten to bind parameters.

The tokenizer (``_graph_tokens``) finds ``$name``, ``$name.column``,
``$name?``, ``$name.column?`` and ``$name.*`` outside quoted text, dollar-quoted
bodies and comments.  :func:`rewrite` replaces each with ``$1 .. $n`` (typed by a cast
from text) or, for ``$name.*``, with a parameterised ``jsonb_to_recordset``
row set; ``{var}`` variables (``df.setvar``) become parameters too, even inside
string literals (the literal is split into a concatenation).  No bound value is
ever part of the statement text, so quotes in a value cannot change it.

A *rows result* (what a SQL node returns) is ``{"columns": [{"name", "type"}],
"rows": [[...]], "command", "rowcount"}``; any other bound value is a *document*
(signal, HTTP envelope, sub-workflow or activity output).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ._graph_tokens import IDENT, TEXT_REF, Ref, needs_select, parse_ref, tokens

_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SAFE_TYPE = re.compile(r'^(?:"[^"\x00]+"\.)?"[^"\x00]+"$|^[a-z][a-z0-9_ ]*$')
# Words that may follow a FROM item when the user wrote no alias for ``$name.*``.
_AFTER_FROM_ITEM = frozenset(
    "where group order limit offset join left right inner full cross natural on using union except "
    "intersect window having fetch for returning".split()
)


class ReferenceError_(Exception):  # noqa: N801 - internal, wrapped into GraphError by callers
    """A reference cannot be resolved against the bound results."""


# -- values ----------------------------------------------------------------------------
def is_rows(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("columns"), list) and isinstance(value.get("rows"), list)


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "numeric"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return "text"


def as_text(value: Any, type_name: str) -> str | None:
    """The text form of a JSON value, as PostgreSQL's input function for ``type_name`` reads it."""
    if value is None:
        return None
    if type_name.strip('"').endswith(("json", "jsonb")):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return orjson.dumps(value).decode()


def scalar(bound: dict[str, Any], ref: Ref) -> tuple[Any, str]:
    """(value, type) that ``$name`` / ``$name.column`` (``?``: null-safe) stands for."""
    if ref.name not in bound:
        if ref.null_safe:
            return None, "text"
        raise ReferenceError_(f"${ref.name} is not bound")
    value = bound[ref.name]
    if is_rows(value):
        cols = [c["name"] for c in value["columns"]]
        if not value["rows"]:
            if ref.null_safe:
                return None, "text"
            raise ReferenceError_(f"${ref.name} has no rows")
        index = 0
        if ref.column is not None:
            if ref.column not in cols:
                first = value["rows"][0][0] if len(cols) == 1 else None
                if isinstance(first, dict) and ref.column in first:  # a field of a composite / JSON column
                    cell = first[ref.column]
                    if cell is None and not ref.null_safe:
                        raise ReferenceError_(f"${ref.name}.{ref.column} is NULL")
                    return cell, json_type(cell)
                raise ReferenceError_(f"${ref.name} has no column {ref.column!r} (columns: {', '.join(cols)})")
            index = cols.index(ref.column)
        elif not cols:
            raise ReferenceError_(f"${ref.name} has no columns")
        cell = value["rows"][0][index]
        if cell is None and not ref.null_safe:
            raise ReferenceError_(f"${ref.name}{'.' + ref.column if ref.column else ''} is NULL")
        return cell, str(value["columns"][index]["type"])
    if ref.column is not None:
        if not isinstance(value, dict) or ref.column not in value:
            if ref.null_safe:
                return None, "text"
            raise ReferenceError_(f"${ref.name} has no field {ref.column!r}")
        value = value[ref.column]
    if value is None and not ref.null_safe:
        raise ReferenceError_(f"${ref.name}{'.' + ref.column if ref.column else ''} is NULL")
    return value, json_type(value)


def rowset(bound: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(rows as objects, [(column, type)]) that ``$name.*`` stands for."""
    if name not in bound:
        raise ReferenceError_(f"${name} is not bound")
    value = bound[name]
    if is_rows(value):
        names = _unique([c["name"] for c in value["columns"]])
        types = [str(c["type"]) for c in value["columns"]]
        return [dict(zip(names, row, strict=False)) for row in value["rows"]], list(zip(names, types, strict=True))
    items = value if isinstance(value, list) else [value]
    objects = [v if isinstance(v, dict) else {"value": v} for v in items]
    columns: dict[str, str] = {}
    for obj in objects:
        for key, cell in obj.items():
            if cell is not None or key not in columns:
                columns[key] = json_type(cell) if cell is not None else columns.get(key, "text")
    return objects, list(columns.items())


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _type(type_name: str) -> str:
    if not _SAFE_TYPE.match(type_name):
        raise ReferenceError_(f"unsupported column type {type_name!r}")
    return type_name


# -- rewriting ----------------------------------------------------------------------------
class _Params:
    def __init__(self) -> None:
        self.values: list[str | None] = []
        self._index: dict[tuple[Any, ...], int] = {}

    def add(self, key: tuple[Any, ...], value: str | None) -> int:
        if key not in self._index:
            self.values.append(value)
            self._index[key] = len(self.values)
        return self._index[key]


def rewrite(sql: str, bound: dict[str, Any], variables: dict[str, str] | None = None) -> tuple[str, list[str | None]]:
    """``sql`` with references and ``{var}`` variables replaced by bind parameters.

    Returns the statement and its parameters (text, or None for NULL).
    """
    variables = variables or {}
    params = _Params()
    out: list[str] = []
    spans = list(tokens(sql))
    if needs_select(sql):
        out.append("SELECT ")
    for pos, (kind, s, e) in enumerate(spans):
        piece = sql[s:e]
        if kind == "param":
            raise ReferenceError_(f"positional parameter {piece} is not allowed; use $name references")
        if kind == "ref":
            ref = parse_ref(sql, s, e)
            following = sql[e:].lstrip()
            if ref.column == "*":
                out.append(_rowset_sql(bound, ref, params, _needs_alias(spans, pos, sql)))
                continue
            value, type_name = scalar(bound, ref)
            type_name = _type(type_name)
            k = params.add(("ref", ref.name, ref.column, ref.null_safe), as_text(value, type_name))
            out.append(f"(${k}::text)" if following.startswith("::") else f"(${k}::text::{type_name})")
        elif kind in ("code",):
            out.append(_VAR.sub(lambda m: _var_param(m, variables, params, literal=None), piece))
        elif kind in ("string", "estring"):
            out.append(_literal_with_vars(piece, kind == "estring", variables, params))
        else:
            out.append(piece)
    return "".join(out), params.values


def _var_param(match: re.Match[str], variables: dict[str, str], params: _Params, literal: str | None) -> str:
    name = match[1]
    if name not in variables:
        return match[0]
    k = params.add(("var", name), variables[name])
    return f"(${k}::text)"


def _literal_with_vars(piece: str, escaped: bool, variables: dict[str, str], params: _Params) -> str:
    body = piece[2:-1] if escaped else piece[1:-1]
    if not any(m[1] in variables for m in _VAR.finditer(body)):
        return piece
    prefix = "E'" if escaped else "'"
    parts: list[str] = []
    last = 0
    for m in _VAR.finditer(body):
        if m[1] not in variables:
            continue
        parts.append(f"{prefix}{body[last:m.start()]}'")
        parts.append(f"(${params.add(('var', m[1]), variables[m[1]])}::text)")
        last = m.end()
    parts.append(f"{prefix}{body[last:]}'")
    return "(" + " || ".join(parts) + ")"


def _needs_alias(spans: list[tuple[str, int, int]], pos: int, sql: str) -> bool:
    for kind, s, e in spans[pos + 1:]:
        if kind == "comment":
            continue
        if kind == "ident":
            return False
        text = sql[s:e].lstrip()
        if not text:
            continue
        word = IDENT.match(text)
        if word is None:
            return True
        return word[0].lower() in _AFTER_FROM_ITEM
    return True


def _rowset_sql(bound: dict[str, Any], ref: Ref, params: _Params, alias: bool) -> str:
    rows, columns = rowset(bound, ref.name)
    k = params.add(("rows", ref.name), orjson.dumps(rows).decode())
    if not columns:
        inner = f"(SELECT NULL WHERE false AND ${k}::text IS NOT NULL)"
    else:
        defs = ", ".join(f"{_quote_ident(c)} {_type(t)}" for c, t in columns)
        inner = f"(SELECT * FROM jsonb_to_recordset(${k}::text::jsonb) AS r({defs}))"
    return f"{inner} AS {_quote_ident(ref.name)}" if alias else inner


def substitute_text(text: str, bound: dict[str, Any], variables: dict[str, str] | None = None) -> str:
    """``$name`` / ``{var}`` substitution in non-SQL text (HTTP URL, body, headers)."""

    def ref_value(m: re.Match[str]) -> str:
        ref = Ref(m[1], m[2], bool(m[3]), m.start(), m.end())
        if ref.column == "*":
            return orjson.dumps(rowset(bound, ref.name)[0]).decode()
        value, _ = scalar(bound, ref)
        if value is None:
            return "null"
        return value if isinstance(value, str) else orjson.dumps(value).decode()

    variables = variables or {}
    text = TEXT_REF.sub(ref_value, text)
    return _VAR.sub(lambda m: variables.get(m[1], m[0]), text)
