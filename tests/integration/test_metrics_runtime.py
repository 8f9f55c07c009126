"""``Runtime(metrics=True)``: an embedding service's runtimes join ``prometheus_client.REGISTRY``.

Registration is once per process (two runtimes raise no duplicate error); a scrape reads
the database from any thread, the runtime's own event loop included (a service's
``/metrics`` route), where waiting for a query on that loop would deadlock.
"""

from __future__ import annotations

import anyio
import asyncpg
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgdurable_async as pgd

app = pgd.App()


@app.activity
async def echo(ctx: pgd.ActivityContext, x: int) -> int:
    return x


@app.orchestration
async def pair(ctx: pgd.OrchestrationContext, x: int) -> list[int]:
    return list(await ctx.all([ctx.call_activity(echo, x), ctx.call_activity(echo, x + 1)]))


async def conn_execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


async def test_two_runtimes_share_the_registry_and_a_scrape_reads_the_database(dsn: str) -> None:
    before = samples(generate_latest(REGISTRY)).get(
        ("pgdurable_activity_attempts_total", (("activity", "echo"), ("outcome", "completed"))), 0.0)
    async with pgd.Runtime(app, dsn, metrics=True) as one, pgd.Runtime(app, dsn, metrics=True):
        assert await (await one.client.start(pair, 1)).result(timeout=30) == [1, 2]
        await conn_execute(dsn, "SELECT pgdurable.start('ghost', 'null', 'ghost-1')")  # nobody serves it
        with anyio.fail_after(30):
            while True:
                scraped = samples(await anyio.to_thread.run_sync(generate_latest, REGISTRY))  # as an HTTP thread
                if scraped.get(("pgdurable_instances", (("status", "pending"),))) == 1:
                    break
                await anyio.sleep(0.2)
        assert scraped[("pgdurable_instances", (("status", "completed"),))] == 1
        assert scraped[("pgdurable_queue_depth", (("queue", "orchestrator"),))] == 1
        assert scraped[("pgdurable_activity_attempts_total", (("activity", "echo"), ("outcome", "completed")))] \
            == before + 2
        # From the runtime's own event loop (a service's /metrics route): the query runs elsewhere, no deadlock.
        await conn_execute(dsn, "SELECT pgdurable.start('ghost', 'null', 'ghost-2')")
        await anyio.sleep(1.1)  # past the snapshot's second
        from_loop = samples(generate_latest(REGISTRY))
        assert from_loop[("pgdurable_queue_depth", (("queue", "orchestrator"),))] == 2
        assert from_loop[("pgdurable_instances", (("status", "pending"),))] == 2


async def test_a_runtime_without_metrics_counts_nothing(dsn: str) -> None:
    key = ("pgdurable_activity_attempts_total", (("activity", "echo"), ("outcome", "completed")))
    async with pgd.Runtime(app, dsn, metrics=True) as counting:  # the metrics are registered (and counting)
        assert await (await counting.client.start(pair, 3)).result(timeout=30) == [3, 4]
    before = samples(generate_latest(REGISTRY))[key]
    async with pgd.Runtime(app, dsn) as runtime:
        assert await (await runtime.client.start(pair, 5)).result(timeout=30) == [5, 6]
    assert samples(generate_latest(REGISTRY)).get(key, 0.0) == before
