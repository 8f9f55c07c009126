"""``worker --metrics-port``: a real worker process, scraped over HTTP (tests/acceptance/ops_app.py).

Every metric of DESIGN section 8 is checked against what really happened: counters
against the attempts the test caused, the database-wide gauges against the rows of the
queues at the same moment (the work is held still while the test looks).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgdurable_async as pgd
from tests.workers import WorkerProcess

APP = "tests.acceptance.ops_app:app"
pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape_until(port: int, check: Any, timeout: float = 30) -> Samples:
    """Scrape until ``check(samples)`` holds (the gauges are cached for a second; reports lag a lease/3)."""
    with anyio.fail_after(timeout):
        while True:
            samples = await scrape(port)
            if check(samples):
                return samples
            await anyio.sleep(0.3)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def wait_for(conn: asyncpg.Connection, query: str, expected: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while await conn.fetchval(query) != expected:
            await anyio.sleep(0.05)


async def test_a_worker_serves_every_metric_with_values_that_match(
    dsn: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    port = free_port()
    worker = WorkerProcess(dsn, APP, tmp_path / "worker.log", "--concurrency", "16", "--lease-seconds", "3",
                           "--metrics-port", str(port), env={"PGDURABLE_OPS_RELEASE": str(release)})
    try:
        await worker.ready()
        assert f"metrics at http://127.0.0.1:{port}/metrics" in worker.log()
        async with pgd.Client(dsn) as client:
            assert await (await client.start("fan", 20, instance_id="fan-1")).result(timeout=30) == 380
            assert await (await client.start("retrying", 7, instance_id="retrying-1")).result(timeout=30) == 7
            with pytest.raises(pgd.InstanceFailed):
                await (await client.start("failing", 1, instance_id="failing-1")).result(timeout=30)
            for i in range(2):
                await client.start("waiting", i, instance_id=f"waiting-{i}")
            for i in range(3):
                await client.start("waiting_queued", i, instance_id=f"queued-{i}")
            for i in range(2):
                await client.start("sleeper", None, instance_id=f"sleeper-{i}")
        for i in range(2):  # instances of an orchestration nobody serves: their start messages wait
            await db.execute("SELECT pgdurable.start('ghost', 'null', $1)", f"ghost-{i}")
        # Held still: 5 activities leased and running, 2 timers an hour away, 2 start messages unclaimed.
        await wait_for(db, "SELECT count(*) FROM pgdurable.work_queue WHERE lease_token IS NOT NULL", 5)
        await wait_for(db, "SELECT count(*) FROM pgdurable.timers", 2)
        await wait_for(db, "SELECT count(*) FROM pgdurable.orchestrator_queue", 2)

        samples = await scrape_until(port, lambda s: value(s, "pgdurable_activities_running") == 5
                                     and value(s, "pgdurable_activity_oldest_running_seconds") > 0
                                     and value(s, "pgdurable_queue_depth", queue="work") == 5)

        # Counters: the attempts this process finished, by activity and outcome.
        assert value(samples, "pgdurable_activity_attempts_total", activity="double", outcome="completed") == 20
        assert value(samples, "pgdurable_activity_attempts_total", activity="flaky", outcome="retried") == 1
        assert value(samples, "pgdurable_activity_attempts_total", activity="flaky", outcome="completed") == 1
        assert value(samples, "pgdurable_activity_attempts_total", activity="doomed", outcome="retried") == 1
        assert value(samples, "pgdurable_activity_attempts_total", activity="doomed", outcome="failed") == 1
        assert ("pgdurable_activity_attempts_total", frozenset({("activity", "blocked"), ("outcome", "completed")})) \
            not in samples
        assert value(samples, "pgdurable_activity_duration_seconds_count", activity="double") == 20
        assert value(samples, "pgdurable_activity_duration_seconds_bucket", activity="double", le="+Inf") == 20
        assert value(samples, "pgdurable_activity_duration_seconds_count", activity="flaky") == 2
        turns = value(samples, "pgdurable_turns_total")
        assert turns >= 2 * 3 + 7  # fan, retrying, failing: two turns at least; the 7 others: their first
        assert 1 <= value(samples, "pgdurable_turn_duration_seconds_count") <= turns
        assert value(samples, "pgdurable_replays_total") >= 0

        # Gauges: the queues and instances as the database has them now.
        assert value(samples, "pgdurable_queue_depth", queue="orchestrator") == 2
        assert value(samples, "pgdurable_queue_oldest_age_seconds", queue="orchestrator") > 0  # the ghosts wait
        assert value(samples, "pgdurable_queue_depth", queue="work") == 5
        assert value(samples, "pgdurable_queue_oldest_age_seconds", queue="work") == 0  # leased: none is ready
        assert value(samples, "pgdurable_queue_depth", queue="timers") == 2
        assert value(samples, "pgdurable_queue_oldest_age_seconds", queue="timers") == 0  # none is due
        assert value(samples, "pgdurable_flow_queue_depth", queue="held") == 3
        counts = dict(await db.fetch("SELECT status, count(*) FROM pgdurable.instances GROUP BY status"))
        assert counts == {"completed": 2, "failed": 1, "running": 7, "pending": 2}
        for status in ("pending", "running", "completed", "failed", "cancelled", "terminated"):
            assert value(samples, "pgdurable_instances", status=status) == counts.get(status, 0)
        assert value(samples, "pgdurable_lock_waits") == 0
        wal = value(samples, "pgdurable_wal_bytes")
        assert wal > 0

        # A session waiting on a lock shows up; more WAL moves the position on.
        await db.execute("CREATE TABLE public.contended (v int)")
        await db.execute("CREATE TABLE public.filler AS SELECT g FROM generate_series(1, 1000) g")
        holder = await asyncpg.connect(dsn)
        waiter = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE public.contended IN ACCESS EXCLUSIVE MODE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter.fetchval, "SELECT count(*) FROM public.contended")
                samples = await scrape_until(port, lambda s: value(s, "pgdurable_lock_waits") >= 1)
                await tx.rollback()
        finally:
            await holder.close()
            await waiter.close()
        assert value(samples, "pgdurable_wal_bytes") > wal

        release.touch()
        async with pgd.Client(dsn) as client:
            for i in range(2):
                assert await client.wait(f"waiting-{i}", timeout=30) == i
        samples = await scrape_until(port, lambda s: value(s, "pgdurable_activities_running") == 0
                                     and value(s, "pgdurable_queue_depth", queue="work") == 0)
        assert value(samples, "pgdurable_activity_attempts_total", activity="blocked", outcome="completed") == 2
        assert value(samples, "pgdurable_activity_attempts_total", activity="blocked_queued", outcome="completed") == 3
        assert value(samples, "pgdurable_flow_queue_depth", queue="held") == 0
        assert value(samples, "pgdurable_activity_oldest_running_seconds") == 0
        assert await worker.stop() == 0
    finally:
        worker.close()

    # The text log (the default) names the instances and the attempts.
    log = worker.log()
    assert "instance fan-1 (fan) started" in log and "instance fan-1 (fan) completed" in log
    assert "instance failing-1 (failing) failed: ActivityError: " in log
    assert "activity flaky of instance retrying-1 failed (attempt 1 of 3): ValueError: the first attempt fails; " \
           "retrying at " in log
    assert "activity doomed of instance failing-1 failed (attempt 2 of 2, no attempts left): RuntimeError: doomed 1" \
        in log


async def test_metrics_flags_that_cannot_work_are_one_line_errors(dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess(dsn, APP, tmp_path / "taken.log", "--metrics-port", str(port),
                               env={"PGDURABLE_OPS_RELEASE": str(tmp_path / "release")})
        code = worker.proc.wait(timeout=60)
    lines = [line for line in worker.log().splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in worker.log()
    assert lines == [f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"]
    worker = WorkerProcess(dsn, APP, tmp_path / "bad.log", "--metrics-port", "70000")
    assert worker.proc.wait(timeout=60) == 2
    assert worker.log().strip().startswith("error: argument --metrics-port: not a TCP port: 70000")
