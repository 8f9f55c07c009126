"""The app that the failover test runs in real worker processes while the primary dies."""

from __future__ import annotations

from datetime import timedelta

import anyio

import pgdurable_async as pgd

app = pgd.App()

#: Every RECORD_EVERY-th task of a fan-out is a transactional activity writing an effect row.
RECORD_EVERY = 10


@app.activity
async def square(ctx: pgd.ActivityContext, n: int) -> int:
    await anyio.sleep(0.1)  # long enough for a fan-out to be in flight when the primary dies
    return n * n


@app.transaction
async def record(ctx: pgd.TransactionContext, key: str) -> str:
    """Writes its effect in the transaction that records its completion: exactly once."""
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO public.effects (key, activity_id) VALUES ($1, $2)", key, ctx.activity_id)
    return key


@app.orchestration
async def fanout(ctx: pgd.OrchestrationContext, n: int) -> dict[str, int]:
    tasks = [
        ctx.call_activity(record, f"{ctx.instance_id}/{i}") if i % RECORD_EVERY == 0 else ctx.call_activity(square, i)
        for i in range(n)
    ]
    results = await ctx.all(tasks, limit=48)  # new tasks are scheduled as others finish: turns run throughout
    return {"sum": sum(r for r in results if isinstance(r, int)), "recorded": sum(isinstance(r, str) for r in results)}


@app.orchestration
async def small(ctx: pgd.OrchestrationContext, k: int) -> dict[str, object]:
    sq = await ctx.call_activity(square, k)
    go = await ctx.wait_for_event("go", timeout=timedelta(seconds=90))
    await ctx.sleep(timedelta(seconds=0.3))  # a durable timer, maybe across the failover
    key = await ctx.call_activity(record, f"{ctx.instance_id}/0")
    return {"k": k, "sq": sq, "go": go, "key": key}


def fanout_output(n: int) -> dict[str, int]:
    """What ``fanout(n)`` returns."""
    squares = [i * i for i in range(n) if i % RECORD_EVERY != 0]
    return {"sum": sum(squares), "recorded": n - len(squares)}
