"""Retention: finished instances not updated for the window are purged in small batches, children
with their parent, while new work runs; ``purge --older-than`` does the same from the command line."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.integration.test_cli import assert_one_error_line, cli, ok

pytestmark = pytest.mark.timeout(180)
app = pgd.App()
OLD_FAMILIES = 300  # each a parent and two children: 900 instances to purge
NEW_FAMILIES = 150


@app.activity
async def work(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.orchestration
async def kid(ctx: pgd.OrchestrationContext, n: int) -> int:
    return int(await ctx.call_activity(work, n))


@app.orchestration
async def family(ctx: pgd.OrchestrationContext, n: int) -> int:
    kids = await ctx.all([ctx.call_orchestration(kid, n), ctx.call_orchestration(kid, n + 1)])
    ctx.set_value("kids", kids)
    return sum(kids)


@app.orchestration
async def waiter(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    return await ctx.wait_for_event("go")


async def _run_families(client: pgd.Client, prefix: str, count: int) -> None:
    handles = [await client.start(family, i, instance_id=f"{prefix}-{i}") for i in range(count)]
    with anyio.fail_after(120):
        for handle in handles:
            await handle.result()


async def _age(conn: asyncpg.Connection, pattern: str, days: int = 40) -> None:
    await conn.execute("UPDATE pgdurable.instances SET created_at = now() - make_interval(days => $2), "
                       "updated_at = now() - make_interval(days => $2) WHERE instance_id LIKE $1", pattern, days)


async def _count(conn: asyncpg.Connection, table: str, pattern: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM pgdurable.{table} WHERE instance_id LIKE $1", pattern))


async def test_retention_purges_old_trees_under_load(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await _run_families(runtime.client, "old", OLD_FAMILIES)
        await runtime.client.start(waiter, None, instance_id="old-running")
        await runtime.client.start(waiter, None, instance_id="keep-parent")
        await (await runtime.client.start(kid, 1, instance_id="keep-kid")).result(timeout=30)
    conn = await asyncpg.connect(dsn)
    try:
        await _age(conn, "old-%")  # parents, their children and the running one
        await conn.execute("UPDATE pgdurable.instances SET updated_at = now() WHERE instance_id = 'old-0:1:1'")
        assert await _count(conn, "instances", "old-%") == 3 * OLD_FAMILIES + 1
        old_history = await _count(conn, "history", "old-%")

        async with pgd.Runtime(app, dsn, retention=timedelta(days=30), sweep_interval=0.5) as runtime:
            assert runtime.retention is not None
            started = time.perf_counter()
            await _run_families(runtime.client, "new", NEW_FAMILIES)  # the load, while the purge runs
            load_seconds = time.perf_counter() - started
            with anyio.fail_after(30):
                while await _count(conn, "instances", "old-%") > 1:
                    await anyio.sleep(0.1)
            batch_seconds = runtime.retention.max_batch_seconds
            purged = runtime.retention.purged
        print(f"\nretention: purged {purged} instances ({old_history} history rows) in batches of "
              f"{runtime.retention.batch} roots; longest batch {batch_seconds * 1000:.1f} ms; "
              f"{NEW_FAMILIES * 3} new instances meanwhile in {load_seconds:.2f} s")
        assert purged == 3 * OLD_FAMILIES  # a child updated lately went with its old parent
        assert batch_seconds < 2.0  # small transactions: no long locks
        assert await _count(conn, "history", "old-%") == await _count(conn, "history", "old-running")
        assert await _count(conn, "instance_values", "old-%") == 0
        assert [r["instance_id"] for r in await conn.fetch(
            "SELECT instance_id FROM pgdurable.instances WHERE instance_id LIKE 'old-%'")] == ["old-running"]
        new = await conn.fetch("SELECT status, count(*) AS n FROM pgdurable.instances "
                               "WHERE instance_id LIKE 'new-%' GROUP BY status")
        assert [(r["status"], r["n"]) for r in new] == [("completed", 3 * NEW_FAMILIES)]
        assert await _count(conn, "instances", "keep-%") == 2
    finally:
        await conn.close()


async def test_purge_older_than_from_the_command_line(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await _run_families(runtime.client, "done", 3)
        await runtime.client.start(waiter, None, instance_id="live")
        await runtime.client.terminate("live")
    conn = await asyncpg.connect(dsn)
    try:
        await _age(conn, "%", days=10)
        out = await ok("purge", "--older-than", "30d", dsn=dsn)
        assert "purged 0 finished instance(s)" in out
        out = await ok("purge", "--older-than", "9d", "--status", "terminated", dsn=dsn)
        assert "purged 1 terminated instance(s)" in out
        assert await _count(conn, "instances", "live") == 0
        out = await ok("purge", "--older-than", "1w2d", dsn=dsn)
        assert "purged 9 finished instance(s)" in out
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.history") == 0
        assert "an instance id or --older-than" in assert_one_error_line(await cli("purge", dsn=dsn))
        assert "--older-than" in assert_one_error_line(await cli("purge", "--older-than", "soon", dsn=dsn), code=2)
    finally:
        await conn.close()
