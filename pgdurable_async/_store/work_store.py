"""The store's side of activities: claims under a lease, lease upkeep, batched acks and retries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .._base.types import RetryPolicy
from .database import Connection
from .records import NO_OFFSET, Outcome, WorkItem
from .sql_loader import q


async def claim_work(
    conn: Connection, *, names: Sequence[str], limit: int, lease_seconds: float, owner: str,
    offset: timedelta = NO_OFFSET,
) -> list[WorkItem]:
    """Lease up to ``limit`` visible items without a queue of the activities ``names`` (one statement),
    highest priority first, oldest first within one."""
    rows = await conn.fetch(q("claim_work"), list(names), limit, lease_seconds, owner, offset)
    return [
        WorkItem(r["id"], r["instance_id"], r["execution_id"], r["task_id"], r["name"], r["input"],
                 policy(r["retry"]) if r["retry"] else None, r["attempt"], r["lease_token"])
        for r in rows
    ]


async def next_work_due(conn: Connection, *, names: Sequence[str], offset: timedelta = NO_OFFSET) -> float | None:
    """Seconds until the earliest queued item of ``names`` becomes visible, by the database's clock
    (None: the queue is empty; negative: already visible)."""
    due: float | None = await conn.fetchval(q("next_work_due"), list(names), offset)
    return due


async def extend_leases(
    conn: Connection, *, tokens: list[uuid.UUID], lease_seconds: float, offset: timedelta = NO_OFFSET
) -> None:
    await conn.execute(q("extend_leases"), tokens, lease_seconds, offset)


async def ack_work(conn: Connection, outcomes: Sequence[Outcome], *, deferred: bool = False) -> int:
    """Delete finished items still leased by us and queue their results; returns how many were acked.

    ``deferred``: the result messages do not NOTIFY; the caller does after the commit (notify_store).
    """
    rows = await conn.fetch(
        q("ack_work"),
        [o.item.id for o in outcomes],
        [o.item.lease_token for o in outcomes],
        [o.kind for o in outcomes],
        [o.payload for o in outcomes],
        "deferred" if deferred else "",
    )
    return len(rows)


async def retry_work(conn: Connection, outcomes: Sequence[Outcome], *, offset: timedelta = NO_OFFSET) -> None:
    """Give failed items another attempt after their backoff (``visible_at`` in the future)."""
    await conn.execute(
        q("retry_work"),
        [o.item.id for o in outcomes],
        [o.item.lease_token for o in outcomes],
        [o.delay for o in outcomes],
        offset,
    )


async def release_leases(conn: Connection, items: Sequence[WorkItem]) -> None:
    """Give unfinished items back at once (graceful shutdown)."""
    await conn.execute(q("release_leases"), [i.id for i in items], [i.lease_token for i in items])


async def lock_work_item(conn: Connection, item: WorkItem) -> bool:
    """Row-lock an item for a transactional activity; False when its lease is no longer ours."""
    return await conn.fetchval(q("lock_work_item"), item.id, item.lease_token) is not None


async def user_search_path(conn: Connection) -> str:
    """The search_path the login role's own sessions get (ours override it with the pgdurable schema)."""
    return str(await conn.fetchval(q("user_search_path")))


async def set_search_path(conn: Connection, search_path: str) -> None:
    """Set search_path for the rest of the transaction."""
    await conn.execute(q("set_search_path"), search_path)


def policy(data: dict[str, Any]) -> RetryPolicy:
    """A work item's stored retry policy."""
    return RetryPolicy(
        max_attempts=int(data.get("max_attempts", 3)),
        initial_interval=float(data.get("initial_interval", 1.0)),
        backoff=float(data.get("backoff", 2.0)),
        max_interval=float(data.get("max_interval", 60.0)),
        non_retryable=tuple(data.get("non_retryable", ())),
    )
