"""Embedding pipeline, written with the Python mirror of the DSL (``pgdurable_async.dsl``).

chunk (SQL) → embed each chunk (a Python activity standing in for a remote
embedding API, called with an idempotency key, four at a time, failures
retried) → store the vectors (SQL) → mark the documents embedded (SQL).

The stand-in API fails the first call for every fifth chunk (a transient error:
the activity's retry policy runs it again) and answers a repeated idempotency
key from its cache, as a real API with idempotency keys does, so a retried or
replayed call is never billed twice.

Run it: ``python -m pgdurable_async demo embedding_pipeline``.
"""

from __future__ import annotations

import hashlib
import math
import sys
from typing import Any, TextIO

import asyncpg

import pgdurable_async as pgd
from pgdurable_async import dsl
from pgdurable_async._client.graphs import render_instance

app = pgd.App()
DIMENSIONS = 8


class FakeEmbeddingAPI:
    """A deterministic local embedding 'service' with idempotency keys and transient failures."""

    def __init__(self) -> None:
        self.cache: dict[str, list[float]] = {}
        self.calls = 0
        self.failed: set[str] = set()

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


api = FakeEmbeddingAPI()


@app.activity(name="embedding.embed", retry=pgd.RetryPolicy(max_attempts=4, initial_interval=0.1))
async def embed(ctx: pgd.ActivityContext, chunk: dict[str, Any]) -> dict[str, Any]:
    """Embed one chunk; the idempotency key is derived from the chunk, so retries reuse it."""
    key = hashlib.sha256(f"{chunk['doc_id']}:{chunk['idx']}:{chunk['text']}".encode()).hexdigest()[:16]
    vector = api.embed(chunk["text"], key, int(chunk["doc_id"]) + int(chunk["idx"]))
    return {"doc_id": chunk["doc_id"], "idx": chunk["idx"], "key": key, "vector": vector}


pipeline = (
    dsl.sql("SELECT id FROM docs WHERE status = 'new' ORDER BY id LIMIT $input.batch").bind("docs")
    >> dsl.sql(
        """INSERT INTO chunks (doc_id, idx, text)
           SELECT d.id, c.idx, c.text
           FROM $docs.* d
           JOIN docs USING (id),
           LATERAL regexp_split_to_table(docs.body, '\\.\\s*') WITH ORDINALITY AS c(text, idx)
           WHERE c.text <> ''
           ON CONFLICT (doc_id, idx) DO NOTHING"""
    )
    >> dsl.sql(
        "SELECT doc_id, idx, text FROM chunks WHERE doc_id IN (SELECT id FROM $docs.*) AND embedding IS NULL"
        " ORDER BY doc_id, idx"
    ).bind("pending")
    >> dsl.fan_out(over="pending", step=dsl.activity(embed), limit=4).bind("vectors")
    >> dsl.sql(
        """UPDATE chunks c
           SET embedding = ARRAY(SELECT jsonb_array_elements_text(v.vector)::float8),
               idempotency_key = v.key
           FROM $vectors.* v
           WHERE c.doc_id = v.doc_id AND c.idx = v.idx"""
    )
    >> dsl.sql(
        """UPDATE docs SET status = 'embedded'
           WHERE id IN (SELECT id FROM $docs.*)
             AND NOT EXISTS (SELECT 1 FROM chunks WHERE chunks.doc_id = docs.id AND embedding IS NULL)
           RETURNING id"""
    )
)
app.graph("embedding_pipeline", pipeline)

SETUP = """
DROP TABLE IF EXISTS chunks; DROP TABLE IF EXISTS docs;
CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL, status text NOT NULL DEFAULT 'new');
CREATE TABLE chunks (
    doc_id int REFERENCES docs, idx int, text text NOT NULL,
    embedding float8[], idempotency_key text UNIQUE,
    PRIMARY KEY (doc_id, idx)
);
INSERT INTO docs (id, body)
SELECT g, 'Document ' || g || ' opens here. It says something useful. It ends with a summary.'
FROM generate_series(1, 6) g;
"""


async def run(dsn: str, *, out: TextIO = sys.stdout) -> dict[str, Any]:
    async with pgd.Runtime(app, dsn) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            handle = await runtime.client.start("embedding_pipeline", {"batch": 10})
            print(f"started {handle.instance_id}: chunk → embed (4 at a time) → store → mark", file=out)
            marked = await handle.result(timeout=60)
            stats = await conn.fetchrow(
                "SELECT count(*) AS chunks, count(embedding) AS embedded,"
                " count(DISTINCT idempotency_key) AS keys FROM chunks"
            )
            docs = await conn.fetchval("SELECT count(*) FROM docs WHERE status = 'embedded'")
        finally:
            await conn.close()
        retried = sum(1 for e in await handle.history() if e.kind == "activity_completed"
                      and e.data.get("result", {}).get("key") in api.failed)
        print(f"documents embedded: {docs}; chunks: {stats['chunks']} with {stats['embedded']} vectors; "
              f"transient failures retried: {len(api.failed)} ({retried} recovered); API calls: {api.calls}",
              file=out)
        print(await render_instance(runtime.client, handle.instance_id, app), file=out)
    return {"marked": marked["row_count"], "docs": docs, "chunks": stats["chunks"], "embedded": stats["embedded"],
            "keys": stats["keys"], "failures": len(api.failed)}
