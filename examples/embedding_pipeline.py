"""Embedding pipeline, written with the Python mirror of the DSL (``pgdurable_async.dsl``).

chunk (SQL) → embed each chunk (a Python activity standing in for a remote
embedding API, called with an idempotency key, failures retried) → store the
vectors (SQL) → mark the documents embedded (SQL).

The API has limits, and every call goes through one queue that holds them across
all workers and hosts (enforced in the database when a worker claims a call):

    embed_q = pgd.Queue("embedding-api", concurrency=4,
                        rate_limit=pgd.RateLimit(20, per=timedelta(seconds=1)), key_concurrency=2)

at most 4 calls in flight, 20 starts in any second, and 2 in flight per tenant (the
``key`` of each call is the chunk's tenant), so one tenant's backlog never starves
another's.  The stand-in API records what it saw, and the demo prints it.

It fails the first call for every fifth chunk (a transient error: the activity's
retry policy runs it again) and answers a repeated idempotency key from its cache,
as a real API with idempotency keys does, so a retried or replayed call is never
billed twice.

Run it: ``python -m pgdurable_async demo embedding_pipeline``.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import anyio
import asyncpg

import pgdurable_async as pgd
from pgdurable_async import dsl
from pgdurable_async._client.graphs import render_instance

app = pgd.App()
DIMENSIONS = 8


embed_q = pgd.Queue("embedding-api", concurrency=4, rate_limit=pgd.RateLimit(20, per=timedelta(seconds=1)),
                    key_concurrency=2)


class FakeEmbeddingAPI:
    """A deterministic local embedding 'service' with idempotency keys and transient failures.

    It records the calls in flight (overall and per tenant) and their start times.
    """

    def __init__(self) -> None:
        self.cache: dict[str, list[float]] = {}
        self.calls = 0
        self.failed: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.peak = self.peak_per_tenant = 0
        self.starts: list[float] = []

    def begin(self, tenant: str) -> None:
        self.starts.append(time.monotonic())
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        self.peak = max(self.peak, sum(self.in_flight.values()))
        self.peak_per_tenant = max(self.peak_per_tenant, self.in_flight[tenant])

    def end(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1

    def embed(self, text: str, idempotency_key: str, index: int) -> list[float]:
        self.calls += 1
        if idempotency_key in self.cache:
            return self.cache[idempotency_key]
        if index % 5 == 0 and idempotency_key not in self.failed:
            self.failed.add(idempotency_key)
            raise ConnectionError(f"embedding API unavailable (key {idempotency_key})")
        digest = hashlib.sha256(text.encode()).digest()
        raw = [b / 255 - 0.5 for b in digest[:DIMENSIONS]]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        self.cache[idempotency_key] = vector = [round(x / norm, 6) for x in raw]
        return vector

    def busiest_second(self) -> int:
        """The most calls started in any one-second window."""
        return max((sum(1 for t in self.starts if s <= t < s + 1.0) for s in self.starts), default=0)


api = FakeEmbeddingAPI()


@app.activity(name="embedding.embed", queue=embed_q, retry=pgd.RetryPolicy(max_attempts=4, initial_interval=0.1))
async def embed(ctx: pgd.ActivityContext, chunk: dict[str, Any]) -> dict[str, Any]:
    """Embed one chunk; the idempotency key is derived from the chunk, so retries reuse it."""
    key = hashlib.sha256(f"{chunk['doc_id']}:{chunk['idx']}:{chunk['text']}".encode()).hexdigest()[:16]
    api.begin(chunk["tenant"])
    try:
        await anyio.sleep(0.02)  # the network round trip
        vector = api.embed(chunk["text"], key, int(chunk["doc_id"]) + int(chunk["idx"]))
    finally:
        api.end(chunk["tenant"])
    return {"doc_id": chunk["doc_id"], "idx": chunk["idx"], "key": key, "vector": vector}


pipeline = (
    dsl.sql("SELECT id FROM pgdurable_demo.docs WHERE status = 'new' ORDER BY id LIMIT $input.batch").bind("docs")
    >> dsl.sql(
        """INSERT INTO pgdurable_demo.chunks (doc_id, idx, text)
           SELECT d.id, c.idx, c.text
           FROM $docs.* d
           JOIN pgdurable_demo.docs USING (id),
           LATERAL regexp_split_to_table(docs.body, '\\.\\s*') WITH ORDINALITY AS c(text, idx)
           WHERE c.text <> ''
           ON CONFLICT (doc_id, idx) DO NOTHING"""
    )
    >> dsl.sql(
        "SELECT c.doc_id, c.idx, c.text, d.tenant"
        " FROM pgdurable_demo.chunks c JOIN pgdurable_demo.docs d ON d.id = c.doc_id"
        " WHERE c.doc_id IN (SELECT id FROM $docs.*) AND c.embedding IS NULL ORDER BY c.doc_id, c.idx"
    ).bind("pending")
    # Every chunk at once: the queue, not the graph, holds the API's limits (per tenant: key=).
    >> dsl.fan_out(over="pending", step=dsl.activity(embed, key="$item.tenant")).bind("vectors")
    >> dsl.sql(
        """UPDATE pgdurable_demo.chunks c
           SET embedding = ARRAY(SELECT jsonb_array_elements_text(v.vector)::float8),
               idempotency_key = v.key
           FROM $vectors.* v
           WHERE c.doc_id = v.doc_id AND c.idx = v.idx"""
    )
    >> dsl.sql(
        """UPDATE pgdurable_demo.docs SET status = 'embedded'
           WHERE id IN (SELECT id FROM $docs.*)
             AND NOT EXISTS (SELECT 1 FROM pgdurable_demo.chunks WHERE chunks.doc_id = docs.id AND embedding IS NULL)
           RETURNING id"""
    )
)
app.graph("embedding_pipeline", pipeline)

SETUP = """
CREATE SCHEMA IF NOT EXISTS pgdurable_demo;  -- the demos' own schema: they never touch yours
DROP TABLE IF EXISTS pgdurable_demo.chunks; DROP TABLE IF EXISTS pgdurable_demo.docs;
CREATE TABLE pgdurable_demo.docs (id int PRIMARY KEY, tenant text NOT NULL, body text NOT NULL,
                   status text NOT NULL DEFAULT 'new');
CREATE TABLE pgdurable_demo.chunks (
    doc_id int REFERENCES pgdurable_demo.docs, idx int, text text NOT NULL,
    embedding float8[], idempotency_key text UNIQUE,
    PRIMARY KEY (doc_id, idx)
);
INSERT INTO pgdurable_demo.docs (id, tenant, body)
SELECT g, (ARRAY['acme', 'globex', 'initech'])[1 + g % 3],
       'Document ' || g || ' opens here. It says something useful. It ends with a summary.'
FROM generate_series(1, 6) g;
"""


async def run(dsn: str, *, out: TextIO = sys.stdout) -> dict[str, Any]:
    async with pgd.Runtime(app, dsn) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            handle = await runtime.client.start("embedding_pipeline", {"batch": 10})
            print(f"started {handle.instance_id}: chunk → embed (queue {embed_q.name!r}: 4 in flight, 20/s, "
                  "2 per tenant) → store → mark", file=out)
            marked = await handle.result(timeout=60)
            stats = await conn.fetchrow(
                "SELECT count(*) AS chunks, count(embedding) AS embedded,"
                " count(DISTINCT idempotency_key) AS keys FROM pgdurable_demo.chunks"
            )
            docs = await conn.fetchval("SELECT count(*) FROM pgdurable_demo.docs WHERE status = 'embedded'")
        finally:
            await conn.close()
        retried = sum(1 for e in await handle.history() if e.kind == "activity_completed"
                      and e.data.get("result", {}).get("key") in api.failed)
        print(f"documents embedded: {docs}; chunks: {stats['chunks']} with {stats['embedded']} vectors; "
              f"transient failures retried: {len(api.failed)} ({retried} recovered); API calls: {api.calls}",
              file=out)
        print(f"the API saw at most {api.peak} calls in flight, {api.peak_per_tenant} per tenant, "
              f"{api.busiest_second()} started in any second", file=out)
        print(await render_instance(runtime.client, handle.instance_id, app), file=out)
    return {"marked": marked["row_count"], "docs": docs, "chunks": stats["chunks"], "embedded": stats["embedded"],
            "keys": stats["keys"], "failures": len(api.failed), "peak": api.peak,
            "peak_per_tenant": api.peak_per_tenant, "busiest_second": api.busiest_second()}
