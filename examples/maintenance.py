"""Maintenance in a nightly window, with a human in the loop, on a schedule.

A cron schedule starts the ``maintenance`` graph at 03:00 Paris time, every night
(``client.create_schedule("maintenance-window", "maintenance", cron="0 3 * * *",
timezone="Europe/Paris")``; a schedule is a row, fired by whichever worker runs the
graph, once per night however many workers run).  The graph finds bloated tables
(dead tuples over a threshold), and only if there are any: waits for an
``approval`` event for up to a minute, then runs the follow-up SQL (``ANALYZE`` of
each bloated table, through a small PL/pgSQL helper), or logs that the approval
timed out.  An operator approves with ``client.raise_event(id, "approval",
{"by": "alice"})`` (or ``SELECT df.signal(id, 'approval', '{"by": "alice"}')``).

Run it: ``python -m pgdurable_async demo maintenance``: the demo does not wait for
03:00; it fires the schedule at once (``trigger_schedule``, the same instance id
format ``maintenance-window@<time>``) and approves after a second, as an operator would.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import anyio
import asyncpg

import pgdurable_async as pgd
from pgdurable_async import dsl
from pgdurable_async._client.graphs import render_instance

SCHEDULE = "maintenance-window"

SETUP = """
CREATE SCHEMA IF NOT EXISTS pgdurable_demo;  -- the demos' own schema: they never touch yours
DROP TABLE IF EXISTS pgdurable_demo.maintenance_log; DROP TABLE IF EXISTS pgdurable_demo.events_archive;
CREATE TABLE pgdurable_demo.maintenance_log (at timestamptz NOT NULL DEFAULT now(), action text NOT NULL,
                                             tables text[], approved_by text);
CREATE TABLE pgdurable_demo.events_archive (id int, body text) WITH (autovacuum_enabled = false);
INSERT INTO pgdurable_demo.events_archive SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;
DELETE FROM pgdurable_demo.events_archive WHERE id % 3 <> 0;
CREATE OR REPLACE FUNCTION pgdurable_demo.analyze_tables(tables text[]) RETURNS int LANGUAGE plpgsql AS $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY coalesce(tables, '{}') LOOP
        EXECUTE format('ANALYZE pgdurable_demo.%I', t);
    END LOOP;
    RETURN coalesce(cardinality(tables), 0);
END $$;
"""


def maintenance(approval_timeout: float) -> dsl.Node:
    """The graph: find bloat, wait for approval (or time out), follow up."""
    return (
        dsl.sql("SELECT relname, n_dead_tup FROM pg_stat_user_tables"
                " WHERE schemaname = 'pgdurable_demo' AND n_dead_tup > 1000 ORDER BY n_dead_tup DESC").bind("bloated")
        >> dsl.if_rows(
            "bloated",
            dsl.wait_for_signal("approval", approval_timeout)
            >> dsl.if_(
                "SELECT $approval.timed_out",
                "INSERT INTO pgdurable_demo.maintenance_log (action) VALUES ('approval timed out')",
                """INSERT INTO pgdurable_demo.maintenance_log (action, tables, approved_by)
                   SELECT 'analyzed ' || pgdurable_demo.analyze_tables(array_agg(relname::text)) || ' table(s)',
                          array_agg(relname::text), $approval.by?
                   FROM $bloated.*""",
            ),
            "INSERT INTO pgdurable_demo.maintenance_log (action) VALUES ('nothing to do')",
        )
    )


def make_app(approval_timeout: float = 60) -> pgd.App:
    app = pgd.App()
    app.graph("maintenance", maintenance(approval_timeout))
    return app


app = make_app()


async def _wait_for_stats(conn: asyncpg.Connection) -> None:
    """Statistics reach pg_stat_user_tables asynchronously; wait until the dead tuples show."""
    for _ in range(100):
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        if await conn.fetchval("SELECT n_dead_tup FROM pg_stat_user_tables"
                                " WHERE schemaname = 'pgdurable_demo' AND relname = 'events_archive'") or 0:
            return
        await anyio.sleep(0.1)


async def run(dsn: str, *, out: TextIO = sys.stdout, approve: bool = True, timeout: float = 60) -> dict[str, Any]:
    graph_app = app if timeout == 60 else make_app(timeout)
    async with pgd.Runtime(graph_app, dsn) as runtime:
        client = runtime.client
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            await _wait_for_stats(conn)
            if SCHEDULE in {s.schedule_id for s in await client.list_schedules()}:
                await client.delete_schedule(SCHEDULE)  # a re-run of the demo on the same database
            schedule = await client.create_schedule(SCHEDULE, "maintenance", cron="0 3 * * *",
                                                    timezone="Europe/Paris")
            print(f"schedule {SCHEDULE}: cron '0 3 * * *' in Europe/Paris, next fire at "
                  f"{schedule.next_fire_at.isoformat()}; firing it now for the demo", file=out)
            handle = await client.trigger_schedule(SCHEDULE)
            print(f"started {handle.instance_id}: waiting up to {timeout:g} s for approval of the follow-up SQL",
                  file=out)
            if approve:
                await anyio.sleep(1)
                await client.raise_event(handle.instance_id, "approval", {"by": "alice"})
                print(f"operator: client.raise_event({handle.instance_id!r}, 'approval', {{'by': 'alice'}})",
                      file=out)
            await handle.result(timeout=timeout + 30)
            status = (await handle.status()).status.value
            log = [dict(r) for r in await conn.fetch(
                "SELECT action, tables, approved_by FROM pgdurable_demo.maintenance_log")]
        finally:
            await conn.close()
        print(f"status: {status}; maintenance log: {log}", file=out)
        print(await render_instance(client, handle.instance_id, graph_app), file=out)
    return {"status": status, "log": log, "instance_id": handle.instance_id}
