"""The app tests/integration/test_pgbouncer.py runs behind PgBouncer, in-process and as a worker process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio

import pgdurable_async as pgd

app = pgd.App()
MARKERS = Path(os.environ.get("PGDURABLE_TEST_MARKERS", "/tmp/pgdurable-pgbouncer-markers"))


@app.activity
async def square(ctx: pgd.ActivityContext, n: int) -> int:
    return n * n


@app.activity
async def slow_square(ctx: pgd.ActivityContext, n: int) -> int:
    """Leaves a marker when it starts, then takes a second: a window to SIGKILL its worker in."""
    MARKERS.mkdir(parents=True, exist_ok=True)
    (MARKERS / f"{ctx.activity_id.replace(':', '_')}.{ctx.attempt}.{os.getpid()}").touch()
    await anyio.sleep(1.0)
    return n * n


@app.transaction
async def record(ctx: pgd.TransactionContext, key: str) -> str:
    """Its effect commits with its completion: exactly one row per key, whatever is killed."""
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO effects (key) VALUES ($1)", key)  # the user's search_path: public
    return key


@app.orchestration
async def child(ctx: pgd.OrchestrationContext, n: int) -> int:
    return int(await ctx.call_activity(square, n)) + 1


@app.orchestration
async def flow(ctx: pgd.OrchestrationContext, n: int) -> dict[str, Any]:
    """A fan-out, a timer, an event, a transactional activity and a child orchestration."""
    squares = await ctx.all([ctx.call_activity(square, i) for i in range(n)], limit=4)
    await ctx.sleep(0.3)
    ctx.set_custom_status("waiting")
    event = await ctx.wait_for_event("go", timeout=60)
    key = await ctx.call_activity(record, f"{ctx.instance_id}/done")
    grandchild = await ctx.call_orchestration(child, n)
    return {"sum": sum(squares), "event": event, "key": key, "child": grandchild}


@app.orchestration
async def slow_flow(ctx: pgd.OrchestrationContext, n: int) -> dict[str, Any]:
    squares = await ctx.all([ctx.call_activity(slow_square, i) for i in range(n)])
    key = await ctx.call_activity(record, f"{ctx.instance_id}/done")
    return {"sum": sum(squares), "key": key}
