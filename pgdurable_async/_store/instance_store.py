"""The store's side of the client: start, signal, read, fork, terminate and purge instances.

Driver errors that mean something to a caller (an id already taken, an unknown
instance) become the project's errors here.
"""

from __future__ import annotations

import builtins
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg

from .._base import events as ev
from .._base.errors import GraphError, InstanceAlreadyExists, InstanceNotFound, InvalidArgument, PgDurableError
from .._base.serde import dumps
from .._base.types import HistoryEvent, InstanceState, Status
from .._base.waits import waiting_on
from .database import Connection
from .records import MessageWrite
from .sql_loader import q
from .turn_store import enqueue_messages, lock_instance


async def start(
    conn: Connection, *, instance_id: str, name: str, input_json: str, fresh_id: bool = False,
    trace_context: dict[str, str] | None = None, deferred: bool = False,
) -> None:
    """Create an instance and queue its start message (the SQL client API, one statement).

    Raises :class:`InstanceAlreadyExists` for a taken id, except with ``fresh_id`` (an id
    this call generated: a collision can only be its own earlier, committed attempt).
    ``trace_context`` (W3C ``traceparent``/``tracestate``) is recorded with the instance.
    ``deferred``: the start message does not NOTIFY; the caller does after (notify_store).
    """
    try:
        if trace_context is None:
            await conn.fetchval(q("api_start_deferred" if deferred else "api_start"), instance_id, name, input_json)
        else:
            await conn.fetchval(q("api_start_traced_deferred" if deferred else "api_start_traced"),
                                instance_id, name, input_json, dumps(trace_context))
    except asyncpg.UniqueViolationError:
        if not fresh_id:
            raise InstanceAlreadyExists(instance_id) from None


async def submit_graph(
    conn: Connection, *, graph_json: str, label: str | None, search_path: str | None, vars_json: str | None,
    instance_id: str | None,
) -> str:
    """Create a graph instance as the session's current role (the SQL ``df._submit``); returns its id."""
    try:
        submitted: str = await conn.fetchval(q("api_submit_graph"), graph_json, label, search_path, vars_json,
                                             instance_id)
    except asyncpg.UniqueViolationError:
        raise InstanceAlreadyExists(instance_id or "") from None
    except (asyncpg.RaiseError, asyncpg.InsufficientPrivilegeError) as exc:
        raise GraphError(str(exc).removeprefix("df.start: ")) from None
    return submitted


async def send(conn: Connection, *, instance_id: str, kind: str, payload_json: str) -> None:
    """Queue an event or cancel request for a live instance (a finished one ignores it)."""
    try:
        await conn.execute(q("api_send"), instance_id, kind, payload_json)
    except asyncpg.NoDataFoundError:
        raise InstanceNotFound(instance_id) from None


async def get_instance(conn: Connection, *, instance_id: str, waits: bool = True) -> InstanceState | None:
    """One instance; with ``waits``, what it waits on too (one statement, one snapshot)."""
    if not waits:
        row = await conn.fetchrow(q("get_instance"), instance_id)
        return None if row is None else _state(row)
    found = await get_instances(conn, instance_ids=[instance_id])
    return found[0] if found else None


async def get_instances(conn: Connection, *, instance_ids: builtins.list[str]) -> builtins.list[InstanceState]:
    """These instances (in the order given, unknown ids left out), each with its ``waiting_on``."""
    rows = await conn.fetch(q("instances_with_waits"), instance_ids)
    return [replace(_state(r), waiting_on=waiting_on(r["open_tasks"], r["event_waits"])) for r in rows]


async def list_instances(
    conn: Connection, *, status: str | None, name: str | None, limit: int
) -> builtins.list[InstanceState]:
    """Instances, newest first, optionally filtered by status and orchestration name."""
    ids = [r["instance_id"] for r in await conn.fetch(q("list_instance_ids"), status, name, limit)]
    return await get_instances(conn, instance_ids=ids)


async def get_history(conn: Connection, *, instance_id: str, execution_id: int | None) -> list[HistoryEvent]:
    """The events of the current (or the given) execution, in seq order."""
    rows = await conn.fetch(q("get_history"), instance_id, execution_id)
    return [HistoryEvent(r["seq"], r["event_type"], r["payload"] or {}, r["recorded_at"], r["execution_id"])
            for r in rows]


async def terminate(conn: Connection, *, instance_id: str, reason: str | None) -> bool:
    """Terminate an instance and its unfinished descendants; False if it had already finished.

    Runs with the instance row locked: each terminated instance records
    ``orchestration_terminated`` and loses its pending work, all in this transaction.
    The parent of ``instance_id`` hears of it as a failed child.
    """
    row = await lock_instance(conn, instance_id=instance_id)
    if row is None:
        raise InstanceNotFound(instance_id)
    if Status(row.status).is_terminal:
        return False
    error = dumps(ev.terminated_error(reason))
    # Again until nothing is left: a child that a running descendant's turn created while
    # this statement took its snapshot is found by the next one (its parent is locked now).
    while await conn.fetch(q("terminate_tree"), instance_id, reason, error):
        pass
    if row.parent_instance_id:
        payload = ev.child_failed(row.parent_task_id, instance_id, ev.terminated_error(reason))
        await enqueue_messages(conn, [MessageWrite(row.parent_instance_id, row.parent_execution_id,
                                                   ev.SUB_ORCHESTRATION_FAILED, dumps(payload))])
    return True


async def purge(conn: Connection, *, instance_id: str) -> int:
    """Delete a finished instance with its finished descendants and their history; returns how many."""
    row = await lock_instance(conn, instance_id=instance_id)
    if row is None:
        raise InstanceNotFound(instance_id)
    if not Status(row.status).is_terminal:
        raise PgDurableError(f"instance {instance_id!r} is {row.status}; only finished instances can be purged")
    return await _purge_trees(conn, [instance_id])


async def purge_finished(conn: Connection, *, older_than: timedelta, status: str | None, limit: int) -> int:
    """One bounded batch: up to ``limit`` finished instances not updated for ``older_than`` (each
    with its finished descendants) and their history.  Rows a turn holds are skipped, not waited for."""
    roots = [r["instance_id"] for r in await conn.fetch(q("purge_candidates"), older_than, status, limit)]
    return await _purge_trees(conn, roots) if roots else 0


async def _purge_trees(conn: Connection, roots: list[str]) -> int:
    gone = [r["instance_id"] for r in await conn.fetch(q("purge_trees"), roots)]
    if gone:
        await conn.execute(q("purge_history"), gone)
    return len(gone)


async def fork(
    conn: Connection, *, instance_id: str, at_seq: int | None, new_instance_id: str, fresh_id: bool = False
) -> None:
    """Create ``new_instance_id`` as a fork of ``instance_id`` (the SQL ``fork()``, one statement).

    A taken id raises :class:`InstanceAlreadyExists`, except with ``fresh_id`` (as :func:`start`).
    """
    try:
        await conn.fetchval(q("api_fork"), instance_id, at_seq, new_instance_id)
    except asyncpg.NoDataFoundError:
        raise InstanceNotFound(instance_id) from None
    except asyncpg.UniqueViolationError:
        if not fresh_id:
            raise InstanceAlreadyExists(new_instance_id) from None
    except (asyncpg.InvalidParameterValueError, asyncpg.InsufficientPrivilegeError) as exc:
        raise InvalidArgument(str(exc).removeprefix("pgdurable.fork: ")) from None


async def get_value(conn: Connection, *, instance_id: str, key: str) -> tuple[bool, Any]:
    """(whether ``key`` is set, its value); raises :class:`InstanceNotFound` for an unknown instance."""
    row = await conn.fetchrow(q("get_value"), instance_id, key)
    if not row["found"]:
        raise InstanceNotFound(instance_id)
    return bool(row["has_value"]), row["value"]


def _state(row: Any) -> InstanceState:
    return InstanceState(
        instance_id=row["instance_id"],
        name=row["name"],
        status=Status(row["status"]),
        input=row["input"],
        output=row["output"],
        error=row["error"],
        custom_status=row["custom_status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        execution_id=row["execution_id"],
        parent_instance_id=row["parent_instance_id"],
    )
