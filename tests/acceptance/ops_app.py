"""The app the metrics, logging and tracing tests serve from real worker processes.

``blocked`` and ``blocked_queued`` run until the file named by ``$PGDURABLE_OPS_RELEASE``
exists, so a test can hold activities running while it scrapes.  With
``$PGDURABLE_OPS_SPANS`` set, the process exports its spans to that file, one JSON
object per line (tests/spans.py), for the cross-process tracing test.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import anyio

import pgdurable_async as pgd

if os.environ.get("PGDURABLE_OPS_SPANS"):
    from tests.spans import FileSpanExporter, install

    install(FileSpanExporter(Path(os.environ["PGDURABLE_OPS_SPANS"])))

app = pgd.App()
held = pgd.Queue("held", concurrency=10)


async def _until_released() -> None:
    marker = Path(os.environ["PGDURABLE_OPS_RELEASE"])
    while not marker.exists():
        await anyio.sleep(0.05)


@app.activity
async def double(ctx: pgd.ActivityContext, x: int) -> int:
    return 2 * x


@app.activity(retry=pgd.RetryPolicy(max_attempts=3, initial_interval=0.1))
async def flaky(ctx: pgd.ActivityContext, x: int) -> int:
    if ctx.attempt == 1:
        raise ValueError("the first attempt fails")
    return x


@app.activity(retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.1))
async def doomed(ctx: pgd.ActivityContext, x: int) -> int:
    raise RuntimeError(f"doomed {x}")


@app.activity
async def blocked(ctx: pgd.ActivityContext, x: int) -> int:
    await _until_released()
    return x


@app.activity(queue=held)
async def blocked_queued(ctx: pgd.ActivityContext, x: int) -> int:
    await _until_released()
    return x


@app.orchestration
async def fan(ctx: pgd.OrchestrationContext, n: int) -> int:
    return sum(await ctx.all([ctx.call_activity(double, i) for i in range(n)]))


@app.orchestration
async def retrying(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity(flaky, x))


@app.orchestration
async def failing(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity(doomed, x))


@app.orchestration
async def waiting(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity(blocked, x))


@app.orchestration
async def waiting_queued(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity(blocked_queued, x))


@app.orchestration
async def sleeper(ctx: pgd.OrchestrationContext, _: None) -> None:
    await ctx.sleep(timedelta(hours=1))
