"""The store's side of queues: their limits, claims within those limits, their depths.

Limits are enforced by the schema function ``claim_queued`` when items are claimed (so they
hold across every worker): it locks each queue's row, counts leases and recent starts, and
leases what fits, in one round trip for all of a worker's limited queues.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from .._base.types import Queue, QueueInfo, RateLimit
from .database import Connection
from .records import QueueWake, WorkItem
from .sql_loader import q
from .work_store import policy


async def upsert_queues(conn: Connection, queues: Sequence[Queue]) -> None:
    """Store these queues' limits (a changed limit replaces the stored one)."""
    await conn.execute(
        q("upsert_queues"),
        [x.name for x in queues],
        [x.concurrency for x in queues],
        [x.rate_limit.n if x.rate_limit else None for x in queues],
        [x.rate_limit.per.total_seconds() if x.rate_limit else None for x in queues],
        [x.key_concurrency for x in queues],
    )


async def claim_queued(
    conn: Connection, *, queues: Sequence[str], names: Sequence[str], limit: int, lease_seconds: float, owner: str
) -> tuple[list[WorkItem], QueueWake]:
    """Lease up to ``limit`` ready items of the activities ``names`` in ``queues``, within their limits."""
    rows = await conn.fetch(q("claim_queued"), list(queues), list(names), limit, lease_seconds, owner)
    items = [
        WorkItem(r["id"], r["instance_id"], r["execution_id"], r["task_id"], r["name"], r["input"],
                 policy(r["retry"]) if r["retry"] else None, r["attempt"], r["lease_token"], r["queue"])
        for r in rows if r["id"] is not None
    ]
    hint = [r["wake_in"] for r in rows if r["id"] is None]
    return items, QueueWake(bool(hint), hint[0] if hint else None)


async def notify_work(conn: Connection, *, channel: str) -> None:
    """Wake the claimers of every runtime (queued items finished: their limits have room)."""
    await conn.execute(q("notify_work"), channel)


async def queue_depths(conn: Connection) -> list[QueueInfo]:
    """Every stored queue with its limits and its ready, running and delayed items (database-wide)."""
    return [
        QueueInfo(
            r["name"], r["concurrency"],
            RateLimit(r["rate_limit"], timedelta(seconds=r["rate_per"])) if r["rate_limit"] else None,
            r["key_concurrency"], r["ready"], r["running"], r["delayed"],
        )
        for r in await conn.fetch(q("queue_depths"))
    ]
