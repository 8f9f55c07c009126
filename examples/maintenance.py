"""Maintenance with a human in the loop, started from SQL with ``df.start``.

Find bloated tables (dead tuples over a threshold), and only if there are any:
wait for an ``approval`` signal for up to a minute, then run the follow-up SQL
(``ANALYZE`` of each bloated table, through a small PL/pgSQL helper) — or log
that the approval timed out.  An operator approves with
``SELECT df.signal('<id>', 'approval', '{"by": "alice"}')``.

Run it: ``python -m pgdurable_async demo maintenance`` (the demo approves after
a second, as an operator would).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import anyio
import asyncpg

import pgdurable_async as pgd
from pgdurable_async._client.graphs import render_instance

app = pgd.App()

SETUP = """
DROP TABLE IF EXISTS maintenance_log; DROP TABLE IF EXISTS events_archive;
CREATE TABLE maintenance_log (at timestamptz NOT NULL DEFAULT now(), action text NOT NULL, tables text[],
                              approved_by text);
CREATE TABLE events_archive (id int, body text) WITH (autovacuum_enabled = false);
INSERT INTO events_archive SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;
DELETE FROM events_archive WHERE id % 3 <> 0;
CREATE OR REPLACE FUNCTION analyze_tables(tables text[]) RETURNS int LANGUAGE plpgsql AS $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY coalesce(tables, '{}') LOOP
        EXECUTE format('ANALYZE %I', t);
    END LOOP;
    RETURN coalesce(cardinality(tables), 0);
END $$;
"""

START = """
SELECT df.start(
    $$SELECT relname, n_dead_tup FROM pg_stat_user_tables
      WHERE n_dead_tup > 1000 ORDER BY n_dead_tup DESC$$ |=> 'bloated'
    ~> df.if_rows(
        'bloated',
        df.wait_for_signal('approval', $1)
        ~> (
            '$approval.timed_out'
                ?> 'INSERT INTO maintenance_log (action) VALUES (''approval timed out'')'
                !> $$INSERT INTO maintenance_log (action, tables, approved_by)
                     SELECT 'analyzed ' || analyze_tables(array_agg(relname::text)) || ' table(s)',
                            array_agg(relname::text), $approval.by?
                     FROM $bloated.*$$
        ),
        'INSERT INTO maintenance_log (action) VALUES (''nothing to do'')'
    ),
    'maintenance'
)
"""


async def _wait_for_stats(conn: asyncpg.Connection) -> None:
    """Statistics reach pg_stat_user_tables asynchronously; wait until the dead tuples show."""
    for _ in range(100):
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        if await conn.fetchval("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'events_archive'") or 0:
            return
        await anyio.sleep(0.1)


async def run(dsn: str, *, out: TextIO = sys.stdout, approve: bool = True, timeout: float = 60) -> dict[str, Any]:
    async with pgd.Runtime(app, dsn) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            await _wait_for_stats(conn)
            instance_id = await conn.fetchval(START.replace("$1", str(float(timeout))))
            print(f"started {instance_id}: waiting up to {timeout:g} s for approval of the follow-up SQL", file=out)
            if approve:
                await anyio.sleep(1)
                await conn.execute("SELECT df.signal($1, 'approval', '{\"by\": \"alice\"}')", instance_id)
                print("operator: SELECT df.signal(id, 'approval', '{\"by\": \"alice\"}')", file=out)
            status = await conn.fetchval("SELECT df.await_instance($1, $2)", instance_id, timeout + 30)
            log = [dict(r) for r in await conn.fetch("SELECT action, tables, approved_by FROM maintenance_log")]
        finally:
            await conn.close()
        print(f"status: {status}; maintenance log: {log}", file=out)
        print(await render_instance(runtime.client, instance_id), file=out)
    return {"status": status, "log": log}
