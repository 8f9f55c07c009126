"""The store's side of operations: the metrics snapshot, trace contexts, a worker's running report.

(``instance_store.start`` records a trace context with the instance it creates.)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from .database import Connection
from .sql_loader import q


class MetricsSnapshot(NamedTuple):
    """The database-wide gauges: per queue (orchestrator, work, timers) its rows and the age of
    its oldest ready row in seconds; instances per status; rows per flow queue; the oldest
    running activity in seconds; sessions waiting on a lock; the WAL position in bytes."""

    depths: dict[str, int]
    oldest_ages: dict[str, float]
    statuses: dict[str, int]
    flow_depths: dict[str, int]
    oldest_running: float
    lock_waits: int
    wal_bytes: float


async def metrics_snapshot(conn: Connection) -> MetricsSnapshot:
    """Every database-wide gauge, from one statement."""
    r = await conn.fetchrow(q("metrics_snapshot"))
    queues = ("orchestrator", "work", "timers")
    return MetricsSnapshot(
        depths={name: int(r[f"{name}_depth"]) for name in queues},
        oldest_ages={name: max(0.0, float(r[f"{name}_age"])) for name in queues},
        statuses={k: int(v) for k, v in orjson.loads(r["statuses"]).items()},
        flow_depths={k: int(v) for k, v in orjson.loads(r["flow_depths"]).items()},
        oldest_running=max(0.0, float(r["oldest_running"])),
        lock_waits=int(r["lock_waits"]),
        wal_bytes=float(r["wal_bytes"]),
    )


async def trace_contexts(conn: Connection, *, instance_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The trace context each instance's spans join (its own or its nearest ancestor's), by id;
    instances without one are absent."""
    rows = await conn.fetch(q("trace_contexts"), list(instance_ids))
    return {r["instance_id"]: orjson.loads(r["trace_context"]) for r in rows}


async def report_running(conn: Connection, *, worker_id: str, since: datetime | None) -> None:
    """Record when this worker's longest-running activity started (None: nothing runs)."""
    await conn.execute(q("report_running"), worker_id, since)
