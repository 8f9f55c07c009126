"""A real worker process killed with SIGKILL in the middle of a SQL-started graph.

The next worker resumes at the node that was running (the completed nodes are
not run again) and no SQL node is applied twice: every step counts its own row
updates, and each count must be exactly one.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import asyncpg
import orjson
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
app = pgd.App()  # the worker needs nothing of its own: graph built-ins come with every Runtime

STEPS = 8
# Each step bumps its own counter inside a slow statement: a kill lands mid-node.
STEP = "'UPDATE step_counts SET n = n + 1 FROM pg_sleep(0.3) WHERE step = {i}'"
GRAPH = " ~> ".join(STEP.format(i=i) for i in range(1, 4)) + " ~> (" + " & ".join(
    STEP.format(i=i) for i in range(4, 6)) + ") ~> " + " ~> ".join(STEP.format(i=i) for i in range(6, STEPS + 1))


def Worker(dsn: str, log: Path) -> WorkerProcess:  # noqa: N802 - reads as a class
    return WorkerProcess(dsn, "tests.integration.test_dsl_kill9:app", log, "--concurrency", "8")


async def test_sigkill_mid_graph_resumes_and_applies_each_sql_node_once(dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(dsn)
    worker = Worker(dsn, tmp_path / "worker.log")
    try:
        await conn.execute(
            "CREATE TABLE step_counts (step int PRIMARY KEY, n int NOT NULL DEFAULT 0);"
            f"INSERT INTO step_counts (step) SELECT generate_series(1, {STEPS})"
        )
        instance_id = await conn.fetchval(f"SELECT df.start({GRAPH}, 'kill9')")
        with anyio.fail_after(60):
            while await conn.fetchval("SELECT count(*) FROM step_counts WHERE n > 0") < 3:
                await anyio.sleep(0.02)
        worker.kill()  # step 3 has committed; steps 4 and 5 are running or about to
        done_before = await conn.fetchval("SELECT count(*) FROM step_counts WHERE n > 0")
        await worker.stop()
        worker = Worker(dsn, tmp_path / "worker.log")
        assert await conn.fetchval("SELECT df.await_instance($1, 90)", instance_id) == "completed"
        counts = dict(await conn.fetch("SELECT step, n FROM step_counts ORDER BY step"))
        assert counts == {i: 1 for i in range(1, STEPS + 1)}, f"a SQL node was applied twice or never: {counts}"
        history = await conn.fetch(
            "SELECT event_type, payload::text AS payload FROM pgdurable.history WHERE instance_id = $1 ORDER BY seq",
            instance_id,
        )
        scheduled = [orjson.loads(r["payload"])["input"]["node"] for r in history
                     if r["event_type"] == "activity_scheduled"]
        assert len(scheduled) == len(set(scheduled)) == STEPS, "a node was scheduled twice"
        completed = [r for r in history if r["event_type"] == "activity_completed"]
        assert len(completed) == STEPS
        assert done_before >= 3
    finally:
        await worker.stop()
        await conn.close()
