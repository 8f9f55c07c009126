"""Running a graph's SQL node: the statement as the submitting role, its rows as pg_durable's result shape.

The trust boundary: the worker's role can do whatever its grants allow (it is trusted
code); a tenant's statement runs with the tenant's privileges and no more, and leaves
nothing behind in the worker's session (temporary objects, SQL prepared statements).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import math
import uuid
from typing import Any

import asyncpg

from .._base.errors import PgDurableError
from .database import Connection
from .database import search_path as search_path_of
from .sql_loader import q

#: The private key of a rows result holding ``[[column, type], ...]`` (order and types jsonb would lose).
COLUMNS_KEY = "_pgdurable_columns"


GRAPH_ORCHESTRATION = "pgdurable.graph"


class NodeRefused(PgDurableError):
    """A SQL node cannot run as its submitter (the role is gone, or the worker may not act as it)."""


async def run_node_sql(
    conn: Connection, *, schema: str, instance_id: str, query: str, params: list[str | None], search_path: str,
    node_id: str,
) -> dict[str, Any]:
    """Run one SQL node (already rewritten to bind parameters) and return its rows.

    A graph submitted with ``df.start`` runs as the role recorded in its instance row
    (``submitted_by``), inside a SECURITY DEFINER function owned by that role, so that
    nothing in the statement can take another role; graphs an app registers
    (``App.graph``) are the app's own code and run as the worker.  Either way this runs
    in the transaction that acks the node's work item: its effects and its completion
    commit together.
    """
    await conn.execute(q("set_search_path"), search_path_of(schema))
    row = await conn.fetchrow(q("node_submitter"), instance_id, None)
    if row is None:
        raise NodeRefused(f"instance {instance_id!r} of node {node_id} does not exist")
    if row["name"] != GRAPH_ORCHESTRATION:  # App.graph: trusted code, the worker's role
        await conn.execute(q("enter_app_graph"), search_path)
        stmt = await conn.prepare(query)
        _check_columns(stmt.get_attributes())
        result = rows_result(stmt.get_attributes(), await stmt.fetch(*params))
        await conn.execute(q("leave_app_graph"))
        return result
    _check_submitter(row, instance_id, f"node {node_id}", "its SQL")
    try:
        await conn.execute(q("enter_tenant"), row["rolname"], search_path)
    except asyncpg.InsufficientPrivilegeError:
        raise NodeRefused(
            f"the worker's role may not act as {row['rolname']!r}, which submitted instance {instance_id!r}: "
            f"GRANT {row['rolname']} TO <worker role>"
        ) from None
    stmt = await conn.prepare(query)  # names resolve as the tenant's; nothing runs yet
    attributes = stmt.get_attributes()
    _check_columns(attributes)
    executed = query
    if any(_is_pseudo(a.type) for a in attributes):
        executed = _without_pseudo_types(query, attributes)
    records = await _as_tenant(conn, executed, params, [_returned_type(a.type) for a in attributes])
    await conn.execute(q("leave_tenant"))
    await conn.execute(q("discard_tenant_state"))
    return rows_result(attributes, records)


def _check_submitter(row: Any, instance_id: str, node: str, what: str) -> None:
    """Refuse a node of a ``df.start`` instance that was cancelled, or whose submitter is gone or a barred superuser."""
    if row["status"] == "cancelled":  # df.cancel marked it; its worker turn has not caught up yet
        raise NodeRefused(f"instance {instance_id!r} was cancelled; {node} does not run")
    if row["rolname"] is None:
        raise NodeRefused(f"the role that submitted instance {instance_id!r} no longer exists; {what} cannot run")
    if row["rolsuper"] and not row["superuser_allowed"]:
        raise NodeRefused(
            f"instance {instance_id!r} was submitted by the superuser {row['rolname']!r}, and superuser instances "
            "are disabled (set pg_durable.enable_superuser_instances = on for the worker's sessions to allow them)"
        )


#: The function whose grant lets a submitter's graph make HTTP requests (as df.start checks it).
HTTP_FUNCTION = "df.http(text, text, text, jsonb, integer)"


async def check_http_grant(conn: Connection, *, instance_id: str) -> None:
    """Refuse an HTTP node of a ``df.start`` graph whose submitter no longer may use ``df.http``.

    ``df.start`` checked the grant when the graph was submitted; this checks it again before each
    request, so ``df.revoke_usage`` or a revoked http grant stops the graph's later HTTP nodes.
    Graphs an app registers (``App.graph``) are its own code and are not checked.  ``conn`` is one
    of the runtime's own sessions (its search_path names our schema).
    """
    row = await conn.fetchrow(q("node_submitter"), instance_id, HTTP_FUNCTION)
    if row is None:
        raise NodeRefused(f"instance {instance_id!r} of an HTTP node does not exist")
    if row["name"] != GRAPH_ORCHESTRATION:
        return
    _check_submitter(row, instance_id, "its HTTP node", "its HTTP node")
    if not row["granted"]:
        raise NodeRefused(
            f"role {row['rolname']!r} may no longer use df.http (its grant was revoked after instance "
            f"{instance_id!r} started): df.grant_usage(role, include_http => true)"
        )


#: Column types a result cannot carry, as in pg_durable (binary data has no JSON form both sides read alike).
_UNSUPPORTED = frozenset({"bytea"})


def _check_columns(attributes: Any) -> None:
    """Refuse, before anything runs, a statement whose result has a column of an unsupported type."""
    for a in attributes:
        if (getattr(a.type, "schema", None) or "pg_catalog") == "pg_catalog" and a.type.name in _UNSUPPORTED:
            raise NodeRefused(
                f"Unsupported column type '{a.type.name}' for column '{a.name}': cast it to text "
                f"(encode({a.name}, 'base64')) in the node's SQL"
            )


#: Types a column definition list cannot name (the function's rows are declared by type).
_PSEUDO = frozenset({"void", "record", "unknown", "cstring"})


def _is_pseudo(t: Any) -> bool:
    return (getattr(t, "schema", None) or "pg_catalog") == "pg_catalog" and t.name in _PSEUDO


def _returned_type(t: Any) -> str:
    if not _is_pseudo(t):
        return _type_name(t)
    return '"pg_catalog"."text"' if t.name == "void" else '"pg_catalog"."jsonb"'


def _without_pseudo_types(query: str, attributes: Any) -> str:
    """``query`` as a subquery whose pseudo-typed columns (``SELECT pg_sleep(1)``) come out as NULL or JSON.

    Only a query can be a subquery: a DML statement returning such a column fails to run.
    """
    names = ", ".join(f'"c{k}"' for k in range(1, len(attributes) + 1))
    cells = []
    for k, a in enumerate(attributes, start=1):
        if not _is_pseudo(a.type):
            cells.append(f's."c{k}"')
        elif a.type.name == "void":
            cells.append("NULL::pg_catalog.text")
        else:
            cells.append(f'pg_catalog.to_jsonb(s."c{k}")')
    return f"SELECT {', '.join(cells)} FROM ({query}\n) AS s({names})"


async def _as_tenant(conn: Connection, query: str, params: list[str | None], types: list[str]) -> list[Any]:
    """The statement executed inside a temporary SECURITY DEFINER function the tenant owns."""
    n = len(params)
    shape = {
        "args": "".join(f", a{k} pg_catalog.text" for k in range(1, n + 1)),
        "using": (" USING " + ", ".join(f"a{k}" for k in range(1, n + 1))) if n else "",
        "types": ", pg_catalog.text" * n,
    }
    call = {"params": "".join(f", ${k}::pg_catalog.text" for k in range(2, n + 2))}
    if not types:
        await conn.execute(q("node_wrapper_void").format(**shape))
        await conn.execute(q("node_call_void").format(**call), query, *params)
        return []
    columns = ", ".join(f'"c{k}" {t}' for k, t in enumerate(types, start=1))
    await conn.execute(q("node_wrapper_rows").format(**shape))
    return list(await conn.fetch(q("node_call_rows").format(columns=columns, **call), query, *params))


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
    if isinstance(v, decimal.Decimal):  # the exact digits: the driver decodes 10000 as Decimal('1E+4')
        return format(v, "f") if v.is_finite() else str(v)
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
