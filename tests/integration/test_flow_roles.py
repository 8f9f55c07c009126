"""Least privilege for flow control: a worker role claims queued work and fires schedules; a client
role manages schedules only through the SQL API (it writes no table, reads no queue)."""

from __future__ import annotations

import asyncpg
import pytest

import pgdurable_async as pgd
from tests.integration.test_roles import roles  # noqa: F401 - the fixture

app = pgd.App()
metered = pgd.Queue("metered", concurrency=1, rate_limit=pgd.RateLimit(10, per=1), key_concurrency=1)


@app.activity(queue=metered)
async def measure(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.orchestration
async def measured(ctx: pgd.OrchestrationContext, n: int) -> int:
    return int(await ctx.call_activity(measure, n, key="tenant-a", priority=3))


@pytest.mark.timeout(60)
async def test_roles_run_queues_and_schedules(roles: tuple[str, str]) -> None:  # noqa: F811
    worker_dsn, client_dsn = roles
    async with pgd.Runtime(app, worker_dsn):
        async with pgd.Client(client_dsn) as client:
            await client.create_schedule("metered-every-second", "measured", 41, every=1)
            assert [s.schedule_id for s in await client.list_schedules()] == ["metered-every-second"]
            handle = await client.trigger_schedule("metered-every-second")
            assert await handle.result(timeout=30) == 42
            await client.pause_schedule("metered-every-second")
            await client.resume_schedule("metered-every-second")
            with pytest.raises(pgd.DatabaseError):
                await client.list_queues()  # a client reads no queue
            await client.delete_schedule("metered-every-second")
    conn = await asyncpg.connect(client_dsn)
    try:
        for statement in (
            "INSERT INTO pgdurable.schedules (schedule_id, orchestration, every, next_fire_at)"
            " VALUES ('x', 'measured', '1 second', now())",
            "UPDATE pgdurable.queues SET concurrency = 100",
            "SELECT * FROM pgdurable.queue_starts",
            "SELECT pgdurable.create_schedule('x', 'pgdurable.graph', 'null', NULL, '1 second', 'UTC', 'skip',"
            " 'latest', now())",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
