"""The store's side of a turn: claim instances, read their messages and history, write the batch.

Every write takes a list of records and is one multi-row ``unnest`` statement,
whatever the size of the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import timedelta

from .._base.types import HistoryEvent
from .database import Connection
from .records import (
    NO_OFFSET,
    ChildWrite,
    HistoryWrite,
    InstanceRow,
    InstanceUpdate,
    Message,
    MessageWrite,
    TimerWrite,
    ValueWrite,
    WorkWrite,
    columns,
)
from .sql_loader import q


async def claim_instances(
    conn: Connection, *, names: Sequence[str], limit: int, scan: int, excluded: Sequence[str] = (),
    offset: timedelta = NO_OFFSET,
) -> list[InstanceRow]:
    """Lock up to ``limit`` instances of ``names`` that have messages (``FOR UPDATE SKIP LOCKED``).

    Each row's ``db_now`` is the database's ``now()`` plus the runtime's clock ``offset``.
    """
    rows = await conn.fetch(q("claim_instances"), list(names), limit, scan, list(excluded), offset)
    return [InstanceRow(*r) for r in rows]


async def messages_waiting(conn: Connection, *, names: Sequence[str], excluded: Sequence[str] = ()) -> bool:
    """Whether messages of ``names`` wait in the queue (outside ``excluded``), locked or not."""
    return bool(await conn.fetchval(q("messages_waiting"), list(names), list(excluded)))


async def lock_instance(conn: Connection, *, instance_id: str, offset: timedelta = NO_OFFSET) -> InstanceRow | None:
    """Lock one instance row (waiting for a turn that holds it); None if there is none."""
    row = await conn.fetchrow(q("lock_instance"), instance_id, offset)
    return None if row is None else InstanceRow(*row)


async def fetch_messages(conn: Connection, *, instance_ids: Sequence[str]) -> list[Message]:
    """The pending messages of these instances, oldest first."""
    rows = await conn.fetch(q("fetch_messages"), list(instance_ids))
    return [Message(r[0], r[1], r[2], r[3], r[4] or {}) for r in rows]


async def message_ids(conn: Connection, *, instance_ids: Sequence[str]) -> list[int]:
    """The ids of the pending messages of these instances (their payloads left undecoded)."""
    return [r[0] for r in await conn.fetch(q("message_ids"), list(instance_ids))]


async def fetch_histories(
    conn: Connection, *, executions: Iterable[tuple[str, int]]
) -> dict[str, list[HistoryEvent]]:
    """The recorded history of each (instance, execution), in seq order, keyed by instance id."""
    pairs = list(executions)
    rows = await conn.fetch(q("fetch_histories"), [p[0] for p in pairs], [p[1] for p in pairs])
    histories: dict[str, list[HistoryEvent]] = defaultdict(list)
    for r in rows:
        histories[r["instance_id"]].append(
            HistoryEvent(r["seq"], r["event_type"], r["payload"] or {}, r["recorded_at"], r["execution_id"])
        )
    return histories


async def last_seq(conn: Connection, *, instance_id: str, execution_id: int) -> int:
    """The seq of the last recorded event of an execution (0 when it has none)."""
    return int(await conn.fetchval(q("last_seq"), instance_id, execution_id))


async def known_names(conn: Connection, *, kind: str, names: Sequence[str]) -> set[str]:
    """Which of ``names`` some runtime of this database registered as ``kind``."""
    return {r["name"] for r in await conn.fetch(q("known_names"), kind, list(names))}


async def append_history(conn: Connection, rows: list[HistoryWrite]) -> None:
    await conn.execute(q("append_history"), *columns(rows, 6))


async def enqueue_work(conn: Connection, rows: list[WorkWrite]) -> None:
    """Insert work items; items with a queue, key or priority take the wider statement."""
    if all(row.plain for row in rows):
        await conn.execute(q("enqueue_work"), *columns(rows, 11)[:7])
    else:
        await conn.execute(q("enqueue_work_flow"), *columns(rows, 11))


async def create_timers(conn: Connection, rows: list[TimerWrite]) -> None:
    await conn.execute(q("create_timers"), *columns(rows, 5))


async def create_children(conn: Connection, rows: list[ChildWrite]) -> set[str]:
    """Create child instances with their start messages; returns the ids created (others existed)."""
    return {r["instance_id"] for r in await conn.fetch(q("create_children"), *columns(rows, 6))}


async def drop_pending_work(conn: Connection, *, instance_ids: list[str]) -> None:
    """These instances finished: their outstanding activities and timers are moot."""
    await conn.execute(q("drop_pending_work"), instance_ids)


async def enqueue_messages(conn: Connection, rows: list[MessageWrite]) -> None:
    await conn.execute(q("enqueue_messages"), *columns(rows, 4))


async def set_values(conn: Connection, rows: list[ValueWrite]) -> None:
    """Upsert durable values (one row per instance and key; the trigger NOTIFYs waiters)."""
    await conn.execute(q("set_values"), *columns(rows, 5))


async def cancel_children(conn: Connection, *, parent_ids: list[str], payloads: list[str]) -> None:
    """Queue ``cancel_requested`` (``payloads[i]``, JSON) for the unfinished children of ``parent_ids[i]``."""
    await conn.execute(q("cancel_children"), parent_ids, payloads)


async def update_instances(conn: Connection, rows: list[InstanceUpdate]) -> None:
    await conn.execute(q("update_instances"), *columns(rows, 10))


async def delete_messages(conn: Connection, *, ids: list[int]) -> None:
    await conn.execute(q("delete_messages"), ids)
