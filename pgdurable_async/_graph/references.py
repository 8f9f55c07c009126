"""Named-result references and ``{var}`` variables in SQL text.

``{var}`` (a ``df.setvar`` variable, or the system variables ``{sys_instance_id}``
and ``{sys_label}``) is replaced by its value as raw text anywhere in the
statement, as pg_durable does: variables are SQL fragments (table names, limits)
owned by the role that runs the statement.  The tokenizer (``_graph_tokens``) then
finds ``$name``, ``$name.column``, ``$name?``, ``$name.column?`` and ``$name.*``
outside quoted text, dollar-quoted bodies and comments, and :func:`rewrite`
replaces each with ``$1 .. $n`` (typed by a cast from text) or, for ``$name.*``,
with a parameterised ``jsonb_to_recordset`` row set: no bound result is ever part
of the statement text.

A *rows result* (what a SQL node returns) has pg_durable's shape,
``{"rows": [{column: value}], "row_count": n}``, plus the private key
:data:`COLUMNS_KEY` (``[[name, type], ...]``: the column order and types, which
jsonb storage would lose); :func:`public` drops it from what users read.  Any
other bound value is a *document* (signal, HTTP envelope, sub-workflow or
activity output).
"""

from __future__ import annotations

import re
from typing import Any

from .._base.serde import dumps
from .._store.node_store import COLUMNS_KEY
from .tokens import IDENT, TEXT_REF, Ref, needs_select, parse_ref, tokens

_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CAST_NEXT = re.compile(r"[ \t\n\r\f\v]*::")  # PostgreSQL's whitespace, then a cast
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
    """Whether ``value`` is a SQL node's result (it has ``rows`` and ``row_count``)."""
    return (isinstance(value, dict) and isinstance(value.get("rows"), list)
            and isinstance(value.get("row_count"), int))


def columns_of(value: dict[str, Any]) -> list[tuple[str, str]]:
    """[(column, type)] of a rows result, in select-list order."""
    meta = value.get(COLUMNS_KEY)
    if isinstance(meta, list):
        return [(str(c[0]), str(c[1])) for c in meta]
    rows = value["rows"]
    if not rows or not isinstance(rows[0], dict):  # a result from elsewhere: infer from the first row
        return []
    return [(k, json_type(v)) for k, v in rows[0].items()]


def public(value: Any) -> Any:
    """``value`` without the private column metadata of the rows results in it."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if k != COLUMNS_KEY}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "numeric"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return "text"


def _json(value: Any) -> str:
    """JSON text of a bound value (however deep it nests); ReferenceError_ if it has none."""
    try:
        return dumps(value)
    except (TypeError, ValueError) as exc:
        raise ReferenceError_(f"a bound value cannot be passed as JSON: {exc}") from None


def as_text(value: Any, type_name: str) -> str | None:
    """The text form of a JSON value, as PostgreSQL's input function for ``type_name`` reads it."""
    if value is None:
        return None
    if type_name.strip('"').endswith(("json", "jsonb")):
        return _json(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return _json(value)


def _missing(ref: Ref, why: str) -> tuple[Any, str]:
    if ref.null_safe:
        return None, "text"
    raise ReferenceError_(why)


def _not_null(ref: Ref, value: Any, type_name: str) -> tuple[Any, str]:
    if value is None and not ref.null_safe:
        raise ReferenceError_(f"${ref.name}{'.' + ref.column if ref.column else ''} is NULL")
    return value, type_name


def scalar(bound: dict[str, Any], ref: Ref) -> tuple[Any, str]:
    """(value, type) that ``$name`` / ``$name.column`` (``?``: null-safe) stands for."""
    if ref.name not in bound:
        return _missing(ref, f"${ref.name} is not bound")
    value = bound[ref.name]
    if is_rows(value):
        return _cell(value, ref)
    if ref.column is not None:
        if not isinstance(value, dict) or ref.column not in value:
            return _missing(ref, f"${ref.name} has no field {ref.column!r}")
        value = value[ref.column]
    return _not_null(ref, value, json_type(value))


def _cell(value: dict[str, Any], ref: Ref) -> tuple[Any, str]:
    """Column ``ref.column`` (or the first column) of the first row of a rows result."""
    if not value["rows"]:
        return _missing(ref, f"${ref.name} has no rows")
    row = value["rows"][0]
    types = dict(columns_of(value))
    if not types:
        raise ReferenceError_(f"${ref.name} has no columns")
    if ref.column is None or ref.column in types:
        column = ref.column or next(iter(types))
        return _not_null(ref, row.get(column), types[column])
    first = row.get(next(iter(types))) if len(types) == 1 else None
    if isinstance(first, dict) and ref.column in first:  # a field of a composite / JSON column
        return _not_null(ref, first[ref.column], json_type(first[ref.column]))
    raise ReferenceError_(f"${ref.name} has no column {ref.column!r} (columns: {', '.join(types)})")


def rowset(bound: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(rows as objects, [(column, type)]) that ``$name.*`` stands for."""
    if name not in bound:
        raise ReferenceError_(f"${name} is not bound")
    value = bound[name]
    if is_rows(value):
        return list(value["rows"]), columns_of(value)
    items = value if isinstance(value, list) else [value]
    objects = [v if isinstance(v, dict) else {"value": v} for v in items]
    columns: dict[str, str] = {}
    for obj in objects:
        for key, cell in obj.items():
            if cell is not None or key not in columns:
                columns[key] = json_type(cell) if cell is not None else columns.get(key, "text")
    return objects, list(columns.items())


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _type(type_name: str) -> str:
    if not _SAFE_TYPE.match(type_name):
        raise ReferenceError_(f"unsupported column type {type_name!r}")
    return type_name


# -- variables ----------------------------------------------------------------------------
def substitute_vars(text: str, variables: dict[str, str]) -> str:
    """``{name}`` replaced by its value as raw text, in one left-to-right pass, as in pg_durable.

    Braces around an unknown name stay as written, and an inserted value is not
    scanned again.  Unlike pg_durable, a ``{`` before something that is not an
    identifier is skipped alone, so ``{"id": "{user}"}`` substitutes ``{user}``.
    """
    out: list[str] = []
    pos = 0
    for m in _VAR.finditer(text):
        value = variables.get(m[1])
        if value is not None:
            out.append(text[pos:m.start()])
            out.append(value)
            pos = m.end()
    out.append(text[pos:])
    return "".join(out)


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
    """``sql`` with ``{var}`` variables substituted and references replaced by bind parameters.

    Returns the statement and its parameters (text, or None for NULL).
    """
    sql = substitute_vars(sql, variables or {})
    params = _Params()
    out: list[str] = []
    spans = list(tokens(sql))
    if needs_select(sql):
        out.append("SELECT ")
    for pos, (kind, s, e) in enumerate(spans):
        piece = sql[s:e]
        if kind == "param":
            raise ReferenceError_(f"positional parameter {piece} is not allowed; use $name references")
        if kind != "ref":
            out.append(piece)
            continue
        ref = parse_ref(sql, s, e)
        if ref.column == "*":
            out.append(_rowset_sql(bound, ref, params, _needs_alias(spans, pos, sql)))
            continue
        value, type_name = scalar(bound, ref)
        type_name = _type(type_name)
        k = params.add(("ref", ref.name, ref.column, ref.null_safe), as_text(value, type_name))
        out.append(f"(${k}::text)" if _CAST_NEXT.match(sql, e) else f"(${k}::text::{type_name})")
    return "".join(out), params.values


def _needs_alias(spans: list[tuple[str, int, int]], pos: int, sql: str) -> bool:
    for i in range(pos + 1, len(spans)):  # by index: a slice of the spans per reference would be quadratic
        kind, s, e = spans[i]
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
    k = params.add(("rows", ref.name), _json(rows))
    if not columns:
        inner = f"(SELECT NULL WHERE false AND ${k}::text IS NOT NULL)"
    else:
        defs = ", ".join(f"{_quote_ident(c)} {_type(t)}" for c, t in columns)
        inner = f"(SELECT * FROM jsonb_to_recordset(${k}::text::jsonb) AS r({defs}))"
    return f"{inner} AS {_quote_ident(ref.name)}" if alias else inner


def substitute_text(text: str, bound: dict[str, Any], variables: dict[str, str] | None = None) -> str:
    """``{var}`` then ``$name`` substitution in non-SQL text (HTTP URL, body, headers)."""

    def ref_value(m: re.Match[str]) -> str:
        ref = Ref(m[1], m[2], bool(m[3]), m.start(), m.end())
        if ref.column == "*":
            return _json(rowset(bound, ref.name)[0])
        value, _ = scalar(bound, ref)
        if value is None:
            return "null"
        return value if isinstance(value, str) else _json(value)

    return TEXT_REF.sub(ref_value, substitute_vars(text, variables or {}))
