"""What a worker tells the database about itself: its names, its session, its dead peers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .database import Connection
from .sql_loader import q


async def register_names(
    conn: Connection, *, orchestrations: Sequence[str], activities: Mapping[str, str | None]
) -> None:
    """Record the names this app serves (activities with their queue), so clients can refuse names nobody runs."""
    kinds = ["orchestration"] * len(orchestrations) + ["activity"] * len(activities)
    queues = [None] * len(orchestrations) + list(activities.values())
    await conn.execute(q("register_names"), kinds, [*orchestrations, *activities], queues)


async def register_worker(conn: Connection, *, worker_id: str) -> None:
    """Record (or refresh) this worker and the backend of the session running the statement."""
    await conn.execute(q("register_worker"), worker_id)


async def heartbeat_worker(conn: Connection, *, worker_id: str, ttl: float) -> None:
    """Record (or refresh) a worker without a LISTEN session: alive for ``ttl`` more seconds."""
    await conn.execute(q("heartbeat_worker"), worker_id, ttl)


async def deregister_worker(conn: Connection, *, worker_id: str) -> None:
    await conn.execute(q("deregister_worker"), worker_id)


async def release_dead_leases(conn: Connection) -> int:
    """Expire the leases of workers whose session is gone or whose heartbeat expired; returns how many."""
    return len(await conn.fetch(q("release_dead_leases")))


async def expire_df_instances(conn: Connection) -> int | None:
    """pg_durable's retention pass over finished ``df`` instances; how many were removed.

    None when it is not this worker's to run (no ``df``, or ``df._expire`` not granted).
    """
    settings = await conn.fetchrow(q("df_retention_settings"))
    if settings is None or not settings["allowed"]:
        return None
    removed = 0
    for _ in range(100):  # 1,000 a batch; the next pass takes the rest
        batch = int(await conn.fetchval(q("df_expire"), settings["retention_days"], 1000))
        removed += batch
        if batch < 1000:
            break
    return removed


async def df_retention_interval(conn: Connection) -> int:
    """Seconds between retention passes (``pg_durable.reconcile_interval``; 0 disables them)."""
    settings = await conn.fetchrow(q("df_retention_settings"))
    return 3600 if settings is None else int(settings["reconcile_interval"])
