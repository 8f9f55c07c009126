"""The store's side of durable timers: fire what is due, find the next deadline."""

from __future__ import annotations

from collections.abc import Sequence

from .database import Connection
from .sql_loader import q


async def fire_timers(conn: Connection, *, orchestrations: Sequence[str], limit: int) -> int:
    """Move up to ``limit`` due timers to the orchestrator queue (one statement); returns how many."""
    return int(await conn.fetchval(q("fire_timers"), list(orchestrations), limit))


async def next_timer(conn: Connection, *, orchestrations: Sequence[str]) -> float | None:
    """Seconds until the earliest timer of these orchestrations is due, by the database's clock."""
    seconds: float | None = await conn.fetchval(q("next_timer"), list(orchestrations))
    return seconds
