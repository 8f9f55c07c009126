"""What fuzzing found, end to end with a worker: deep graphs run, unreadable messages fail loudly.

* A graph as deep as df.start accepts (256 nodes, as in pg_durable) runs to completion.  A
  chain of 130 joins used to fail at its first turn ("a turn could not be written: Recursion
  limit reached": orjson encodes at most 255 levels, and a join nests two per node).
* A message the worker cannot decode (a number beyond a double, nesting deeper than the JSON
  decoder goes: SQL callers can queue both with pgdurable.start / pgdurable.raise_event) used
  to leave its instance pending for ever, retried every minute; it now fails the instance
  with a TurnError, and the other instances are not held up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._graph.compiler import MAX_DEPTH

app = pgd.App()


@app.orchestration
async def waits(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    return await ctx.wait_for_event("go")


def chain(kind: str, depth: int) -> str:
    """A df expression ``depth`` nodes deep."""
    expr = "'SELECT 0'"
    for i in range(depth - 1):
        if kind == "loop":
            expr = f"df.loop({expr}, 'SELECT false')"
        elif kind == "bind":
            expr = f"({expr} |=> 'b{i}')"
        elif kind == "if":
            expr = f"('SELECT true' ?> {expr} !> 'SELECT 2')"
        else:
            expr = f"({expr} {kind} 'SELECT {i}')"
    return expr


async def _until_finished(conn: asyncpg.Connection, ids: list[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await conn.fetch("SELECT instance_id, status, error FROM pgdurable.instances "
                                "WHERE instance_id = ANY($1)", ids)
        states = {r["instance_id"]: (r["status"], r["error"]) for r in rows}
        if all(s not in ("pending", "running") for s, _ in states.values()) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_graphs_as_deep_as_the_limit_run(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # A name bound with |=> sits on its node (pg_durable's result_name): binds add no depth.
        for kind in ("&", "|", "if", "loop"):
            with pytest.raises(asyncpg.PostgresError, match=f"more than {MAX_DEPTH} nodes deep"):
                await conn.fetchval(f"SELECT df.start({chain(kind, MAX_DEPTH + 1)})")
        async with pgd.Runtime(app, dsn, max_concurrency=16):
            ids = [await conn.fetchval(f"SELECT df.start({chain(kind, MAX_DEPTH)})")
                   for kind in ("&", "|", "bind", "if", "loop")]
            states = await _until_finished(conn, ids)
        assert {s for s, _ in states.values()} == {"completed"}, states
    finally:
        await conn.close()


@pytest.mark.parametrize("payload", ["1e400", "[" * 2000 + "]" * 2000], ids=["huge-number", "deep-nesting"])
async def test_an_unreadable_message_fails_its_instance(dsn: str, payload: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with pgd.Runtime(app, dsn) as runtime:
            waiting = await runtime.client.start(waits, None)
            await asyncio.sleep(0.5)  # it is waiting for "go"
            await conn.execute("SELECT pgdurable.raise_event($1, 'go', $2::jsonb)", waiting.instance_id, payload)
            started = await conn.fetchval("SELECT pgdurable.start('waits', $1::jsonb)", payload)
            fine = await runtime.client.start(waits, None)
            await runtime.client.raise_event(fine.instance_id, "go", 7)
            assert await fine.result(timeout=30) == 7  # not held up by the others
            states = await _until_finished(conn, [waiting.instance_id, started], timeout=30)
        for status, error in states.values():
            assert status == "failed" and "TurnError" in error, states
    finally:
        await conn.close()
