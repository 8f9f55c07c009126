"""The store's side of the dashboard: overview figures, keyset pages, live attempts.

Read-only.  The overview reads the queues, so the dashboard needs a role that may
(the owner or a worker role); instances and history are what a client role reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from .database import Connection
from .sql_loader import q


class QueueStats(NamedTuple):
    """One queue: rows in it, ready, leased (running), delayed; oldest ready age and next due, in seconds."""

    queue: str
    depth: int
    ready: int
    running: int
    delayed: int
    oldest_ready_age: float
    next_due_in: float | None


class Failure(NamedTuple):
    instance_id: str
    name: str
    error: object
    updated_at: datetime


class WorkAttempt(NamedTuple):
    """An outstanding activity's current attempt: running now, or waiting until ``visible_at``."""

    task_id: int
    attempt: int
    visible_at: datetime
    running: bool


async def status_counts(conn: Connection) -> dict[str, int]:
    """Instances per status."""
    return {r["status"]: int(r["n"]) for r in await conn.fetch(q("dashboard_status_counts"))}


async def queues(conn: Connection) -> list[QueueStats] | None:
    """The orchestrator, work and timer queues, in that order; None for a role that may not read them."""
    try:
        return [QueueStats(*r) for r in await conn.fetch(q("dashboard_queues"))]
    except asyncpg.InsufficientPrivilegeError:
        return None


async def throughput(conn: Connection, *, minutes: int) -> dict[tuple[datetime, str], int]:
    """Events of the main kinds per (minute, kind) over the last ``minutes`` minutes."""
    rows = await conn.fetch(q("dashboard_throughput"), minutes)
    return {(r["minute"], r["event_type"]): int(r["n"]) for r in rows}


async def recent_failures(conn: Connection, *, limit: int) -> list[Failure]:
    """The most recently failed instances."""
    return [Failure(*r) for r in await conn.fetch(q("dashboard_recent_failures"), limit)]


async def page(
    conn: Connection, *, status: str | None, name: str | None, pattern: str | None,
    after: tuple[datetime, str] | None, limit: int,
) -> list[tuple[str, datetime]]:
    """Up to ``limit`` (instance id, created_at), newest first, after the keyset ``after``."""
    created, last_id = after if after is not None else (None, None)
    rows = await conn.fetch(q("dashboard_page"), status, name, pattern, created, last_id, limit)
    return [(r["instance_id"], r["created_at"]) for r in rows]


async def work_attempts(conn: Connection, *, instance_id: str, execution_id: int) -> dict[int, WorkAttempt]:
    """The current attempt of each outstanding activity of an execution, by task id (none for a
    role that may not read the work queue: the history still tells the rest)."""
    try:
        rows = await conn.fetch(q("dashboard_work_items"), instance_id, execution_id)
    except asyncpg.InsufficientPrivilegeError:
        return {}
    return {r["task_id"]: WorkAttempt(*r) for r in rows}


async def now(conn: Connection) -> datetime:
    """The database's clock (the one history times follow)."""
    value: datetime = await conn.fetchval(q("dashboard_now"))
    return value
