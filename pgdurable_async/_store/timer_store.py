"""The store's side of durable timers: fire what is due, find the next deadline."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from .database import Connection
from .records import NO_OFFSET
from .sql_loader import q


async def fire_timers(
    conn: Connection, *, orchestrations: Sequence[str], limit: int, offset: timedelta = NO_OFFSET
) -> int:
    """Move up to ``limit`` due timers to the orchestrator queue (one statement); returns how many."""
    return int(await conn.fetchval(q("fire_timers"), list(orchestrations), limit, offset))


async def next_timer(
    conn: Connection, *, orchestrations: Sequence[str], offset: timedelta = NO_OFFSET
) -> float | None:
    """Seconds until the earliest timer of these orchestrations is due, by the database's clock."""
    seconds: float | None = await conn.fetchval(q("next_timer"), list(orchestrations), offset)
    return seconds


async def skip_target(
    conn: Connection, *, orchestrations: Sequence[str], activities: Sequence[str], offset: timedelta
) -> tuple[bool, float | None]:
    """(anything runnable now, seconds until the earliest timer or retry) for time skipping."""
    row = await conn.fetchrow(q("skip_target"), list(orchestrations), list(activities), offset)
    return bool(row["busy"]), row["due_in"]
