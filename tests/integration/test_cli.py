"""``python -m pgdurable_async`` run as a real subprocess against a real database."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import Process

import pgdurable_async as pgd
from tests.conftest import PgServer

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.cli_app:app"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PGDURABLE_DSN"}


async def cli(*args: str, dsn: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion; stdout/stderr as text."""
    cmd = [sys.executable, "-m", "pgdurable_async", *args, *(["--dsn", dsn] if dsn else [])]
    with anyio.fail_after(timeout):
        done = await anyio.run_process(cmd, check=False, cwd=REPO, env=_env())
    return subprocess.CompletedProcess(cmd, done.returncode, done.stdout.decode(), done.stderr.decode())


async def ok(*args: str, dsn: str) -> str:
    proc = await cli(*args, dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@contextlib.asynccontextmanager
async def worker(dsn: str, log: Path) -> AsyncIterator[Process]:
    """A ``worker`` subprocess serving tests/integration/cli_app.py, ready for work."""
    cmd = [sys.executable, "-m", "pgdurable_async", "worker", "--app", APP, "--concurrency", "8", "--dsn", dsn]
    log_path = anyio.Path(log)
    with log.open("wb") as sink:
        proc = await anyio.open_process(cmd, cwd=REPO, env=_env(), stdout=sink, stderr=sink)
    try:
        with anyio.fail_after(20):
            while "ready" not in await log_path.read_text():
                assert proc.returncode is None, await log_path.read_text()
                await anyio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(30, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await proc.aclose()


async def wait_done(dsn: str, instance_id: str) -> Any:
    async with pgd.Client(dsn) as client:
        return await client.wait(instance_id, timeout=20)


@pytest.mark.timeout(20)
async def test_help_lists_every_command() -> None:
    proc = await cli("--help")
    assert proc.returncode == 0
    for command in ("worker", "migrate", "start", "status", "list", "history", "raise-event", "cancel",
                    "terminate", "purge", "demo", "bench"):
        assert command in proc.stdout


@pytest.mark.timeout(30)
async def test_migrate_installs_then_reports_up_to_date(empty_dsn: str) -> None:
    first = await ok("migrate", dsn=empty_dsn)
    assert "applied migration(s) 1" in first
    again = await ok("migrate", dsn=empty_dsn)
    assert "up to date" in again


@pytest.mark.timeout(40)
async def test_start_status_history_list(dsn: str, tmp_path: Path) -> None:
    async with worker(dsn, tmp_path / "worker.log"):
        out = await ok("start", "add_pair", "--input", "[2, 3]", "--id", "sum-1", "--wait", "--timeout", "20", dsn=dsn)
        assert out.splitlines() == ["sum-1", "5"]
        generated = (await ok("start", "add_pair", "--input", "[1, 1]", dsn=dsn)).strip()
        assert await wait_done(dsn, generated) == 2

    table = await ok("status", "sum-1", dsn=dsn)
    assert "completed" in table and "add_pair" in table
    state = orjson.loads(await ok("status", "sum-1", "--json", dsn=dsn))
    assert state["status"] == "completed" and state["output"] == 5 and state["input"] == [2, 3]
    assert datetime.fromisoformat(state["created_at"]).tzinfo is not None

    events = orjson.loads(await ok("history", "sum-1", "--json", dsn=dsn))
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "orchestration_started" and kinds[-1] == "orchestration_completed"
    assert "activity_completed" in kinds and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "orchestration_completed" in await ok("history", "sum-1", dsn=dsn)

    listed = orjson.loads(await ok("list", "--json", dsn=dsn))
    assert {s["instance_id"] for s in listed} == {"sum-1", generated}
    filtered = orjson.loads(await ok("list", "--status", "completed", "--name", "add_pair", "--limit", "1",
                                     "--json", dsn=dsn))
    assert len(filtered) == 1
    rows = (await ok("list", dsn=dsn)).splitlines()
    assert rows[0].split()[:2] == ["INSTANCE", "ID"] and len(rows) == 4


@pytest.mark.timeout(40)
async def test_raise_event_cancel_terminate_purge(dsn: str, tmp_path: Path) -> None:
    async with worker(dsn, tmp_path / "worker.log"):
        await ok("start", "approval", "--id", "ok-1", dsn=dsn)
        await ok("raise-event", "ok-1", "approve", "--data", '{"by": "ann"}', "--key", "req-1", dsn=dsn)
        assert await wait_done(dsn, "ok-1") == {"approved": {"by": "ann"}}

        await ok("start", "approval", "--id", "cancel-1", dsn=dsn)
        await ok("cancel", "cancel-1", "--reason", "not needed", dsn=dsn)
        with pytest.raises(pgd.Cancelled):
            await wait_done(dsn, "cancel-1")
        assert orjson.loads(await ok("status", "cancel-1", "--json", dsn=dsn))["status"] == "cancelled"

        await ok("start", "approval", "--id", "term-1", dsn=dsn)
        assert "only finished" in assert_one_error_line(await cli("purge", "term-1", dsn=dsn))
        await ok("terminate", "term-1", "--reason", "stop", dsn=dsn)
        assert orjson.loads(await ok("status", "term-1", "--json", dsn=dsn))["status"] == "terminated"
        await ok("purge", "term-1", dsn=dsn)
        assert "not found" in assert_one_error_line(await cli("status", "term-1", dsn=dsn))


@pytest.mark.timeout(45)
async def test_sigterm_drains_the_worker(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    async with worker(dsn, log) as proc:
        await ok("start", "slow_one", "--input", "1.0", "--id", "slow-1", dsn=dsn)
        async with pgd.Client(dsn) as client:
            with anyio.fail_after(15):
                while True:
                    if "activity_scheduled" in [e.kind for e in await client.history("slow-1")]:
                        break
                    await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # let the worker claim the activity
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    text = await anyio.Path(log).read_text()
    assert "draining" in text and "worker stopped" in text and "Traceback" not in text
    assert time.monotonic() - started < 30


@pytest.mark.timeout(20)
async def test_unknown_instance_is_one_line(dsn: str) -> None:
    for command in ("status", "history", "cancel", "purge"):
        line = assert_one_error_line(await cli(command, "no-such-id", dsn=dsn))
        assert "not found" in line


@pytest.mark.timeout(20)
async def test_bad_arguments_are_one_line(dsn: str) -> None:
    assert "--input" in assert_one_error_line(await cli("start", "add_pair", "--input", "{bad", dsn=dsn))
    assert "--data" in assert_one_error_line(await cli("raise-event", "x", "e", "--data", "[", dsn=dsn))
    assert "add_pair" in assert_one_error_line(await cli("start", "add_pair", dsn=dsn))  # no worker registered it
    line = assert_one_error_line(await cli("worker", "--app", "tests.integration.cli_app:nope", dsn=dsn))
    assert "nope" in line
    proc = await cli("list", "--status", "bogus", dsn=dsn)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "invalid choice: 'bogus'" in proc.stderr


@pytest.mark.timeout(20)
async def test_unreachable_or_missing_dsn_fails_fast() -> None:
    started = time.monotonic()
    line = assert_one_error_line(await cli("status", "x", dsn=UNREACHABLE, timeout=15))
    assert "cannot reach PostgreSQL" in line and time.monotonic() - started < 15
    assert "PGDURABLE_DSN" in assert_one_error_line(await cli("list"), code=2)


@pytest.mark.timeout(40)
async def test_demo_prints_progress_and_result(dsn: str) -> None:
    out = await ok("demo", "--fanout", "20", dsn=dsn)
    assert "20/20 activities completed" in out
    assert 'result: {"activities":20,"sum_of_squares":2470}' in out
    assert "elapsed:" in out
    counts = dict(line.split() for line in out.splitlines() if line.startswith("  "))
    assert counts["activity_scheduled"] == counts["activity_completed"] == "20"


@pytest.mark.timeout(90)
async def test_bench_runs_from_the_checkout(pg_server: PgServer) -> None:
    """``bench`` loads benchmarks/harness.py (not part of the package) and reports engine and both floors."""
    proc = await cli("bench", "--sizes", "50,20", "--workflows", "5", "--concurrency", "16", "--json",
                     dsn=pg_server.admin_dsn, timeout=80)
    assert proc.returncode == 0, proc.stderr
    report = orjson.loads(proc.stdout)
    assert report["ok"] and report["sizes"]["50"]["engine"]["fanout_events"]["activity_completed"] == 50
    assert set(report["sizes"]["20"]) >= {"engine", "minimal_floor", "engine_floor", "ratio"}


async def test_bench_refuses_bad_sizes_in_one_line() -> None:
    proc = await cli("bench", "--sizes", "10,ten", timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "--sizes" in proc.stderr
