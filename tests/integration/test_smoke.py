from __future__ import annotations

from datetime import timedelta

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def double(ctx: pgd.ActivityContext, x: int) -> int:
    return 2 * x


@app.orchestration
async def fan(ctx: pgd.OrchestrationContext, n: int) -> int:
    values = await ctx.all([ctx.call_activity(double, i) for i in range(n)], limit=8)
    await ctx.sleep(timedelta(milliseconds=200))
    return sum(values)


async def test_fan_out_completes(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_concurrency=16) as runtime:
        handle = await runtime.client.start(fan, 50, instance_id="fan-1")
        assert await handle.result(timeout=30) == sum(2 * i for i in range(50))
        history = await runtime.client.history("fan-1")
        kinds = [e.kind for e in history]
        assert kinds.count("activity_scheduled") == 50
        assert kinds.count("activity_completed") == 50
        assert kinds[0] == "orchestration_started" and kinds[-1] == "orchestration_completed"
        assert [e.seq for e in history] == list(range(1, len(history) + 1))


async def test_wide_fan_out_is_not_replayed_per_completion(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_concurrency=64) as runtime:
        handle = await runtime.client.start(fan, 2000)
        assert await handle.result(timeout=60) == sum(2 * i for i in range(2000))
        stats = runtime.turns.stats
        assert stats["replays"] == 0, stats  # every turn resumed the cached execution
        assert stats["turns"] < 2000 / 4, stats  # completions are folded into few turns
