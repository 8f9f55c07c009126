"""Durable values: ctx.set_value records value_set; get_value reads it; wait_value wakes on NOTIFY."""

from __future__ import annotations

import time
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._client import client as client_module
from pgdurable_async._store import instance_store

pytestmark = pytest.mark.timeout(60)
app = pgd.App()


@app.activity
async def double(ctx: pgd.ActivityContext, n: int) -> int:
    return n * 2


@app.orchestration
async def agent(ctx: pgd.OrchestrationContext, steps: int) -> str:
    ctx.set_value("progress", 0)
    for i in range(1, steps + 1):
        await ctx.call_activity(double, i)
        ctx.set_value("progress", i)
    ctx.set_value("plan", {"steps": steps, "done": True})
    answer = await ctx.wait_for_event("go")
    ctx.set_value("answer", answer)
    ctx.set_value("nothing", None)
    return "ok"


@app.orchestration
async def restarting(ctx: pgd.OrchestrationContext, n: int) -> int:
    ctx.set_value(f"gen-{n}", n)
    if n < 3:
        ctx.continue_as_new(n + 1)
    return n


async def _history_kinds(client: pgd.Client, instance_id: str) -> list[str]:
    return [e.kind for e in await client.history(instance_id)]


async def test_values_are_recorded_readable_and_outlive_the_instance(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, cache_size=1) as runtime:  # tiny cache: turns replay often
        client = runtime.client
        handle = await client.start(agent, 3, instance_id="a1")
        assert await client.wait_value("a1", "plan", timeout=20) == {"steps": 3, "done": True}
        # a2's turns come after a1's last one, so they evict a1: its next turn must replay.
        await client.start(agent, 1, instance_id="a2")
        assert await client.wait_value("a2", "plan", timeout=20) == {"steps": 1, "done": True}
        replays_before = runtime.turns.stats["replays"]
        assert await client.get_value("a1", "progress") == 3
        assert await handle.get_value("answer", "unset") == "unset"
        assert await client.get_value("a1", "answer") is None
        await handle.raise_event("go", "forty-two")
        assert await handle.result(timeout=20) == "ok"
        assert await client.get_value("a1", "answer") == "forty-two"
        assert await client.get_value("a1", "nothing", default="dflt") is None  # set to null: not the default
        events = await client.history("a1")
        sets = [e.data for e in events if e.kind == "value_set"]
        # One event per call, none re-recorded by the replays the tiny cache forced.
        assert sets == [{"key": "progress", "value": i} for i in range(4)] + [
            {"key": "plan", "value": {"steps": 3, "done": True}},
            {"key": "answer", "value": "forty-two"},
            {"key": "nothing", "value": None},
        ]
        assert runtime.turns.stats["replays"] > replays_before
    async with pgd.Client(dsn) as client:  # a finished instance's values stay readable
        assert await client.get_value("a1", "progress") == 3
        assert await client.wait_value("a1", "answer", timeout=5) == "forty-two"
        with pytest.raises(pgd.InstanceNotFound):
            await client.get_value("nope", "progress")
        with pytest.raises(pgd.InstanceNotFound):
            await client.wait_value("nope", "progress", timeout=1)
        await client.purge("a1")
        with pytest.raises(pgd.InstanceNotFound):
            await client.get_value("a1", "progress")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.instance_values WHERE instance_id = 'a1'") == 0
    finally:
        await conn.close()


async def test_values_survive_continue_as_new(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(restarting, 1, instance_id="r1")
        assert await handle.result(timeout=20) == 3
        assert [await handle.get_value(f"gen-{n}") for n in (1, 2, 3)] == [1, 2, 3]


async def test_wait_value_times_out(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.start(agent, 0, instance_id="t1")
        started = time.monotonic()
        with pytest.raises(pgd.TimeoutError, match="did not set 'answer'"):
            await runtime.client.wait_value("t1", "answer", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5


async def test_wait_value_is_woken_by_notify_not_polling(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the safety re-check an hour away, only the NOTIFY can wake the waiter: it
    returns within moments of the value being set and reads the value twice in all."""
    monkeypatch.setattr(client_module, "_RECHECK_SECONDS", 3600.0)
    reads = 0
    real_get_value = instance_store.get_value

    async def counting_get_value(conn: Any, **kwargs: Any) -> tuple[bool, Any]:
        nonlocal reads
        reads += 1
        return await real_get_value(conn, **kwargs)

    monkeypatch.setattr(instance_store, "get_value", counting_get_value)
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.start(agent, 0, instance_id="w1")
        await runtime.client.wait_value("w1", "plan", timeout=10)  # its first turn is over: it waits for "go"
        reads = 0
        async with pgd.Client(dsn) as waiter:  # its own pool and LISTEN session
            result: list[Any] = []
            woke_at = 0.0

            async def wait() -> None:
                nonlocal woke_at
                result.append(await waiter.wait_value("w1", "answer", timeout=30))
                woke_at = time.monotonic()

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(1.5)  # the waiter sits idle: no polling in between
                assert reads == 1 and not result
                await runtime.client.raise_event("w1", "go", "now")
                raised_at = time.monotonic()
            assert result == ["now"]
            assert woke_at - raised_at < 1.0
            assert reads == 2
