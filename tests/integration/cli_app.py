"""A small app served by ``python -m pgdurable_async worker`` in tests/integration/test_cli.py."""

from __future__ import annotations

from typing import Any

import anyio

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def add(ctx: pgd.ActivityContext, pair: list[int]) -> int:
    return pair[0] + pair[1]


@app.activity
async def slow(ctx: pgd.ActivityContext, seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


@app.orchestration
async def add_pair(ctx: pgd.OrchestrationContext, pair: list[int]) -> int:
    return int(await ctx.call_activity(add, pair))


@app.orchestration
async def approval(ctx: pgd.OrchestrationContext, _: Any) -> dict[str, Any]:
    ctx.set_custom_status("waiting")
    data = await ctx.wait_for_event("approve")
    return {"approved": data}


@app.orchestration
async def slow_one(ctx: pgd.OrchestrationContext, seconds: float) -> float:
    return float(await ctx.call_activity(slow, seconds))


@app.activity(queue=pgd.Queue("cli-queue", concurrency=2, rate_limit=pgd.RateLimit(5, per=1), key_concurrency=1))
async def queued(ctx: pgd.ActivityContext, n: int) -> int:
    return n


@app.activity(retry=pgd.RetryPolicy(max_attempts=1))
async def explode(ctx: pgd.ActivityContext, message: str) -> None:
    raise ValueError(message)


@app.orchestration
async def doomed(ctx: pgd.OrchestrationContext, message: str) -> None:
    """Fails: its only activity raises ValueError(message), with no retries."""
    await ctx.call_activity(explode, message)
