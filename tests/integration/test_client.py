"""Client API against a real runtime: start, status, result, list, history, errors."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def echo(ctx: pgd.ActivityContext, value: object) -> object:
    return value


@app.orchestration
async def single(ctx: pgd.OrchestrationContext, value: object) -> object:
    ctx.set_custom_status({"stage": "calling"})
    result = await ctx.call_activity(echo, value)
    ctx.set_custom_status({"stage": "done"})
    return result


@app.orchestration
async def waits(ctx: pgd.OrchestrationContext, _: object) -> object:
    return await ctx.wait_for_event("go")


@app.orchestration
async def boom(ctx: pgd.OrchestrationContext, _: object) -> None:
    raise ValueError("bad input 42")


@app.orchestration
async def tally(ctx: pgd.OrchestrationContext, _: object) -> list[object]:
    """Collects "tick" events until a "stop" event."""
    ticks: list[object] = []
    while True:
        winner = await ctx.any([ctx.wait_for_event("tick"), ctx.wait_for_event("stop")])
        if winner.name == "stop":
            return ticks
        ticks.append(winner.result())


async def _counts(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM pgdurable.instances"),
            await conn.fetchval("SELECT count(*) FROM pgdurable.orchestrator_queue"),
        )
    finally:
        await conn.close()


async def test_start_status_result_history(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        handle = await client.start(single, {"a": [1, 2, "x"]}, instance_id="inst-1")
        assert isinstance(handle, pgd.InstanceHandle)
        assert await handle.result(timeout=30) == {"a": [1, 2, "x"]}
        state = await client.status("inst-1")
        assert state.status is pgd.Status.COMPLETED and state.status == "completed"
        assert state.name == "single"
        assert state.input == {"a": [1, 2, "x"]} and state.output == {"a": [1, 2, "x"]}
        assert state.custom_status == {"stage": "done"}
        assert state.error is None and state.created_at <= state.updated_at
        events = await client.history("inst-1")
        assert [e.kind for e in events] == [
            "orchestration_started",
            "custom_status_set",
            "activity_scheduled",
            "activity_completed",
            "custom_status_set",
            "orchestration_completed",
        ]
        assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
        assert events[2].data["name"] == "echo" and events[3].data["result"] == {"a": [1, 2, "x"]}
        assert all(e.recorded_at is not None for e in events)


async def test_generated_ids_list_and_filters(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        h1 = await client.start(single, 1)
        h2 = await client.start("single", 2)
        h3 = await client.start(waits)
        assert len({h1.instance_id, h2.instance_id, h3.instance_id}) == 3
        assert await h1.result(timeout=30) == 1 and await h2.result(timeout=30) == 2
        done = await client.list(status="completed")
        assert {s.instance_id for s in done} == {h1.instance_id, h2.instance_id}
        assert [s.instance_id for s in await client.list(name=waits)] == [h3.instance_id]
        assert len(await client.list(limit=2)) == 2
        assert (await client.status(h3.instance_id)).status in (pgd.Status.PENDING, pgd.Status.RUNNING)


async def test_failure_surfaces_as_instance_failed(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(boom, None, instance_id="boom-1")
        with pytest.raises(pgd.InstanceFailed) as info:
            await handle.result(timeout=30)
        assert info.value.error["type"] == "ValueError"
        assert "bad input 42" in info.value.error["message"]
        assert "Traceback" in info.value.error["traceback"]
        assert isinstance(info.value, pgd.PgDurableError)
        assert (await runtime.client.status("boom-1")).status is pgd.Status.FAILED


async def test_duplicate_id_unknown_name_and_bad_input_write_nothing(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await client.start(waits, None, instance_id="dup")
        with anyio.fail_after(20):  # its start message consumed: the counts are settled
            while (await client.status("dup")).status is not pgd.Status.RUNNING:
                await anyio.sleep(0.02)
        before = await _counts(dsn)
        with pytest.raises(pgd.InstanceAlreadyExists):
            await client.start(single, 1, instance_id="dup")
        with pytest.raises(pgd.UnknownNameError):
            await client.start("no_such_orchestration", 1)
        with pytest.raises(pgd.SerializationError):
            await client.start(single, {"when": object()})
        with pytest.raises(pgd.SerializationError):
            await client.start(single, "x" * (5 * 1024 * 1024))
        with pytest.raises(pgd.InvalidArgument):
            await client.start(single, 1, instance_id="bad\x00id")
        assert await _counts(dsn) == before
        assert (await client.status("dup")).name == "waits"


async def test_a_client_looks_a_name_up_until_it_finds_it(dsn: str) -> None:
    """Client(dsn) checks the registry before a start; a name found once is not looked up
    again (the registry only grows, and a start flood paid one more round trip per start),
    a name not found is looked up again next time."""
    async with pgd.Runtime(app, dsn):
        pass  # registers the names
    conn = await asyncpg.connect(dsn)
    try:
        async with pgd.Client(dsn) as client:
            await client.start("single", 1)
            with pytest.raises(pgd.UnknownNameError):
                await client.start("late", 1)
            await conn.execute("DELETE FROM pgdurable.registry WHERE name = 'single'")
            await conn.execute("INSERT INTO pgdurable.registry (kind, name) VALUES ('orchestration', 'late')")
            await client.start("single", 2)  # remembered
            await client.start("late", 2)  # found now
        async with pgd.Client(dsn) as fresh:
            with pytest.raises(pgd.UnknownNameError):
                await fresh.start("single", 3)
    finally:
        await conn.close()


async def test_unknown_instance_everywhere(dsn: str) -> None:
    async with pgd.Client(dsn) as client:
        for call in (
            client.status("nope"),
            client.wait("nope", timeout=1),
            client.raise_event("nope", "go"),
            client.cancel("nope"),
            client.terminate("nope"),
            client.purge("nope"),
            client.history("nope"),
        ):
            with pytest.raises(pgd.InstanceNotFound):
                await call


async def test_standalone_client_knows_registered_names(dsn: str) -> None:
    async with pgd.Runtime(app, dsn):
        pass  # registers the app's names
    async with pgd.Client(dsn) as client:
        handle = await client.start(single, 5, instance_id="later")
        with pytest.raises(pgd.UnknownNameError):
            await client.start("never_registered")
    async with pgd.Runtime(app, dsn) as runtime:
        assert await runtime.client.wait(handle.instance_id, timeout=30) == 5


async def test_wait_times_out_with_typed_error(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(waits, None)
        with pytest.raises(pgd.TimeoutError):
            await handle.result(timeout=0.3)


async def test_client_requires_migrated_schema(empty_dsn: str) -> None:
    async with pgd.Client(empty_dsn) as client:
        with pytest.raises(pgd.ConfigurationError, match="migrate"):
            await client.status("x")


async def test_unreachable_database_is_a_database_error() -> None:
    client = pgd.Client("postgresql://postgres@127.0.0.1:1/nothing")
    client.db.retry_for = 0.5
    with pytest.raises(pgd.DatabaseError, match="cannot reach PostgreSQL"):
        await client.status("x")
    await client.close()


async def test_an_idempotency_key_delivers_an_event_once(dsn: str) -> None:
    """Resending with one key is a no-op; calls without a key are separate deliveries."""
    async with pgd.Client(dsn, app=app) as client:
        await client.start(tally, None, instance_id="tally")
        for _ in range(3):
            await client.raise_event("tally", "tick", "k1", idempotency_key="k1")
        await client.raise_event("tally", "tick", "k2", idempotency_key="k2")
        await client.raise_event("tally", "tick", "plain")
        await client.raise_event("tally", "tick", "plain")
        with pytest.raises(pgd.InvalidArgument, match="idempotency key"):
            await client.raise_event("tally", "tick", idempotency_key="")
        assert await _counts(dsn) == (1, 5)  # the start and four ticks
        await client.raise_event("tally", "stop")
    async with pgd.Runtime(app, dsn) as runtime:
        assert await runtime.client.wait("tally", timeout=30) == ["k1", "k2", "plain", "plain"]
        await runtime.client.raise_event("tally", "tick", "late", idempotency_key="k1")  # finished: ignored
        await runtime.client.purge("tally")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.event_deliveries") == 0
    finally:
        await conn.close()
