"""Running a graph's SQL node: the statement as the submitting role, its rows as pg_durable's result shape."""

from __future__ import annotations

import datetime as _dt
import decimal
import math
import uuid
from typing import Any

import asyncpg

from .._base.errors import PgDurableError
from .database import Connection
from .sql_loader import q

#: The private key of a rows result holding ``[[column, type], ...]`` (order and types jsonb would lose).
COLUMNS_KEY = "_pgdurable_columns"


class RoleChanged(PgDurableError):
    """A node's statement changed the role it runs as; its transaction is rolled back."""


async def run_node_sql(
    conn: Connection, *, query: str, params: list[str | None], role: str | None, search_path: str, node_id: str
) -> dict[str, Any]:
    """Run one SQL node (already rewritten to bind parameters) as ``role`` with ``search_path``.

    Runs inside the transaction that also acks the node's work item, so its effects
    and its completion record commit together.
    """
    saved_path = await conn.fetchval(q("current_search_path"))
    if role:
        await conn.execute(q("set_role"), role)
    await conn.execute(q("set_search_path"), search_path)
    stmt = await conn.prepare(query)
    records = await stmt.fetch(*params)
    result = rows_result(stmt.get_attributes(), records)
    if role and await conn.fetchval(q("current_role")) != role:
        raise RoleChanged(f"the statement of node {node_id} changed the role; it was rolled back")
    await conn.execute(q("set_role"), "none")
    await conn.execute(q("set_search_path"), saved_path)
    return result


def rows_result(attributes: Any, records: list[Any]) -> dict[str, Any]:
    """pg_durable's result shape, ``{"rows": [{column: value}], "row_count": n}``, plus column types.

    ``row_count`` counts the returned rows (0 for DML without RETURNING), as in pg_durable.
    A repeated column name keeps its first position and its last value.
    """
    types: dict[str, str] = {}
    for a in attributes:
        types[a.name] = _type_name(a.type)
    rows: list[dict[str, Any]] = []
    for record in records:
        row: dict[str, Any] = {}
        for a, v in zip(attributes, record.values(), strict=True):
            row[a.name] = _json_value(v)
        rows.append(row)
    return {"rows": rows, "row_count": len(rows), COLUMNS_KEY: [[n, t] for n, t in types.items()]}


def _type_name(t: Any) -> str:
    schema = getattr(t, "schema", None) or "pg_catalog"
    return '"' + schema.replace('"', '""') + '"."' + str(t.name).replace('"', '""') + '"'


def _json_value(v: Any) -> Any:
    """A column value as pg_durable encodes it: numeric as an exact string, NaN/Infinity as null."""
    if v is None or isinstance(v, (bool, int, str, dict)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, _dt.datetime) and v.tzinfo is not None:
        return v.astimezone(_dt.UTC).isoformat()
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return f"{v.total_seconds()} seconds"
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, asyncpg.Record):  # a composite value
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)
