"""Races between real worker processes: a shared 2,000-way fan-out, and a hung activity whose lease expires.

Workers are ``python -m pgdurable_async worker`` processes serving tests/acceptance/race_app.py.
A frozen worker (SIGSTOP) keeps its database sessions but renews nothing; when it is
thawed (SIGCONT) its late result must be ignored, never applied a second time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess
from tests.workers import reaped as workers
from tests.workers import sql_rows as _sql

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.acceptance.race_app:app"


def Worker(dsn: str, tmp: Path, name: str, *extra: str) -> WorkerProcess:  # noqa: N802 - reads as a class
    """A race-app worker logging to ``tmp/name.log``."""
    return WorkerProcess(dsn, APP, tmp / f"{name}.log", *extra, env={"PGDURABLE_RACE_MARKERS": str(tmp / "markers")})


async def _history(dsn: str, instance_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    rows = await _sql(
        dsn, "SELECT seq, event_type, payload::text AS p FROM pgdurable.history WHERE instance_id = $1 ORDER BY seq",
        instance_id,
    )
    events = [(r["seq"], r["event_type"], orjson.loads(r["p"])) for r in rows]
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1)), "history seq has gaps"
    return events


async def _assert_nothing_stranded(dsn: str, instance_id: str) -> None:
    for table in ("work_queue", "timers", "orchestrator_queue"):
        rows = await _sql(dsn, f"SELECT count(*) AS n FROM pgdurable.{table} WHERE instance_id = $1", instance_id)
        assert rows[0]["n"] == 0, f"stranded rows in {table}"


def _pids(tmp: Path, phase: str, key: str) -> set[int]:
    """Pids that left a ``phase`` marker for ``key``."""
    return {int(p.name.rsplit(".", 1)[1]) for p in (tmp / "markers").glob(f"{phase}.{key}.*")}


async def _marked(tmp: Path, phase: str, key: str, pid: int, timeout: float = 30) -> set[int]:
    """Wait until process ``pid`` left a ``phase`` marker for ``key``; returns every pid that did."""
    with anyio.fail_after(timeout):
        while pid not in _pids(tmp, phase, key):
            await anyio.sleep(0.02)
    return _pids(tmp, phase, key)


@pytest.mark.timeout(150)
async def test_four_workers_share_a_2000_way_fanout(dsn: str, tmp_path: Path) -> None:
    """Every activity runs and is recorded exactly once, whichever of 4 processes claims it."""
    n = 2000
    with workers() as started:
        for i in range(4):
            started.append(Worker(dsn, tmp_path, f"w{i}", "--concurrency", "16"))
        for worker in started:
            await worker.ready()
        async with pgd.Client(dsn) as client:
            handle = await client.start("fanout", n, instance_id="fan-2000")
            out = await handle.result(timeout=120)
        codes = [await worker.stop() for worker in started]
    assert out["count"] == n and out["squares_ok"] is True
    assert out["sum"] == sum(i * i for i in range(n))
    assert set(out["pids"]) <= {w.pid for w in started}
    assert len(out["pids"]) >= 2, f"one worker ran everything: {out['pids']}"
    assert codes == [0, 0, 0, 0], [w.log()[-2000:] for w in started]

    events = await _history(dsn, "fan-2000")
    scheduled = [d["task_id"] for _, kind, d in events if kind == "activity_scheduled"]
    completed = [d["task_id"] for _, kind, d in events if kind == "activity_completed"]
    assert len(scheduled) == n and len(set(scheduled)) == n
    assert len(completed) == n and len(set(completed)) == n
    assert set(completed) == set(scheduled)
    kinds = Counter(kind for _, kind, _ in events)
    assert kinds["orchestration_started"] == 1 and kinds["orchestration_completed"] == 1
    assert kinds["activity_failed"] == 0
    assert events[-1][1] == "orchestration_completed"
    await _assert_nothing_stranded(dsn, "fan-2000")


async def _create_effects(dsn: str) -> None:
    await _sql(dsn, "CREATE TABLE public.effects (key text NOT NULL, pid int NOT NULL)")


@pytest.mark.timeout(120)
async def test_hung_activity_lease_expires_and_late_result_is_ignored(dsn: str, tmp_path: Path) -> None:
    """Worker A freezes mid-activity; B re-claims and completes it; A's late result is dropped."""
    await _create_effects(dsn)
    with workers() as started:
        a = Worker(dsn, tmp_path, "a", "--lease-seconds", "2")
        started.append(a)
        await a.ready()
        async with pgd.Client(dsn) as client:
            handle = await client.start("hung", "k1", instance_id="hung-1")
            assert await _marked(tmp_path, "start", "k1", a.pid) == {a.pid}
            a.freeze()  # A's lease on the slow activity is no longer extended
            b = Worker(dsn, tmp_path, "b")
            started.append(b)
            out = await handle.result(timeout=60)
            assert out == {"slow": b.pid, "record": b.pid}, "B re-ran the activity after A's lease expired"
            a.thaw()
            await _marked(tmp_path, "end", "k1", a.pid)  # A's late result was produced
            assert await a.stop() == 0  # drains: A's pending ack is flushed before it exits
            assert await b.stop() == 0
            assert (await client.status("hung-1")).output == out

    events = await _history(dsn, "hung-1")
    completions = [d for _, kind, d in events if kind == "activity_completed"]
    assert [d["task_id"] for d in completions] == [1, 2], "exactly one completion per task"
    assert completions[0]["result"] == b.pid, "A's late result was not applied"
    assert [kind for _, kind, _ in events].count("orchestration_completed") == 1
    effects = await _sql(dsn, "SELECT key, pid FROM public.effects")
    assert [(r["key"], r["pid"]) for r in effects] == [("k1/after", b.pid)]
    await _assert_nothing_stranded(dsn, "hung-1")


@pytest.mark.timeout(120)
async def test_hung_transactional_activity_commits_once(dsn: str, tmp_path: Path) -> None:
    """A frozen transactional activity whose session is dropped is re-run by B; A's late SQL never commits."""
    await _create_effects(dsn)
    with workers() as started:
        a = Worker(dsn, tmp_path, "a", "--lease-seconds", "2")
        started.append(a)
        await a.ready()
        async with pgd.Client(dsn) as client:
            handle = await client.start("hung_tx", "t1", instance_id="hung-tx-1")
            assert await _marked(tmp_path, "start", "t1", a.pid) == {a.pid}
            a.freeze()
            # A's transaction holds the item's row lock; the server drops the idle session
            # (as idle_in_transaction_session_timeout or a network partition would).
            killed = await _sql(
                dsn,
                "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
                " WHERE datname = current_database() AND state = 'idle in transaction'"
                " AND pid IN (SELECT pid FROM pg_locks WHERE mode = 'RowShareLock'"
                "             AND relation = 'pgdurable.work_queue'::regclass)",  # SELECT ... FOR UPDATE
            )
            assert [r["ok"] for r in killed] == [True]
            b = Worker(dsn, tmp_path, "b")
            started.append(b)
            assert await handle.result(timeout=60) == b.pid
            a.thaw()
            await _marked(tmp_path, "woke", "t1", a.pid)  # A resumed its activity
            assert await a.stop() == 0
            assert await b.stop() == 0

    effects = await _sql(dsn, "SELECT key, pid FROM public.effects")
    assert [(r["key"], r["pid"]) for r in effects] == [("t1", b.pid)], "the effect committed exactly once, by B"
    events = await _history(dsn, "hung-tx-1")
    assert [kind for _, kind, _ in events].count("activity_completed") == 1
    assert events[-1][1] == "orchestration_completed"
    await _assert_nothing_stranded(dsn, "hung-tx-1")
