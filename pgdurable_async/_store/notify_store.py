"""Deferred wake-ups: transactions whose inserts do not NOTIFY, and the NOTIFYs sent after their commit.

A NOTIFY holds a database-wide lock from the start of its transaction's commit to the end
(WAL flush included), so committing transactions that notify run one at a time.  The runtime's
turns, acks and client starts mark their transaction (schema 0018's ``pgdurable.notify``) and
send the NOTIFYs from a statement of their own right after, which commits without waiting for
its WAL flush (a NOTIFY is not durable anyway; one lost costs a sweep's latency, never work).
"""

from __future__ import annotations

from collections.abc import Sequence

from .database import Connection
from .sql_loader import q

DEFERRED = "deferred"


async def defer(conn: Connection) -> None:
    """The rest of this transaction's queue inserts do not NOTIFY."""
    await conn.execute(q("defer_notify"))


async def notify(conn: Connection, *, channels: Sequence[str]) -> None:
    """NOTIFY each channel (empty payload), asynchronously committed."""
    await conn.execute(q("notify_channels"), list(channels))
