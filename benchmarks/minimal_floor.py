"""The minimal raw-SQL floor of an N-way fan-out: the least SQL any durable engine runs per activity.

As issue 11 defines it, on the engine's own tables (same indexes and triggers):

1. one transaction with one bulk insert of N ``activity_scheduled`` history rows and one of N work items;
2. ``SESSIONS`` sessions, each looping: claim 64 items in one statement
   (``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 64) RETURNING``), then ack them in
   one transaction (delete the items, insert their completion messages);
3. one session writing the completion history in batches of up to 1,000 (move messages to history,
   one statement per batch) until all N are recorded.

No replay, no capacity rule, no NOTIFY round trips: the sessions are woken locally.  The claim
sessions run with ``enable_bitmapscan = off``, as the engine's claim function does (schema 0018):
with the statistics of a queue that was empty at its last ANALYZE, the planner would otherwise
bitmap-scan and sort every ready row per claim.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg

from pgdurable_async._runtime.wakeup import Wakeup

__all__ = ["SESSIONS", "CLAIM", "HISTORY_BATCH", "run_minimal_floor"]

SESSIONS = 4
CLAIM = 64
HISTORY_BATCH = 1000
_NAME = "bench_noop"
_ORCHESTRATION = "bench_fanout"

_SCHEDULE_HISTORY = """
INSERT INTO history (instance_id, execution_id, seq, event_type, payload)
SELECT $1, 1, 1 + g, 'activity_scheduled',
       jsonb_build_object('task_id', g, 'name', $3::text, 'input', g)
FROM generate_series(1, $2::int) AS g
"""
_SCHEDULE_WORK = """
INSERT INTO work_queue (instance_id, execution_id, task_id, orchestration, name, input)
SELECT $1, 1, g, $4, $3, to_jsonb(g) FROM generate_series(1, $2::int) AS g
"""
_CLAIM = """
UPDATE work_queue SET visible_at = now() + interval '30 seconds', lease_token = gen_random_uuid(), lease_owner = $2
WHERE id IN (SELECT id FROM work_queue WHERE name = $1 AND visible_at <= now() FOR UPDATE SKIP LOCKED LIMIT $3)
RETURNING id, instance_id, execution_id, task_id, orchestration, input
"""
_ACK_DELETE = "DELETE FROM work_queue WHERE id = ANY($1::bigint[])"
_ACK_MESSAGES = """
INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
SELECT $1, 1, $2, 'activity_completed', jsonb_build_object('task_id', t, 'result', r)
FROM unnest($3::int[], $4::text[]::jsonb[]) AS u(t, r)
"""
_HISTORY = """
WITH moved AS (
    DELETE FROM orchestrator_queue WHERE id IN (
        SELECT id FROM orchestrator_queue WHERE instance_id = $1 ORDER BY id LIMIT $2)
    RETURNING id, kind, payload
)
INSERT INTO history (instance_id, execution_id, seq, event_type, payload)
SELECT $1, 1, $3 + row_number() OVER (ORDER BY id), kind, payload FROM moved
"""


async def run_minimal_floor(
    conns: list[asyncpg.Connection], n: int, *, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Run the floor for ``n`` activities on ``SESSIONS + 1`` connections; returns its figures."""
    assert len(conns) >= SESSIONS + 1
    instance_id = f"minimal-{uuid.uuid4().hex[:8]}"
    acked = Wakeup()
    claimers_done = anyio.Event()
    state = {"recorded": 0, "acked": 0, "claims": 0, "history_batches": 0}
    writer = conns[SESSIONS]
    for conn in conns[:SESSIONS]:  # the claim's plan must not depend on statistics (as schema 0018's claim_work)
        await conn.execute("SET enable_bitmapscan = off")
    await writer.execute(
        "INSERT INTO instances (instance_id, name, status, input) VALUES ($1, $2, 'running', $3::text::jsonb)",
        instance_id, _ORCHESTRATION, str(n),
    )
    t0 = time.perf_counter()
    async with writer.transaction():
        await writer.execute(_SCHEDULE_HISTORY, instance_id, n, _NAME)
        await writer.execute(_SCHEDULE_WORK, instance_id, n, _NAME, _ORCHESTRATION)

    async def claimer(conn: asyncpg.Connection, index: int) -> None:
        owner = f"minimal:{index}"
        while True:
            rows = await conn.fetch(_CLAIM, _NAME, owner, CLAIM)
            if not rows:
                return
            state["claims"] += 1
            async with conn.transaction():
                await conn.execute(_ACK_DELETE, [r["id"] for r in rows])
                await conn.execute(_ACK_MESSAGES, instance_id, _ORCHESTRATION,
                                   [r["task_id"] for r in rows], [r["input"] for r in rows])
            state["acked"] += len(rows)
            acked.set()

    async def claimers() -> None:
        async with anyio.create_task_group() as tg:
            for index in range(SESSIONS):
                tg.start_soon(claimer, conns[index], index)
        claimers_done.set()
        acked.set()

    async def history() -> None:
        seq = 1 + n
        while state["recorded"] < n:
            seen = acked.generation
            full = state["acked"] - state["recorded"] >= HISTORY_BATCH
            if not full and not claimers_done.is_set():
                await acked.wait(seen)
                continue
            status = await writer.execute(_HISTORY, instance_id, HISTORY_BATCH, seq)
            moved = int(status.rsplit(" ", 1)[1])
            if not moved and claimers_done.is_set() and state["recorded"] < n:
                raise RuntimeError(f"minimal floor: {n - state['recorded']} completions never arrived")
            seq += moved
            state["recorded"] += moved
            state["history_batches"] += 1
            if progress is not None:
                progress(moved)

    async with anyio.create_task_group() as tg:
        tg.start_soon(claimers)
        tg.start_soon(history)
    elapsed = time.perf_counter() - t0
    completed = await writer.fetchval(
        "SELECT count(*) FROM history WHERE instance_id = $1 AND event_type = 'activity_completed'", instance_id
    )
    return {
        "fanout_seconds": elapsed,
        "fanout_activities_per_s": n / elapsed,
        "claims": state["claims"],
        "history_batches": state["history_batches"],
        "fanout_ok": completed == n,
    }
