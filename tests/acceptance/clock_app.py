"""A worker app for the clock-skew test: a durable nap that reports the times it saw."""

from __future__ import annotations

from datetime import timedelta

import pgdurable_async as pgd

app = pgd.App()


@app.orchestration
async def nap(ctx: pgd.OrchestrationContext, seconds: float) -> list[str]:
    before = ctx.now()
    await ctx.sleep(timedelta(seconds=seconds))
    return [before.isoformat(), ctx.now().isoformat()]
