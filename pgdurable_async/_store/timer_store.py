"""The store's side of durable timers: fire what is due, find the next deadline."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .database import Connection
from .sql_loader import q


async def fire_timers(conn: Connection, *, orchestrations: Sequence[str], limit: int) -> int:
    """Move up to ``limit`` due timers to the orchestrator queue (one statement); returns how many."""
    return int(await conn.fetchval(q("fire_timers"), list(orchestrations), limit))


async def next_timer(conn: Connection, *, orchestrations: Sequence[str]) -> datetime | None:
    """The earliest ``fire_at`` among the timers of these orchestrations."""
    earliest: datetime | None = await conn.fetchval(q("next_timer"), list(orchestrations))
    return earliest
