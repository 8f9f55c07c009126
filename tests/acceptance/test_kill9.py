"""Real worker processes killed with SIGKILL mid-activity and mid-turn: nothing lost, nothing doubled."""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


_worker_numbers = itertools.count(1)


def Worker(dsn: str, markers: Path) -> WorkerProcess:  # noqa: N802 - reads as a class
    """A crash-app worker; its log goes next to the markers directory."""
    log = markers.parent / f"worker-{next(_worker_numbers)}.log"
    return WorkerProcess(dsn, "tests.acceptance.crash_app:app", log, "--concurrency", "8",
                         env={"PGDURABLE_TEST_MARKERS": str(markers)})


async def _prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE public.effects (key text NOT NULL, activity_id text NOT NULL)")
    finally:
        await conn.close()
    async with pgd.Runtime(_registry_app(), dsn):
        pass  # registers the crash app's names so the client may start them


def _registry_app() -> pgd.App:
    from tests.acceptance import crash_app

    return crash_app.app


async def _check_invariants(dsn: str, instance_id: str, expected_effects: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT seq, event_type, payload FROM pgdurable.history WHERE instance_id = $1 ORDER BY seq", instance_id
        )
        assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "history seq has gaps"
        seen: set[tuple[str, object]] = set()
        for r in rows:
            payload = r["payload"]
            if isinstance(payload, str):
                import orjson

                payload = orjson.loads(payload)
            if "task_id" in payload:
                key = (r["event_type"], payload["task_id"])
                assert key not in seen, f"duplicated history event {key}"
                seen.add(key)
        assert [r["event_type"] for r in rows].count("orchestration_completed") == 1
        effects = await conn.fetch(
            "SELECT key, count(*) AS n FROM public.effects WHERE key LIKE $1 GROUP BY key", f"{instance_id}/%"
        )
        assert len(effects) == expected_effects
        assert all(r["n"] == 1 for r in effects), "a transactional activity was applied twice"
        for table in ("work_queue", "timers", "orchestrator_queue"):
            assert await conn.fetchval(f"SELECT count(*) FROM pgdurable.{table} WHERE instance_id = $1",
                                       instance_id) == 0, f"stranded rows in {table}"
    finally:
        await conn.close()


async def test_sigkill_mid_activity(dsn: str, tmp_path: Path) -> None:
    await _prepare(dsn)
    markers = tmp_path / "markers"
    worker = Worker(dsn, markers)
    try:
        async with pgd.Client(dsn) as client:
            handle = await client.start("pipeline", 6, instance_id="mid-activity")
            with anyio.fail_after(60):
                while not markers.exists() or not any(markers.iterdir()):
                    await anyio.sleep(0.02)
            worker.kill()  # activities are running right now
            first_pids = {p.name.rsplit(".", 1)[1] for p in markers.iterdir()}
            worker = Worker(dsn, markers)
            assert await handle.result(timeout=120) == {"sum": sum(i * i for i in range(6)), "recorded": 6}
            pids = {p.name.rsplit(".", 1)[1] for p in markers.iterdir()}
            assert len(pids - first_pids) >= 1, "the second worker re-ran the interrupted activities"
    finally:
        await worker.stop()
    await _check_invariants(dsn, "mid-activity", 6)


async def test_sigkill_mid_turn(dsn: str, tmp_path: Path) -> None:
    await _prepare(dsn)
    worker = Worker(dsn, tmp_path / "markers")
    kills = 0
    try:
        async with pgd.Client(dsn) as client:
            handle = await client.start("heavy", 5, instance_id="mid-turn")
            conn = await asyncpg.connect(dsn)
            try:
                while kills < 2:
                    with anyio.fail_after(60):
                        while not await _turn_in_progress(conn, "mid-turn"):
                            await anyio.sleep(0.01)
                    worker.kill()  # a turn's transaction holds the instance row right now
                    kills += 1
                    worker = Worker(dsn, tmp_path / "markers")
            finally:
                await conn.close()
            assert await handle.result(timeout=120) == sum(range(1, 6)) + 5 * (sum(i * i for i in range(3_000_000)) % 7)
    finally:
        await worker.stop()
    await _check_invariants(dsn, "mid-turn", 5)


async def _turn_in_progress(conn: asyncpg.Connection, instance_id: str) -> bool:
    """True while a worker sits inside a turn's transaction (replaying or running orchestration code)."""
    busy = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'pgdurable_async' AND state = 'idle in transaction'"
        " AND (query LIKE '%FROM orchestrator_queue%instance_id = ANY%' OR query LIKE '%FROM history h%')"
    )
    return bool(busy)
