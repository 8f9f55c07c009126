"""A newcomer's first hour with the CLI (issue 12): tables, top, honest signals, safe demos, clear errors.

Real subprocesses on a real database, as a person would run them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest

import pgdurable_async as pgd
from tests.integration.test_cli import _env, assert_one_error_line, cli, ok, wait_done, worker


@pytest.mark.timeout(60)
async def test_tables_top_and_signals_to_finished_instances(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    async with worker(dsn, log):
        await ok("start", "add_pair", "--input", "[2, 3]", "--id", "sum-1", "--wait", "--timeout", "20", dsn=dsn)
        await ok("start", "doomed", "--input", '"the disk is full"', "--id", "boom-1", dsn=dsn)
        with pytest.raises(pgd.InstanceFailed):
            await wait_done(dsn, "boom-1")
        await ok("start", "approval", "--id", "wait-1", dsn=dsn)

        # list: a table with an error column; one row per instance, one line each in a pipe
        rows = (await ok("list", dsn=dsn)).splitlines()
        assert rows[0].split() == ["INSTANCE", "ID", "NAME", "STATUS", "CREATED", "UPDATED", "ERROR"]
        boom = next(r for r in rows if r.startswith("boom-1"))
        assert "failed" in boom and "ValueError: the disk is full" in boom
        assert all(not line.endswith(" ") for line in rows)
        assert orjson.loads(await ok("list", "--json", dsn=dsn))[0].keys() >= {"instance_id", "error"}

        # top --once: one frame with the queues, the rates, what runs and what failed
        frame = await ok("top", "--once", dsn=dsn)
        for heading in ("queues", "rates", "running", "latest failures"):
            assert any(line.startswith(heading) for line in frame.splitlines()), frame
        assert "orchestrator" in frame and "work" in frame and "timers" in frame
        assert "wait-1" in frame and "event approve since" in frame  # running, and what it waits on
        assert "boom-1" in frame and "ValueError: the disk is full" in frame

        # signals to a finished instance: one line saying what happened, exit 1 (as Temporal's CLI)
        line = assert_one_error_line(await cli("raise-event", "sum-1", "approve", dsn=dsn))
        assert "sum-1 already completed" in line and "not delivered" in line
        line = assert_one_error_line(await cli("cancel", "boom-1", dsn=dsn))
        assert "boom-1 already failed" in line and "nothing to cancel" in line
        out = await ok("cancel", "wait-1", dsn=dsn)
        assert "cancellation requested for wait-1 (it was running" in out

    text = log.read_text()
    assert "ready: 4 orchestrations, 4 activities" in text  # the app's own, not the built-in graph runner


@pytest.mark.timeout(30)
async def test_graph_explains_what_it_cannot_draw(dsn: str, tmp_path: Path) -> None:
    async with worker(dsn, tmp_path / "worker.log"):
        await ok("start", "add_pair", "--input", "[1, 1]", "--id", "code-1", "--wait", dsn=dsn)
    line = assert_one_error_line(await cli("graph", "code-1", dsn=dsn))
    assert "orchestration written in Python, not a graph workflow" in line and "--app" not in line


@pytest.mark.timeout(60)
async def test_demo_refuses_a_database_with_tables_of_its_own(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text);"
                           "INSERT INTO docs VALUES (1, 'mine')")
    finally:
        await conn.close()
    line = assert_one_error_line(await cli("demo", "--fanout", "5", dsn=dsn))
    assert "public.docs" in line and "--yes" in line
    assert "20/20" not in (await ok("demo", "--fanout", "5", "--yes", dsn=dsn))
    proc = await cli("demo", "document_batch", "--yes", dsn=dsn, timeout=90)
    assert proc.returncode == 0, proc.stderr
    conn = await asyncpg.connect(dsn)
    try:  # the user's docs table is untouched; the demo's tables are in its own schema
        assert await conn.fetch("SELECT id, body FROM public.docs") == [(1, "mine")]
        assert await conn.fetchval("SELECT count(*) FROM pgdurable_demo.documents WHERE processed") == 250
    finally:
        await conn.close()


def _worker_with_app(app_file: str, source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / f"{app_file}.py").write_text(source)
    return subprocess.run([sys.executable, "-m", "pgdurable_async", "worker", "--app", f"{app_file}:app", "--dsn",
                           "postgresql://postgres@127.0.0.1:1/x"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.timeout(60)
def test_app_errors_are_one_line_with_file_and_line(tmp_path: Path) -> None:
    proc = _worker_with_app("broken_syntax", "import pgdurable_async as pgd\napp = pgd.App(\ndef f(:\n", tmp_path)
    line = assert_one_error_line(proc)
    assert f"{tmp_path / 'broken_syntax.py'}, line" in line and "syntax error" in line

    proc = _worker_with_app("needs_dep", "import pgdurable_async\nimport no_such_dependency_xyz\n", tmp_path)
    line = assert_one_error_line(proc)
    assert f"{tmp_path / 'needs_dep.py'}, line 2" in line and "no_such_dependency_xyz" in line
    assert "no module named 'needs_dep'" not in line  # the module is there; its import failed

    line = assert_one_error_line(_worker_with_app("fails_at_import", "x = 1 / 0\n", tmp_path))
    assert f"{tmp_path / 'fails_at_import.py'}, line 1: ZeroDivisionError" in line

    (tmp_path / "missing.py").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pgdurable_async", "worker", "--app", "missing:app", "--dsn",
                           "postgresql://postgres@127.0.0.1:1/x"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert "no module named 'missing'" in assert_one_error_line(proc)


@pytest.mark.timeout(60)
async def test_df_cancel_says_what_happened_and_df_nodes_is_quiet(dsn: str) -> None:
    async with pgd.Runtime(pgd.App(), dsn):
        conn = await asyncpg.connect(dsn)
        notices: list[str] = []
        conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
        try:
            done = await conn.fetchval("SELECT df.start('SELECT 1' ~> 'SELECT 2')")
            assert await conn.fetchval("SELECT df.await_instance($1, 30)", done) == "completed"
            assert await conn.fetchval("SELECT df.cancel($1)", done) == f"Instance {done} already completed: " \
                                                                         "nothing to cancel"
            assert await conn.fetchval("SELECT df.status($1)", done) == "completed"
            stuck = await conn.fetchval("SELECT df.start(df.wait_for_signal('never'))")
            assert await conn.fetchval("SELECT df.cancel($1, 'enough')", stuck) == f"Instance {stuck} cancelled: enough"
            assert await conn.fetchval("SELECT df.cancel($1)", stuck) == f"Instance {stuck} already cancelled: " \
                                                                          "nothing to cancel"
            for _ in range(3):
                assert await conn.fetchval("SELECT count(*) FROM df.nodes") >= 3
        finally:
            await conn.close()
    assert notices == []
