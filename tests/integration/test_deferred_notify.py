"""Deferred NOTIFYs (schema 0018): the runtime's commits carry none, its Notifier sends them after.

Two runtimes in one process, each with a sweep far beyond the test's timeout, so only a NOTIFY
can wake the other: the orchestrations run in one, the activities in the other, and the client
starting the instances is a third runtime's (which registers neither).  Every hop — start, work
enqueued by a turn, result acked — is a deferred transaction of one runtime waking another.
"""

from __future__ import annotations

import anyio
import asyncpg

import pgdurable_async as pgd

SWEEP = 600.0  # seconds: longer than any wait below, so a lost NOTIFY fails the test

turns_app = pgd.App()
work_app = pgd.App()
starter_app = pgd.App()


@work_app.activity(name="double")
async def double(ctx: pgd.ActivityContext, n: int) -> int:
    return 2 * n


@turns_app.orchestration(name="two_hops")
async def two_hops(ctx: pgd.OrchestrationContext, n: int) -> int:
    once: int = await ctx.call_activity("double", n)
    twice: int = await ctx.call_activity("double", once)
    return twice


async def test_each_hop_between_runtimes_is_woken_by_the_notifier(dsn: str) -> None:
    async with pgd.Runtime(turns_app, dsn, sweep_interval=SWEEP) as turns, \
            pgd.Runtime(work_app, dsn, sweep_interval=SWEEP) as workers, \
            pgd.Runtime(starter_app, dsn, sweep_interval=SWEEP) as starter:
        handles = [await starter.client.start("two_hops", n) for n in range(5)]
        with anyio.fail_after(60):
            assert [await h.result(timeout=60) for h in handles] == [4 * n for n in range(5)]
        assert starter.notifier.sent >= 1 and turns.notifier.sent >= 1 and workers.notifier.sent >= 1


async def test_sql_writers_still_notify_from_the_trigger(dsn: str) -> None:
    """A start from SQL (no deferral) wakes a runtime through notify_insert, as before."""
    async with pgd.Runtime(turns_app, dsn, sweep_interval=SWEEP), pgd.Runtime(work_app, dsn, sweep_interval=SWEEP):
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SELECT pgdurable.start('two_hops', '3'::jsonb, 'from-sql')")
            with anyio.fail_after(60):
                while await conn.fetchval("SELECT status FROM pgdurable.instances WHERE instance_id = 'from-sql'") \
                        != "completed":
                    await anyio.sleep(0.05)
            assert await conn.fetchval("SELECT output FROM pgdurable.instances WHERE instance_id = 'from-sql'") == "12"
        finally:
            await conn.close()


async def test_a_deferred_transaction_sends_no_notify_itself(dsn: str) -> None:
    conn, listener = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    heard: list[str] = []
    try:
        await listener.add_listener("pgdurable_orch", lambda *args: heard.append(args[2]))
        await conn.execute("INSERT INTO pgdurable.registry (kind, name) VALUES ('orchestration', 'quiet')")
        await conn.execute("SET search_path = pgdurable")
        async with conn.transaction():
            await conn.execute("SELECT set_config('pgdurable.notify', 'deferred', true)")
            await conn.execute("SELECT start('quiet', 'null'::jsonb, 'q1')")
        await conn.execute("SELECT start('quiet', 'null'::jsonb, 'q2')")  # not deferred: notifies
        with anyio.fail_after(10):
            while not heard:
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)
        assert heard == ["pgdurable_orch"]  # one NOTIFY: q2's; q1's transaction sent none
    finally:
        await listener.close()
        await conn.close()
