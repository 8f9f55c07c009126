"""Two versions of one workflow, for the replay tests: ``app`` (today's) and ``reordered`` (steps swapped)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pgdurable_async as pgd

app = pgd.App()
reordered = pgd.App()


@app.activity
async def charge(ctx: pgd.ActivityContext, order: dict[str, Any]) -> str:
    return f"charged {order['id']}"


@app.activity
async def ship(ctx: pgd.ActivityContext, order: dict[str, Any]) -> str:
    return f"shipped {order['id']}"


@app.orchestration
async def fulfil(ctx: pgd.OrchestrationContext, order: dict[str, Any]) -> list[str]:
    key = str(ctx.new_uuid())  # an idempotency key: replay needs the instance id to reproduce it
    charged = await ctx.call_activity(charge, {**order, "key": key})
    await ctx.sleep(timedelta(days=2))  # the cooling-off period
    shipped = await ctx.call_activity(ship, order)
    return [charged, shipped]


@reordered.activity(name="charge")
async def charge_v2(ctx: pgd.ActivityContext, order: dict[str, Any]) -> str:
    return f"charged {order['id']}"


@reordered.activity(name="ship")
async def ship_v2(ctx: pgd.ActivityContext, order: dict[str, Any]) -> str:
    return f"shipped {order['id']}"


@reordered.orchestration(name="fulfil")
async def fulfil_v2(ctx: pgd.OrchestrationContext, order: dict[str, Any]) -> list[str]:
    shipped = await ctx.call_activity(ship_v2, order)  # shipping now comes first: a reordered step
    charged = await ctx.call_activity(charge_v2, {**order, "key": str(ctx.new_uuid())})
    await ctx.sleep(timedelta(days=2))
    return [charged, shipped]
