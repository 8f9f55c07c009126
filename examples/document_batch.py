"""Document batch: pg_durable's README example, started from SQL with ``df.start``.

    'SELECT id FROM documents WHERE processed = false LIMIT 100' |=> 'batch'
    ~> 'UPDATE documents SET processed = true WHERE id IN (SELECT id FROM $batch.*)'

wrapped in a ``df.loop`` that repeats while unprocessed documents remain.  Each
SQL step is a transactional activity (exactly once); ``$batch.*`` reaches the
UPDATE as a bind parameter, never as spliced text.

Run it: ``python -m pgdurable_async demo document_batch`` (a throwaway cluster
unless ``--dsn`` is given).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import asyncpg

import pgdurable_async as pgd
from pgdurable_async._client.graphs import render_instance

app = pgd.App()  # nothing of its own: the graph interpreter comes with every Runtime

SETUP = """
CREATE SCHEMA IF NOT EXISTS pgdurable_demo;  -- the demos' own schema: they never touch yours
DROP TABLE IF EXISTS pgdurable_demo.documents;
CREATE TABLE pgdurable_demo.documents (id serial PRIMARY KEY, body text NOT NULL,
                                       processed boolean NOT NULL DEFAULT false);
INSERT INTO pgdurable_demo.documents (body) SELECT 'document #' || g FROM generate_series(1, {count}) g;
"""

START = """
SELECT df.start(
    df.loop(
        'SELECT id FROM pgdurable_demo.documents WHERE processed = false LIMIT 100' |=> 'batch'
        ~> 'UPDATE pgdurable_demo.documents SET processed = true WHERE id IN (SELECT id FROM $batch.*)',
        'SELECT count(*) > 0 FROM pgdurable_demo.documents WHERE processed = false'
    ),
    'document-batch'
)
"""


async def run(dsn: str, *, out: TextIO = sys.stdout, count: int = 250) -> dict[str, Any]:
    """Create the documents, start the graph from SQL, wait, and report."""
    async with pgd.Runtime(app, dsn) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP.format(count=int(count)))
            instance_id = await conn.fetchval(START)
            print(f"started {instance_id} with df.start(...): {count} documents, 100 per batch", file=out)
            status = await conn.fetchval("SELECT df.await_instance($1, 60)", instance_id)
            processed = await conn.fetchval("SELECT count(*) FROM pgdurable_demo.documents WHERE processed")
            batches = await conn.fetchval(
                "SELECT count(*) FROM pgdurable.history WHERE instance_id = $1 AND event_type = 'activity_scheduled'"
                " AND payload->'input'->>'query' LIKE 'UPDATE %'",
                instance_id,
            )
        finally:
            await conn.close()
        print(f"status: {status}; processed {processed}/{count} documents in {batches} UPDATE batches", file=out)
        print(await render_instance(runtime.client, instance_id), file=out)
    return {"instance_id": instance_id, "status": status, "processed": processed, "batches": batches}
