"""The tiny app of the start flood: one orchestration calling one activity."""

from __future__ import annotations

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def bump(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.orchestration
async def tiny(ctx: pgd.OrchestrationContext, n: int) -> int:
    return await ctx.call_activity(bump, n)
