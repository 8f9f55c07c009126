"""Orchestration features end to end: events, timers, cancel, terminate, children, continue_as_new."""

from __future__ import annotations

from datetime import timedelta

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def add(ctx: pgd.ActivityContext, pair: list[int]) -> int:
    return pair[0] + pair[1]


@app.activity
async def slow(ctx: pgd.ActivityContext, seconds: float) -> str:
    await anyio.sleep(seconds)
    return "slow"


@app.orchestration
async def approval(ctx: pgd.OrchestrationContext, timeout: float) -> object:
    try:
        return await ctx.wait_for_event("approval", timeout=timedelta(seconds=timeout))
    except pgd.TimeoutError:
        return "timed out"


@app.orchestration
async def two_events(ctx: pgd.OrchestrationContext, _: object) -> list[object]:
    first = await ctx.wait_for_event("e")
    second = await ctx.wait_for_event("e")
    return [first, second]


@app.orchestration
async def race(ctx: pgd.OrchestrationContext, seconds: float) -> str:
    winner = await ctx.any([ctx.call_activity(slow, seconds), ctx.sleep(0.2)])
    return "activity" if winner.result() == "slow" else "timer"


@app.orchestration
async def cancellable(ctx: pgd.OrchestrationContext, _: object) -> str:
    try:
        await ctx.sleep(timedelta(hours=1))
    except pgd.Cancelled:
        ctx.set_custom_status("cleaning up")
        await ctx.call_activity(add, [1, 1])
        raise
    return "slept"


@app.orchestration
async def child(ctx: pgd.OrchestrationContext, n: int) -> int:
    if n < 0:
        raise RuntimeError("negative")
    return int(await ctx.call_activity(add, [n, n]))


@app.orchestration
async def parent(ctx: pgd.OrchestrationContext, n: int) -> dict[str, object]:
    kids = await ctx.all([ctx.call_orchestration(child, i) for i in range(n)])
    named = await ctx.call_orchestration(child, 100, instance_id=f"{ctx.instance_id}-named")
    try:
        await ctx.call_orchestration(child, -1)
        failed = None
    except pgd.PgDurableError as exc:
        failed = type(exc).__name__
    return {"kids": kids, "named": named, "failed": failed}


@app.orchestration
async def counter(ctx: pgd.OrchestrationContext, state: dict[str, int]) -> int:
    total = int(await ctx.call_activity(add, [state["total"], state["n"]]))
    if state["n"] == 0:
        return total
    ctx.continue_as_new({"n": state["n"] - 1, "total": total})


@app.orchestration
async def deterministic(ctx: pgd.OrchestrationContext, _: object) -> list[str]:
    values = [str(ctx.new_uuid()), str(ctx.random()), ctx.now().isoformat()]
    await ctx.sleep(0.05)
    return values + [str(ctx.new_uuid())]


async def test_event_delivery_and_timeout(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        waiting = await client.start(approval, 30, instance_id="wait-ok")
        expiring = await client.start(approval, 0.3, instance_id="wait-expire")
        await client.raise_event("wait-ok", "approval", {"by": "alice's \"quote\"; DROP TABLE x"})
        assert await waiting.result(timeout=30) == {"by": "alice's \"quote\"; DROP TABLE x"}
        assert await expiring.result(timeout=30) == "timed out"
        kinds = [e.kind for e in await client.history("wait-ok")]
        assert "event_received" in kinds and "timer_created" in kinds


async def test_events_are_buffered_in_order(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(two_events, None)
        await runtime.client.raise_event(handle.instance_id, "e", 1)
        await runtime.client.raise_event(handle.instance_id, "e", 2)
        assert await handle.result(timeout=30) == [1, 2]


async def test_any_returns_first_finished(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        assert await (await runtime.client.start(race, 5)).result(timeout=30) == "timer"
        assert await (await runtime.client.start(race, 0)).result(timeout=30) == "activity"


async def test_cooperative_cancel(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(cancellable, None, instance_id="c1")
        await _wait_for_kind(runtime.client, "c1", "timer_created")
        await runtime.client.cancel("c1", reason="user asked")
        with pytest.raises(pgd.Cancelled):
            await handle.result(timeout=30)
        try:  # a service's ordinary error handling catches it too
            await handle.result(timeout=30)
        except pgd.PgDurableError as exc:
            assert isinstance(exc, pgd.Cancelled) and exc.reason == "user asked"
        else:
            pytest.fail("a cancelled instance's result returned")
        state = await runtime.client.status("c1")
        assert state.status is pgd.Status.CANCELLED and state.custom_status == "cleaning up"
        kinds = [e.kind for e in await runtime.client.history("c1")]
        assert kinds[-1] == "orchestration_cancelled"
        assert "cancel_requested" in kinds and kinds.index("cancel_requested") < kinds.index("activity_scheduled")


async def test_terminate_stops_everything(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(cancellable, None, instance_id="t1")
        await _wait_for_kind(runtime.client, "t1", "timer_created")
        await runtime.client.terminate("t1", reason="ops")
        with pytest.raises(pgd.InstanceFailed):
            await handle.result(timeout=30)
        assert (await runtime.client.status("t1")).status is pgd.Status.TERMINATED
        assert (await runtime.client.history("t1"))[-1].kind == "orchestration_terminated"
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM pgdurable.timers WHERE instance_id = 't1'") == 0
        finally:
            await conn.close()
        await runtime.client.terminate("t1")  # a finished instance: nothing to do
        await runtime.client.purge("t1")
        with pytest.raises(pgd.InstanceNotFound):
            await runtime.client.status("t1")


async def test_purge_refuses_running_instances(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.start(cancellable, None, instance_id="p1")
        with pytest.raises(pgd.PgDurableError, match="only finished"):
            await runtime.client.purge("p1")


async def test_sub_orchestrations(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(parent, 3, instance_id="parent-1")
        result = await handle.result(timeout=60)
        assert result == {"kids": [0, 2, 4], "named": 200, "failed": "SubOrchestrationError"}
        named = await runtime.client.status("parent-1-named")
        assert named.parent_instance_id == "parent-1" and named.output == 200
        kinds = [e.kind for e in await runtime.client.history("parent-1")]
        assert kinds.count("sub_orchestration_scheduled") == 5
        assert kinds.count("sub_orchestration_completed") == 4 and kinds.count("sub_orchestration_failed") == 1


async def test_continue_as_new(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(counter, {"n": 3, "total": 0}, instance_id="loop")
        assert await handle.result(timeout=60) == 6
        state = await runtime.client.status("loop")
        assert state.execution_id == 4 and state.input == {"n": 0, "total": 6}
        first = await runtime.client.history("loop", execution_id=1)
        assert first[-1].kind == "continued_as_new" and first[-1].data["input"] == {"n": 2, "total": 3}
        last = await runtime.client.history("loop")
        assert last[0].kind == "orchestration_started" and last[-1].kind == "orchestration_completed"


async def test_deterministic_helpers_survive_replay(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, cache_size=0) as runtime:  # no cache: every turn replays
        result = await (await runtime.client.start(deterministic, None)).result(timeout=30)
        assert runtime.turns.stats["replays"] >= 1
    assert len(set(result)) == 4


async def _wait_for_kind(client: pgd.Client, instance_id: str, kind: str) -> None:
    with anyio.fail_after(20):
        while kind not in [e.kind for e in await client.history(instance_id)]:
            await anyio.sleep(0.05)
