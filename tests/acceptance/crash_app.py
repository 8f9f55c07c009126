"""The app that acceptance tests run in real worker processes and kill with SIGKILL."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

import pgdurable_async as pgd

app = pgd.App()
MARKERS = Path(os.environ.get("PGDURABLE_TEST_MARKERS", "/tmp/pgdurable-markers"))


@app.activity
async def slow_step(ctx: pgd.ActivityContext, n: int) -> int:
    """Leaves a marker file when it starts, then takes a while: a window to kill the worker in."""
    MARKERS.mkdir(parents=True, exist_ok=True)
    (MARKERS / f"{ctx.activity_id.replace(':', '_')}.{ctx.attempt}.{os.getpid()}").touch()
    await anyio.sleep(1.0)
    return n * n


@app.activity
async def quick(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.transaction
async def record(ctx: pgd.TransactionContext, key: str) -> str:
    """Counts its effect in a table: exactly once, whatever is killed."""
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO public.effects (key, activity_id) VALUES ($1, $2)", key, ctx.activity_id)
    return key


@app.orchestration
async def pipeline(ctx: pgd.OrchestrationContext, n: int) -> dict[str, object]:
    squares = await ctx.all([ctx.call_activity(slow_step, i) for i in range(n)], limit=4)
    keys = await ctx.all([ctx.call_activity(record, f"{ctx.instance_id}/{i}") for i in range(n)])
    return {"sum": sum(squares), "recorded": len(keys)}


def burn() -> int:
    """Deterministic CPU work (about half a second): keeps a turn's transaction open."""
    return sum(i * i for i in range(3_000_000)) % 7


@app.orchestration
async def heavy(ctx: pgd.OrchestrationContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await ctx.call_activity(quick, i) + burn()
        await ctx.call_activity(record, f"{ctx.instance_id}/{i}")
    return total
