"""Timers by one clock, the database's: a worker whose own clock is an hour off fires them on time.

The worker runs under libfaketime (Debian's ``faketime``), its wall clock shifted by an hour
either way; the client and PostgreSQL keep the real time.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt-get install faketime)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("skew", ["+1h", "-1h"])
async def test_a_skewed_worker_fires_timers_by_the_databases_clock(dsn: str, tmp_path: Path, skew: str) -> None:
    worker = WorkerProcess(dsn, "tests.acceptance.clock_app:app", tmp_path / "worker.log",
                           prefix=("faketime", "-f", skew), env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    try:
        await worker.ready()
        async with pgd.Client(dsn) as client:
            started = anyio.current_time()
            handle = await client.start("nap", 2.0)
            before, after = await handle.result(timeout=60)
            elapsed = anyio.current_time() - started
        conn = await asyncpg.connect(dsn)
        try:
            db_now: datetime = await conn.fetchval("SELECT now()")
        finally:
            await conn.close()
    finally:
        await worker.stop()
    assert 1.9 <= elapsed < 20, (skew, elapsed, worker.log())  # not an hour early, not an hour late
    for seen in (datetime.fromisoformat(before), datetime.fromisoformat(after)):
        assert abs(seen - db_now) < timedelta(minutes=1), (skew, seen, db_now)  # ctx.now() is the database's
    assert timedelta(seconds=1.9) <= datetime.fromisoformat(after) - datetime.fromisoformat(before)
