"""What the benchmark's phases share: names, scratch databases, connections, completion watching."""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store import Database
from pgdurable_async._store.listener import Listener
from pgdurable_async._store.migrations import migrate

SCHEMA = "pgdurable"
WAKE_SAMPLES = 50
START_CONCURRENCY = 16  # concurrent client.start calls (engine and floor alike)
LEASE_SECONDS = 30.0

FANOUT = "bench_fanout"
STEPS = "bench_three_steps"
WAKE = "bench_wake"
NOOP = "bench_noop"
STEP = "bench_step"
MARK = "bench_mark"

def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``values`` must not be empty)."""
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]



def dsn_for(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError("bench needs a URL DSN: postgresql://user@host:port/dbname")
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def scratch_database(dsn: str, tag: str) -> AsyncIterator[str]:
    """A new, migrated database on ``dsn``'s server, dropped on exit."""
    name = f"pgd_bench_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    target = dsn_for(dsn, name)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(f"bench creates scratch databases: the DSN's role needs CREATEDB ({exc})") from None
    finally:
        await admin.close()
    try:
        await migrate(target, SCHEMA)
        yield target
    finally:
        with anyio.CancelScope(shield=True):
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA, "application_name": "pgdurable_bench"})


class DoneWatcher:
    """LISTENs on the completion channel and records when each instance finished."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.finished: dict[str, float] = {}
        self._pending: set[str] = set()
        self._all_done = anyio.Event()
        db = Database(dsn, schema=SCHEMA)
        self._listener = Listener(db, {db.channel("done"): self._on_done})

    async def __aenter__(self) -> DoneWatcher:
        await self._listener.ensure()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._listener.close()

    def _on_done(self, instance_id: str) -> None:
        self.finished.setdefault(instance_id, time.perf_counter())
        self._pending.discard(instance_id)
        if not self._pending:
            self._all_done.set()

    def expect(self, ids: Sequence[str]) -> None:
        """Call before starting ``ids``; :meth:`wait` returns once all have finished."""
        self._pending = {i for i in ids if i not in self.finished}
        self._all_done = anyio.Event()
        if not self._pending:
            self._all_done.set()

    async def wait(self, timeout: float) -> None:
        with anyio.fail_after(timeout):
            await self._all_done.wait()


async def statuses(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM instances WHERE instance_id LIKE $1 || '%' GROUP BY status", prefix
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def event_counts(conn: asyncpg.Connection, instance_id: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT event_type, count(*) AS n FROM history WHERE instance_id = $1 GROUP BY event_type", instance_id
    )
    return {r["event_type"]: int(r["n"]) for r in rows}


def timeout_for(items: int) -> float:
    return max(120.0, items / 50)



async def start_all(
    ids: Sequence[str], start: Callable[[int, str], Awaitable[object]], started: dict[str, float]
) -> None:
    """``START_CONCURRENCY`` starters (numbered, so each may own a connection) work through ``ids``."""
    pending = iter(ids)

    async def starter(index: int) -> None:
        for instance_id in pending:
            started[instance_id] = time.perf_counter()
            await start(index, instance_id)

    async with anyio.create_task_group() as tg:
        for index in range(START_CONCURRENCY):
            tg.start_soon(starter, index)


def latency_figures(ids: Sequence[str], started: dict[str, float], finished: dict[str, float]) -> dict[str, float]:
    latencies = [finished[i] - started[i] for i in ids]
    elapsed = max(finished[i] for i in ids) - min(started[i] for i in ids)
    return {
        "workflows_seconds": elapsed,
        "workflows_per_s": len(ids) / elapsed,
        "workflow_latency_p50_ms": 1000 * percentile(latencies, 50),
        "workflow_latency_p99_ms": 1000 * percentile(latencies, 99),
    }

