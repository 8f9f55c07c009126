"""Worker processes beside the benchmark's own runtime (``bench --processes N``: N - 1 of them).

Each is ``python -m pgdurable_async worker`` serving ``benchmarks.engine_side:worker_app`` (the
benchmark's orchestrations and activities) on the engine's scratch database.  They are started
before a phase's clock starts (and counted in the ``workers`` table) and stopped with SIGTERM
after it; their CPU is read from ``/proc`` while they run (``Meter.extra_pids``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
from anyio.abc import Process

from .common import SCHEMA

__all__ = ["extra_workers"]

ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def extra_workers(dsn: str, count: int, concurrency: int) -> AsyncIterator[list[int]]:
    """``count`` worker processes serving the benchmark's app on ``dsn``; yields their pids once all run."""
    if count <= 0:
        yield []
        return
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("PGDURABLE_DSN", None)
    command = [sys.executable, "-m", "pgdurable_async", "worker", "--app", "benchmarks.engine_side:worker_app",
               "--dsn", dsn, "--schema", SCHEMA, "--concurrency", str(concurrency), "--log-level", "WARNING"]
    conn = await asyncpg.connect(dsn)
    procs: list[Process] = []
    try:
        before = int(await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.workers"))
        for _ in range(count):
            procs.append(await anyio.open_process(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                                  stdout=None, stderr=None))
        with anyio.fail_after(60):
            while int(await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.workers")) < before + count:
                if any(p.returncode is not None for p in procs):
                    raise RuntimeError("a benchmark worker process exited at start")
                await anyio.sleep(0.05)
        yield [p.pid for p in procs]
    finally:
        await conn.close()
        with anyio.CancelScope(shield=True):
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)  # drain
            for p in procs:
                with anyio.move_on_after(60):
                    await p.wait()
                if p.returncode is None:
                    p.kill()
                    await p.wait()
