"""The graph interpreter's built-ins and their installation into an :class:`App`.

``install(app)`` registers the ``pgdurable.graph`` orchestration (graphs started
from SQL with ``df.start``), the transactional SQL-node activity and the HTTP
activity.  Every :class:`Runtime` calls it, so any worker runs SQL-started graphs.
``register_graph(app, name, graph)`` backs ``App.graph``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import math
import os
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from ._app import ActivityContext, App, TransactionContext
from ._context import OrchestrationContext
from ._errors import ConfigurationError, PgDurableError
from ._graph import GraphError, compile_graph
from ._graph_run import (
    GRAPH_ORCHESTRATION,
    HTTP_ACTIVITY,
    SQL_ACTIVITY,
    Interpreter,
    Observer,
    run_graph_input,
)
from ._graph_sql import COLUMNS_KEY
from ._types import RetryPolicy

HTTP_ALLOW_ENV = "PGDURABLE_HTTP_ALLOW"
GRAPH_ATTR = "__pgdurable_graph__"
_http_allow: set[str] = set()
_ERROR_PREVIEW = 512  # characters of a 5xx body kept in the error
SQL_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, backoff=2.0, max_interval=5.0,
                        non_retryable=("GraphError",))
HTTP_RETRY = RetryPolicy(max_attempts=3, initial_interval=1.0, non_retryable=("HttpNotAllowed", "GraphError"))


class HttpNotAllowed(PgDurableError):
    """The HTTP node's host is not on the allow-list (deny by default)."""


class HttpServerError(PgDurableError):
    """The server answered 5xx: the attempt fails and is retried (4xx responses complete)."""


def allow_http(*hosts: str) -> None:
    """Allow HTTP nodes to call these hosts (also: ``$PGDURABLE_HTTP_ALLOW``, comma-separated; ``*``: any)."""
    _http_allow.update(h.strip().lower() for h in hosts if h.strip())


def _allowed_hosts() -> set[str]:
    env = {h.strip().lower() for h in os.environ.get(HTTP_ALLOW_ENV, "").split(",") if h.strip()}
    return _http_allow | env


# -- built-in orchestration and activities ----------------------------------------------
async def graph_orchestration(ctx: OrchestrationContext, data: Any) -> Any:
    """``pgdurable.graph``: input ``{graph, vars, role, search_path, label}``."""
    return await run_graph_input(ctx, data)


async def sql_node(ctx: TransactionContext, data: dict[str, Any]) -> dict[str, Any]:
    """Run one SQL node as the submitting role; commits with its completion record."""
    conn = ctx.conn
    assert conn is not None
    saved_path = await conn.fetchval("SELECT current_setting('search_path')")
    if data.get("role"):
        await conn.execute("SELECT set_config('role', $1, true)", data["role"])
    await conn.execute("SELECT set_config('search_path', $1, true)", data.get("search_path") or "public")
    stmt = await conn.prepare(data["query"])
    records = await stmt.fetch(*data.get("params", []))
    result = rows_result(stmt.get_attributes(), records)
    if data.get("role") and await conn.fetchval("SELECT current_user") != data["role"]:
        raise GraphError(f"the statement of node {data.get('node')} changed the role; it was rolled back")
    await conn.execute("SELECT set_config('role', 'none', true)")
    await conn.execute("SELECT set_config('search_path', $1, true)", saved_path)
    return result


def rows_result(attributes: Any, records: list[asyncpg.Record]) -> dict[str, Any]:
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


async def http_node(ctx: ActivityContext, data: dict[str, Any]) -> dict[str, Any]:
    """One HTTP request behind the host allow-list; returns pg_durable's envelope."""
    host = (urlsplit(data["url"]).hostname or "").lower()
    allowed = _allowed_hosts()
    if "*" not in allowed and host not in allowed:
        raise HttpNotAllowed(
            f"HTTP to {host!r} is not allowed: add it to ${HTTP_ALLOW_ENV} or call dsl.allow_http({host!r})"
        )
    try:
        import httpx
    except ImportError:
        raise ConfigurationError("df.http needs the httpx package: pip install 'pgdurable_async[graph]'") from None
    started = time.monotonic()
    body = data.get("body")
    async with httpx.AsyncClient(timeout=float(data.get("timeout") or 30)) as client:
        response = await client.request(
            data.get("method", "POST"), data["url"], headers=data.get("headers") or None,
            content=None if body is None else str(body).encode(),
        )
    content_type = response.headers.get("content-type", "")
    textual = content_type.startswith("text/") or "json" in content_type or "xml" in content_type or not content_type
    body_text = response.text if textual else base64.b64encode(response.content).decode()
    if response.is_server_error:
        raise HttpServerError(f"HTTP {response.request.method} {data['url']} returned {response.status_code}: "
                              f"{body_text[:_ERROR_PREVIEW]}")
    return {
        "status": response.status_code,
        "ok": response.is_success,
        "body": body_text,
        "encoding": "text" if textual else "base64",
        "headers": dict(response.headers),
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


def install(app: App) -> App:
    """Register the graph built-ins on ``app`` (idempotent)."""
    if GRAPH_ORCHESTRATION not in app.orchestrations:
        app.orchestration(name=GRAPH_ORCHESTRATION)(graph_orchestration)
    if SQL_ACTIVITY not in app.activities:
        app.transaction(name=SQL_ACTIVITY, retry=SQL_RETRY)(sql_node)
    if HTTP_ACTIVITY not in app.activities:
        app.activity(name=HTTP_ACTIVITY, retry=HTTP_RETRY)(http_node)
    return app


def register_graph(app: App, name: str, graph: Any) -> dict[str, Any]:
    """Register ``graph`` (a dsl node or graph JSON) as orchestration ``name``; input is ``$input``."""
    to_json = getattr(graph, "to_json", None)
    raw = to_json() if callable(to_json) else graph
    tree = compile_graph(raw, bound=frozenset({"input"}))
    install(app)

    async def run(ctx: OrchestrationContext, data: Any) -> Any:
        return await run_registered(ctx, tree, data)

    run.__name__ = run.__qualname__ = f"graph_{name}"
    setattr(run, GRAPH_ATTR, tree)
    if name in app.orchestrations:
        raise GraphError(f"the name {name!r} is already registered")
    app.orchestration(name=name)(run)
    return tree


async def run_registered(
    ctx: OrchestrationContext, tree: dict[str, Any], data: Any, observer: Observer | None = None
) -> Any:
    """Run a graph registered with :meth:`App.graph`; ``data`` is its input (or a continue-as-new carry)."""
    if isinstance(data, dict) and data.get(GRAPH_ATTR):
        bound, resume = data.get("bound") or {}, data.get("resume")
    else:
        bound, resume = {"input": data}, None
    interp = Interpreter(ctx, bound=bound, observer=observer)
    return await interp.run_root(tree, {GRAPH_ATTR: True}, resume)


def graph_of(app: App, name: str) -> dict[str, Any] | None:
    """The compiled graph registered under ``name`` with :meth:`App.graph`, if any."""
    definition = app.orchestrations.get(name)
    tree = getattr(definition.fn, GRAPH_ATTR, None) if definition else None
    return tree if isinstance(tree, dict) else None
