"""What a worker tells the database about itself: its names, its session, its dead peers."""

from __future__ import annotations

from collections.abc import Sequence

from .database import Connection
from .sql_loader import q


async def register_names(conn: Connection, *, orchestrations: Sequence[str], activities: Sequence[str]) -> None:
    """Record the names this app serves, so clients can refuse names nobody runs."""
    kinds = ["orchestration"] * len(orchestrations) + ["activity"] * len(activities)
    await conn.execute(q("register_names"), kinds, [*orchestrations, *activities])


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
