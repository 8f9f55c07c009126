"""The app that tests/acceptance/test_races_processes.py serves from several real worker processes.

Activities leave marker files named ``<phase>.<key>.<pid>`` in ``$PGDURABLE_RACE_MARKERS``
so the test can see which process ran what, and when.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

import pgdurable_async as pgd

app = pgd.App()
MARKERS = Path(os.environ.get("PGDURABLE_RACE_MARKERS", "/tmp/pgdurable-race-markers"))
SLOW_SECONDS = 3.0  # long enough for the test to freeze the worker mid-activity
SLOW_TX_SECONDS = 1.5


def mark(phase: str, key: str) -> None:
    """Leave ``<phase>.<key>.<pid>`` in the markers directory."""
    MARKERS.mkdir(parents=True, exist_ok=True)
    (MARKERS / f"{phase}.{key}.{os.getpid()}").touch()


@app.activity
async def square(ctx: pgd.ActivityContext, i: int) -> list[int]:
    """``[i * i, pid]``: the pid shows which worker process ran it."""
    await anyio.sleep(0.002)
    return [i * i, os.getpid()]


@app.orchestration
async def fanout(ctx: pgd.OrchestrationContext, n: int) -> dict[str, object]:
    results = await ctx.all([ctx.call_activity(square, i) for i in range(n)])
    return {
        "count": len(results),
        "sum": sum(r[0] for r in results),
        "squares_ok": all(r[0] == i * i for i, r in enumerate(results)),
        "pids": sorted({r[1] for r in results}),
    }


@app.activity
async def slow(ctx: pgd.ActivityContext, key: str) -> int:
    """Takes a while; marks its start and its (possibly late) end."""
    mark("start", key)
    await anyio.sleep(SLOW_SECONDS)
    mark("end", key)
    return os.getpid()


@app.transaction
async def record(ctx: pgd.TransactionContext, key: str) -> int:
    """A transactional effect: one row per application, committed with the completion."""
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO public.effects (key, pid) VALUES ($1, $2)", key, os.getpid())
    return os.getpid()


@app.orchestration
async def hung(ctx: pgd.OrchestrationContext, key: str) -> dict[str, int]:
    """A slow plain activity whose result feeds a transactional effect."""
    slow_pid = await ctx.call_activity(slow, key)
    record_pid = await ctx.call_activity(record, f"{key}/after")
    return {"slow": slow_pid, "record": record_pid}


@app.transaction
async def slow_record(ctx: pgd.TransactionContext, key: str) -> int:
    """A transactional activity that takes a while inside its transaction, then writes its effect."""
    assert ctx.conn is not None
    mark("start", key)
    await anyio.sleep(SLOW_TX_SECONDS)
    mark("woke", key)
    await ctx.conn.execute("INSERT INTO public.effects (key, pid) VALUES ($1, $2)", key, os.getpid())
    return os.getpid()


@app.orchestration
async def hung_tx(ctx: pgd.OrchestrationContext, key: str) -> int:
    return int(await ctx.call_activity(slow_record, key))
