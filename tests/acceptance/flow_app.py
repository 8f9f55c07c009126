"""The app tests/acceptance/test_flow_processes.py serves from several real worker processes.

Each activity records its start and end, by the database's clock, in ``public.runs`` (one row
per attempt, with the worker's pid), so the test can check the queues' limits across processes.
``$PGDURABLE_FLOW_DSN`` names the database (the worker's own).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import anyio
import asyncpg

import pgdurable_async as pgd

app = pgd.App()
shared = pgd.Queue("shared", concurrency=2)
rated = pgd.Queue("rated", rate_limit=pgd.RateLimit(4, per=timedelta(seconds=1)))
tenants = pgd.Queue("tenants", concurrency=6, key_concurrency=1)
serial = pgd.Queue("serial", concurrency=1)
_pool: asyncpg.Pool | None = None

RUNS = """CREATE TABLE IF NOT EXISTS public.runs (
    queue text NOT NULL, key text, label text NOT NULL, pid integer NOT NULL,
    started_at timestamptz NOT NULL, ended_at timestamptz)"""


async def _run(queue: str, job: dict[str, Any]) -> int:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["PGDURABLE_FLOW_DSN"], min_size=1, max_size=8)
    started = await _pool.fetchval(
        "INSERT INTO public.runs (queue, key, label, pid, started_at) VALUES ($1, $2, $3, $4, clock_timestamp())"
        " RETURNING started_at", queue, job.get("key"), str(job["label"]), os.getpid())
    await anyio.sleep(float(job.get("seconds", 0.1)))
    await _pool.execute("UPDATE public.runs SET ended_at = clock_timestamp() WHERE label = $1 AND started_at = $2",
                        str(job["label"]), started)
    return os.getpid()


@app.activity(queue=shared)
async def in_shared(ctx: pgd.ActivityContext, job: dict[str, Any]) -> int:
    return await _run("shared", job)


@app.activity(queue=rated)
async def in_rated(ctx: pgd.ActivityContext, job: dict[str, Any]) -> int:
    return await _run("rated", job)


@app.activity(queue=tenants)
async def in_tenants(ctx: pgd.ActivityContext, job: dict[str, Any]) -> int:
    return await _run("tenants", job)


@app.activity(queue=serial)
async def in_serial(ctx: pgd.ActivityContext, job: dict[str, Any]) -> int:
    return await _run("serial", job)


@app.orchestration
async def fan(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> list[int]:
    """``{activity, n, seconds, keys?, priorities?}``: n calls at once; returns the pids that ran them."""
    keys, priorities = spec.get("keys") or [None], spec.get("priorities") or [0]
    calls = []
    for i in range(int(spec["n"])):
        key, priority = keys[i % len(keys)], priorities[i % len(priorities)]
        job = {"label": f"{spec.get('prefix', '')}{i}", "key": key, "seconds": spec["seconds"], "priority": priority}
        calls.append(ctx.call_activity(spec["activity"], job, key=key, priority=priority))
    return list(await ctx.all(calls))


@app.orchestration
async def tick(ctx: pgd.OrchestrationContext, data: Any) -> Any:
    """What the schedules start."""
    return data
