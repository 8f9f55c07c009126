"""Orchestrations for the lifecycle tests (cascade, values, fork, retention), also served by worker processes.

``step`` records each execution in ``public.runs`` (a transactional activity: the row
and the completion commit together), so tests count executions exactly.  ``flaky``
fails while ``LIFECYCLE_FAIL`` is set in the worker's environment: the "bug" a later
deploy (a worker without it) fixes.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pgdurable_async as pgd

app = pgd.App()
RUNS_TABLE = "CREATE TABLE IF NOT EXISTS public.runs (instance_id text NOT NULL, name text NOT NULL)"


@app.transaction(retry=pgd.RetryPolicy(max_attempts=1))
async def step(ctx: pgd.TransactionContext, name: str) -> str:
    await ctx.conn.execute("INSERT INTO public.runs VALUES ($1, $2)", ctx.instance_id, name)
    return f"{name} done"


@app.activity(retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.05))
async def flaky(ctx: pgd.ActivityContext, name: str) -> str:
    if os.environ.get("LIFECYCLE_FAIL"):
        raise RuntimeError(f"{name}: the bug")
    return f"{name} fixed"


@app.activity
async def echo(ctx: pgd.ActivityContext, value: Any) -> Any:
    return value


@app.orchestration
async def pipeline(ctx: pgd.OrchestrationContext, _: Any) -> list[str]:
    """Two steps, then one that fails until the bug is fixed, then one more."""
    ctx.set_value("stage", "started")
    done = [await ctx.call_activity(step, "one"), await ctx.call_activity(step, "two")]
    ctx.set_value("stage", "two done")
    done.append(await ctx.call_activity(flaky, "three"))
    done.append(await ctx.call_activity(step, "four"))
    ctx.set_value("stage", "finished")
    return done


@app.orchestration
async def sleeper(ctx: pgd.OrchestrationContext, depth: int) -> str:
    """A chain of ``depth`` children below it, every level asleep for an hour."""
    if depth > 0:
        child = ctx.call_orchestration(sleeper, depth - 1, instance_id=f"{ctx.instance_id}.c")
        await ctx.all([child, ctx.sleep(timedelta(hours=1))])
    else:
        await ctx.sleep(timedelta(hours=1))
    return "woke"


@app.orchestration
async def quick(ctx: pgd.OrchestrationContext, value: Any) -> Any:
    return value


@app.orchestration
async def with_done_child(ctx: pgd.OrchestrationContext, _: Any) -> str:
    """A child that finishes at once, then a second level that sleeps."""
    await ctx.call_orchestration(quick, "early", instance_id=f"{ctx.instance_id}.done")
    return str(await ctx.call_orchestration(sleeper, 1, instance_id=f"{ctx.instance_id}.c"))
