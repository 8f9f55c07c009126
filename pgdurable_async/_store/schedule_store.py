"""The store's side of schedules: the client API (SECURITY DEFINER functions) and the firing queries.

A firing is one transaction: lock due schedules (``FOR UPDATE SKIP LOCKED``), create
the instances ``"<schedule_id>@<fire time>"`` (a taken id is skipped, so a fire time
starts at most one instance), advance ``next_fire_at``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from .._base.errors import InvalidArgument, ScheduleAlreadyExists, ScheduleNotFound
from .._base.types import ScheduleInfo
from .database import Connection
from .records import DueSchedule
from .sql_loader import q


async def db_now(conn: Connection) -> datetime:
    """The database's clock (every schedule time is read from it)."""
    now: datetime = await conn.fetchval(q("db_now"))
    return now


async def create(
    conn: Connection, *, schedule_id: str, orchestration: str, input_json: str, cron: str | None,
    every: timedelta | None, timezone: str, overlap: str, catchup: str, next_fire_at: datetime,
) -> None:
    try:
        await conn.execute(q("api_create_schedule"), schedule_id, orchestration, input_json, cron, every, timezone,
                           overlap, catchup, next_fire_at)
    except asyncpg.UniqueViolationError:
        raise ScheduleAlreadyExists(schedule_id) from None
    except asyncpg.InsufficientPrivilegeError as exc:
        raise InvalidArgument(str(exc).removeprefix("pgdurable.create_schedule: ")) from None


async def set_paused(conn: Connection, *, schedule_id: str, paused: bool, next_fire_at: datetime | None) -> None:
    """Pause, or resume from ``next_fire_at`` (None keeps the stored one)."""
    try:
        await conn.execute(q("api_set_schedule_paused"), schedule_id, paused, next_fire_at)
    except asyncpg.NoDataFoundError:
        raise ScheduleNotFound(schedule_id) from None


async def delete(conn: Connection, *, schedule_id: str) -> None:
    try:
        await conn.execute(q("api_delete_schedule"), schedule_id)
    except asyncpg.NoDataFoundError:
        raise ScheduleNotFound(schedule_id) from None


async def trigger(conn: Connection, *, schedule_id: str) -> str:
    """Start one firing now; returns its instance id."""
    try:
        instance_id: str = await conn.fetchval(q("api_trigger_schedule"), schedule_id)
    except asyncpg.NoDataFoundError:
        raise ScheduleNotFound(schedule_id) from None
    return instance_id


async def get(conn: Connection, *, schedule_id: str) -> ScheduleInfo | None:
    row = await conn.fetchrow(q("get_schedule"), schedule_id)
    return None if row is None else _info(row)


async def list_all(conn: Connection) -> list[ScheduleInfo]:
    return [_info(r) for r in await conn.fetch(q("list_schedules"))]


# -- firing (the runtime) -----------------------------------------------------------------
async def claim_due(
    conn: Connection, *, orchestrations: Sequence[str], limit: int, deferred: Mapping[str, datetime]
) -> list[DueSchedule]:
    """Lock up to ``limit`` due schedules (``deferred``: ids left alone until their time)."""
    rows = await conn.fetch(q("claim_due_schedules"), list(orchestrations), limit, list(deferred),
                            list(deferred.values()))
    return [DueSchedule(*r) for r in rows]


async def start_firings(
    conn: Connection, *, schedule_id: str, fire_at: Sequence[datetime], orchestration: str, input_json: str
) -> int:
    """Create one instance per fire time (ids that exist are skipped); returns how many were created."""
    rows = await conn.fetch(q("start_firings"), schedule_id, list(fire_at), orchestration, input_json)
    return len(rows)


async def advance(conn: Connection, *, schedule_id: str, next_fire_at: datetime, last_fired: datetime | None) -> None:
    await conn.execute(q("advance_schedule"), schedule_id, next_fire_at, last_fired)


async def next_due(
    conn: Connection, *, orchestrations: Sequence[str], deferred: Mapping[str, datetime]
) -> float | None:
    """Seconds until a schedule of these orchestrations is due (or a deferred one is looked at again)."""
    due: float | None = await conn.fetchval(q("next_schedule_due"), list(orchestrations), list(deferred),
                                            list(deferred.values()))
    return due


def _info(row: Any) -> ScheduleInfo:
    return ScheduleInfo(
        schedule_id=row["schedule_id"], orchestration=row["orchestration"], input=row["input"], cron=row["cron"],
        every=row["every"], timezone=row["timezone"], overlap=row["overlap"], catchup=row["catchup"],
        paused=row["paused"], next_fire_at=row["next_fire_at"], last_instance_id=row["last_instance_id"],
    )
