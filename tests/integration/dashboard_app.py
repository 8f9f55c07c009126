"""The app the dashboard tests run: activities (one that retries), a timer, a child, an event wait."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pgdurable_async as pgd
from pgdurable_async import dsl

app = pgd.App()
_flaky_attempts: dict[str, int] = {}


@app.activity
async def fetch(ctx: pgd.ActivityContext, n: int) -> int:
    return n * 10


@app.activity(retry=pgd.RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=1.0))
async def flaky(ctx: pgd.ActivityContext, key: str) -> str:
    """Fails its first attempt, then succeeds: the timeline shows 2 attempts."""
    if ctx.attempt < 2:
        raise RuntimeError(f"transient failure of {key}")
    return f"ok after {ctx.attempt} attempts"


@app.activity(retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.05))
async def broken(ctx: pgd.ActivityContext, message: str) -> None:
    raise ValueError(message)


@app.orchestration
async def child_flow(ctx: pgd.OrchestrationContext, n: int) -> int:
    return int(await ctx.call_activity(fetch, n)) + 1


@app.orchestration
async def pipeline(ctx: pgd.OrchestrationContext, data: dict[str, Any]) -> dict[str, Any]:
    """Two activities in parallel, a retried one, a timer, a child, and (optionally) a failing activity."""
    ctx.set_custom_status({"stage": "fetching"})
    first = await ctx.all([ctx.call_activity(fetch, 1), ctx.call_activity(fetch, 2)])
    retried = await ctx.call_activity(flaky, "x")
    await ctx.sleep(timedelta(seconds=data.get("sleep", 0.3)))
    child = await ctx.call_orchestration(child_flow, 4, instance_id=f"{ctx.instance_id}-child")
    ctx.set_custom_status({"stage": "done"})
    if data.get("fail"):
        try:
            await ctx.call_activity(broken, data["fail"])
        except pgd.ActivityError:
            pass
    return {"first": first, "retried": retried, "child": child}


@app.orchestration
async def waiter(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    """Waits for an event (with a timeout) while a long timer runs."""
    ctx.set_custom_status(_)
    got = await ctx.any([ctx.wait_for_event("approve", timeout=timedelta(hours=1)), ctx.sleep(timedelta(hours=2))])
    return got.result()


@app.orchestration
async def explode(ctx: pgd.OrchestrationContext, message: str) -> None:
    raise RuntimeError(message)


app.graph("graph_flow", dsl.sql("SELECT 1 AS one").bind("a") >> (dsl.sql("SELECT $a + 1") & dsl.sleep(0.1)))
