"""Queues' limits and schedules across real worker processes (tests/acceptance/flow_app.py).

Two ``python -m pgdurable_async worker`` processes share each queue; every attempt records its
start and end by the database's clock in ``public.runs``, so the limits are checked on what
really ran, whichever process ran it (a rate limit on the claims the database recorded, where it
is kept: a start runs a moment after its claim, longer on a loaded machine).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.acceptance.flow_app import RUNS
from tests.integration.test_queues import CLAIM_LOG, CLAIMS
from tests.workers import WorkerProcess, reaped
from tests.workers import sql_rows as _sql

APP = "tests.acceptance.flow_app:app"
pytestmark = pytest.mark.timeout(90)


def Worker(dsn: str, tmp: Path, name: str) -> WorkerProcess:  # noqa: N802 - reads as a class
    return WorkerProcess(dsn, APP, tmp / f"{name}.log", "--concurrency", "8", env={"PGDURABLE_FLOW_DSN": dsn})


async def _two_workers(dsn: str, tmp: Path, started: list[WorkerProcess]) -> tuple[WorkerProcess, WorkerProcess]:
    await _sql(dsn, RUNS)
    a, b = Worker(dsn, tmp, "a"), Worker(dsn, tmp, "b")
    started.extend([a, b])
    await a.ready()
    await b.ready()
    return a, b


async def _runs(dsn: str, queue: str) -> list[asyncpg.Record]:
    return await _sql(dsn, "SELECT key, label, pid, started_at, ended_at FROM public.runs WHERE queue = $1"
                           " ORDER BY started_at", queue)


def _max_overlap(rows: list[asyncpg.Record]) -> int:
    points = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows])
    running = peak = 0
    for _, delta in points:  # at equal times an end sorts before a start
        running += delta
        peak = max(peak, running)
    return peak


async def _fan(dsn: str, spec: dict[str, Any], timeout: float = 60) -> list[int]:
    async with pgd.Client(dsn) as client:
        pids: list[int] = await (await client.start("fan", spec)).result(timeout=timeout)
    return pids


async def test_two_workers_share_a_concurrency_of_two(dsn: str, tmp_path: Path) -> None:
    with reaped() as started:
        a, b = await _two_workers(dsn, tmp_path, started)
        pids = await _fan(dsn, {"activity": "in_shared", "n": 16, "seconds": 0.25})
        assert await a.stop() == 0 and await b.stop() == 0
    rows = await _runs(dsn, "shared")
    assert len(rows) == 16 and all(r["ended_at"] is not None for r in rows)
    assert _max_overlap(rows) == 2, "never three at once, whichever worker ran them"
    assert set(pids) == {a.pid, b.pid}, "both workers took part"
    assert rows[-1]["ended_at"] - rows[0]["started_at"] >= timedelta(seconds=16 * 0.25 / 2)


async def test_a_rate_limit_holds_across_both_workers(dsn: str, tmp_path: Path) -> None:
    log = await asyncpg.connect(dsn)
    try:
        await log.execute(CLAIM_LOG)
    finally:
        await log.close()
    with reaped() as started:
        a, b = await _two_workers(dsn, tmp_path, started)
        pids = await _fan(dsn, {"activity": "in_rated", "n": 14, "seconds": 0.0})
        assert await a.stop() == 0 and await b.stop() == 0
    assert len(await _runs(dsn, "rated")) == 14
    # the limit is kept where items are claimed: each start's claim, by the database's clock
    claims = [r["started_at"] for r in await _sql(dsn, CLAIMS, "rated")]
    assert len(claims) == 14
    # 4 starts per second in any sliding window: fixed buckets would let 8 through within a few ms of a
    # bucket's end
    window = timedelta(seconds=1)
    assert max(sum(1 for t in claims if s <= t < s + window) for s in claims) == 4
    # 14 starts need 3 full windows after the first 4
    assert claims[-1] - claims[0] >= 3 * window
    assert set(pids) <= {a.pid, b.pid}  # both claim; whichever looks first after a window slides takes its slots


async def test_one_key_never_overlaps_itself(dsn: str, tmp_path: Path) -> None:
    with reaped() as started:
        a, b = await _two_workers(dsn, tmp_path, started)
        await _fan(dsn, {"activity": "in_tenants", "n": 18, "seconds": 0.15, "keys": ["acme", "globex", "initech"]})
        assert await a.stop() == 0 and await b.stop() == 0
    rows = await _runs(dsn, "tenants")
    assert len(rows) == 18
    for key in ("acme", "globex", "initech"):
        assert _max_overlap([r for r in rows if r["key"] == key]) == 1, key
    assert _max_overlap(rows) == 3, "the tenants ran side by side: no tenant's backlog starved another"


async def test_priorities_reorder_a_backlog_across_workers(dsn: str, tmp_path: Path) -> None:
    with reaped() as started:
        a, b = await _two_workers(dsn, tmp_path, started)
        async with pgd.Client(dsn) as client:
            blocker = await client.start("fan", {"activity": "in_serial", "n": 1, "seconds": 1.0, "prefix": "blocker"})
            with anyio.fail_after(20):
                while not await _runs(dsn, "serial"):
                    await anyio.sleep(0.02)
            priorities = [0, 10, 5, 0, 10, -3, 5, 1]
            backlog = await client.start("fan", {"activity": "in_serial", "n": 8, "seconds": 0.02,
                                                 "priorities": priorities})
            await backlog.result(timeout=30)
            await blocker.result(timeout=30)
        assert await a.stop() == 0 and await b.stop() == 0
    labels = [r["label"] for r in await _runs(dsn, "serial")]
    expected = [str(i) for i in sorted(range(8), key=lambda i: (-priorities[i], i))]
    assert labels == ["blocker0", *expected]


async def _fire_times(dsn: str, schedule_id: str) -> list[datetime]:
    rows = await _sql(dsn, "SELECT instance_id FROM pgdurable.instances WHERE instance_id LIKE $1 || '@%'"
                           " ORDER BY instance_id", schedule_id)
    return [datetime.strptime(r["instance_id"].split("@", 1)[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            for r in rows]


async def _more_firings(dsn: str, schedule_id: str, n: int, timeout: float = 30) -> None:
    goal = len(await _fire_times(dsn, schedule_id)) + n
    with anyio.fail_after(timeout):
        while len(await _fire_times(dsn, schedule_id)) < goal:
            await anyio.sleep(0.1)


async def test_a_schedule_fires_once_per_time_across_workers_and_a_kill(dsn: str, tmp_path: Path) -> None:
    with reaped() as started:
        a, b = await _two_workers(dsn, tmp_path, started)
        async with pgd.Client(dsn) as client:
            await client.create_schedule("every-second", "tick", {"from": "schedule"}, every=1)
            await _more_firings(dsn, "every-second", 3)
            a.kill()  # SIGKILL, perhaps mid-firing: its transaction rolls back, b fires on
            await _more_firings(dsn, "every-second", 3)
            again = Worker(dsn, tmp_path, "a-again")
            started.append(again)
            await again.ready()
            await _more_firings(dsn, "every-second", 3)
            await client.pause_schedule("every-second")
            fired = await _fire_times(dsn, "every-second")
            for t in fired:
                instance_id = f"every-second@{t.strftime('%Y-%m-%dT%H:%M:%SZ')}"
                assert await client.wait(instance_id, timeout=30) == {"from": "schedule"}
        assert await b.stop() == 0 and await again.stop() == 0
    assert len(fired) >= 9
    steps = [later - earlier for earlier, later in zip(fired, fired[1:], strict=False)]
    assert set(steps) == {timedelta(seconds=1)}, f"a fire time was skipped or doubled: {fired}"
    starts = await _sql(dsn, "SELECT instance_id, count(*) AS n FROM pgdurable.history WHERE instance_id LIKE"
                             " 'every-second@%' AND event_type = 'orchestration_started' GROUP BY instance_id")
    assert len(starts) == len(fired) and {r["n"] for r in starts} == {1}
