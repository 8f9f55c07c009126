"""``worker --processes N``: a supervisor runs N real worker processes and drains them all on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.acceptance.test_kill9 import _check_invariants, _prepare
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.timeout(240)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


async def _worker_pids(dsn: str, count: int) -> list[int]:
    """The OS pids of the ``count`` registered workers (a worker id is host:pid:nonce), once there are that many."""
    conn = await asyncpg.connect(dsn)
    try:
        with anyio.fail_after(60):
            while True:
                ids = [r["worker_id"] for r in await conn.fetch("SELECT worker_id FROM pgdurable.workers")]
                if len(ids) >= count:
                    return sorted(int(worker_id.split(":")[1]) for worker_id in ids)
                await anyio.sleep(0.05)
    finally:
        await conn.close()


async def test_sigterm_drains_every_process_and_exits_0(dsn: str, tmp_path: Path) -> None:
    await _prepare(dsn)
    markers = tmp_path / "markers"
    supervisor = WorkerProcess(dsn, "tests.acceptance.crash_app:app", tmp_path / "supervisor.log",
                               "--processes", "2", "--concurrency", "4",
                               env={"PGDURABLE_TEST_MARKERS": str(markers)})
    try:
        children = await _worker_pids(dsn, 2)
        assert supervisor.pid not in children and len(set(children)) == 2
        assert all(_parent_of(pid) == supervisor.pid for pid in children), "the workers are the supervisor's children"
        async with pgd.Client(dsn) as client:
            handles = [await client.start("pipeline", 6, instance_id=f"proc-{i}") for i in range(3)]
            with anyio.fail_after(60):
                while not markers.exists() or len(list(markers.iterdir())) < 4:
                    await anyio.sleep(0.02)
            supervisor.proc.send_signal(signal.SIGTERM)  # activities are running right now
            with anyio.fail_after(60):
                while supervisor.proc.poll() is None:
                    await anyio.sleep(0.05)
            assert supervisor.proc.returncode == 0, supervisor.log()
            assert all(_parent_of(pid) is None for pid in children), "a worker process outlived its supervisor"
            log = supervisor.log()
            assert log.count(" ready: ") == 2 and "draining 2 worker processes" in log and "supervisor stopped" in log
            drained = {p.name.rsplit(".", 1)[1] for p in markers.iterdir()}

            successor = WorkerProcess(dsn, "tests.acceptance.crash_app:app", tmp_path / "successor.log",
                                      env={"PGDURABLE_TEST_MARKERS": str(markers)})
            try:
                for handle in handles:
                    assert await handle.result(timeout=120) == {"sum": sum(i * i for i in range(6)), "recorded": 6}
            finally:
                assert await successor.stop() == 0
    finally:
        supervisor.close()
    assert drained <= {str(pid) for pid in children}, "only the supervised workers ran activities before the stop"
    for i in range(3):
        await _check_invariants(dsn, f"proc-{i}", 6)


async def test_a_child_that_cannot_start_stops_the_supervisor(dsn: str, tmp_path: Path) -> None:
    """A DSN that refuses the children fails each at start: the supervisor exits non-zero, it does not loop."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PGDURABLE_DSN", None)
    bad = dsn.rsplit("/", 1)[0] + "/no_such_database_here"
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [sys.executable, "-m", "pgdurable_async", "worker", "--app", "tests.acceptance.crash_app:app",
             "--dsn", bad, "--processes", "2"],
            cwd=ROOT, env=env, check=False, stdin=subprocess.DEVNULL,
        )
    err = done.stderr.decode()
    assert done.returncode != 0, err
    assert "exited 1 at start; stopping" in err and "Traceback" not in err
