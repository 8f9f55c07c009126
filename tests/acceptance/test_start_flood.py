"""A flood of starts: 20,000 instances from 32 concurrent clients, two worker processes.

Connections: a ``Runtime`` opens a pool of ``min_size=2`` up to
``max_size = min(max_concurrency, 32) + turn_concurrency + 4`` connections (38 with the
defaults, ``max_concurrency=64`` and ``turn_concurrency=2``), plus one LISTEN session, plus
its client's LISTEN session while something waits on ``runtime.client`` (so at most 40).
A ``Client(dsn)`` opens a pool of 1 up to 5 connections, plus one LISTEN session while it
waits (at most 6).  Every one of them has ``application_name = 'pgdurable_async'``.

While the flood runs, a sampler reads ``pg_stat_activity`` (connections per
application_name, and which of them belong to each worker process: their client ports,
matched with the process's sockets in /proc) and each worker's VmRSS.  It requires:

* the connections stay within what the configured pools allow (2 workers x 39 + 32 clients
  x 5 in all; 39 per worker), and are printed;
* each worker's peak RSS stays under 300 MiB, and is printed;
* every instance completes (count by status: 20,000 completed), no queue row is left.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(600)

INSTANCES = int(os.environ.get("PGDURABLE_FLOOD_INSTANCES", "20000"))
CALLERS = 32
WORKERS = 2
WORKER_CONCURRENCY = 64  # the worker CLI's --concurrency (Runtime max_concurrency)
TURN_CONCURRENCY = 2  # Runtime default
RUNTIME_POOL = min(WORKER_CONCURRENCY, 32) + TURN_CONCURRENCY + 4  # runtime.py: Database(max_size=...)
RUNTIME_SESSIONS = RUNTIME_POOL + 1  # and its LISTEN session (nothing waits on the worker's own client)
CLIENT_POOL = 5  # client.py: Database(min_size=1, max_size=5); these clients never wait: no LISTEN session
RSS_LIMIT_MIB = 300
APP_NAME = "pgdurable_async"


@dataclass
class Peaks:
    connections: dict[str, int] = field(default_factory=dict)  # application_name -> peak count
    per_worker: dict[int, int] = field(default_factory=dict)  # worker pid -> peak connections
    rss_kib: dict[int, int] = field(default_factory=dict)  # worker pid -> peak VmRSS
    samples: int = 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (its ends of its PostgreSQL connections)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def _sample(dsn: str, workers: list[WorkerProcess], peaks: Peaks, done: anyio.Event) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "flood-sampler"})
    try:
        while not done.is_set():
            rows = await conn.fetch("SELECT application_name, client_port FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["application_name"]] = counts.get(r["application_name"], 0) + 1
            for name, n in counts.items():
                peaks.connections[name] = max(peaks.connections.get(name, 0), n)
            ports = {r["client_port"] for r in rows if r["application_name"] == APP_NAME}
            for w in workers:
                with_ports = len(ports & _local_ports(w.pid))
                peaks.per_worker[w.pid] = max(peaks.per_worker.get(w.pid, 0), with_ports)
                peaks.rss_kib[w.pid] = max(peaks.rss_kib.get(w.pid, 0), _rss_kib(w.pid))
            peaks.samples += 1
            await anyio.sleep(0.25)
    finally:
        await conn.close()


async def _statuses(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["status"]: r["n"] for r in await conn.fetch(
        "SELECT status, count(*) AS n FROM pgdurable.instances GROUP BY status")}


async def test_a_flood_of_starts_keeps_pools_and_memory_bounded(dsn: str, tmp_path: Path) -> None:
    numbers = itertools.count()
    workers = [WorkerProcess(dsn, "tests.acceptance.flood_app:app", tmp_path / f"worker-{i}.log",
                             "--concurrency", str(WORKER_CONCURRENCY)) for i in range(WORKERS)]
    peaks = Peaks()
    done = anyio.Event()
    conn = await asyncpg.connect(dsn)
    try:
        for w in workers:
            await w.ready()
        started = time.monotonic()

        async def caller(share: int) -> None:
            async with pgd.Client(dsn) as client:
                for _ in range(share):
                    await client.start("tiny", next(numbers))

        async with anyio.create_task_group() as sampling:
            sampling.start_soon(_sample, dsn, workers, peaks, done)
            async with anyio.create_task_group() as callers:
                for i in range(CALLERS):
                    callers.start_soon(caller, INSTANCES // CALLERS + (i < INSTANCES % CALLERS))
            submitted = time.monotonic() - started
            with anyio.fail_after(480):
                while (await _statuses(conn)).get("completed", 0) < INSTANCES:
                    assert all(w.proc.poll() is None for w in workers), "a worker died"
                    await anyio.sleep(0.5)
            finished = time.monotonic() - started
            done.set()

        statuses = await _statuses(conn)
        leftovers = {t: await conn.fetchval(f"SELECT count(*) FROM pgdurable.{t}")
                     for t in ("orchestrator_queue", "work_queue", "timers")}
    finally:
        done.set()
        await conn.close()
        for w in workers:
            await w.stop()

    total_bound = WORKERS * RUNTIME_SESSIONS + CALLERS * CLIENT_POOL
    print(f"\n{INSTANCES} starts from {CALLERS} clients: submitted in {submitted:.1f} s "
          f"({INSTANCES / submitted:.0f}/s), all completed after {finished:.1f} s ({INSTANCES / finished:.0f}/s)")
    print(f"peak connections by application_name: {peaks.connections} "
          f"(bound {total_bound} = {WORKERS} x {RUNTIME_SESSIONS} + {CALLERS} x {CLIENT_POOL}); "
          f"per worker {sorted(peaks.per_worker.values())} (bound {RUNTIME_SESSIONS}); {peaks.samples} samples")
    print(f"peak worker RSS: {[f'{kib / 1024:.0f} MiB' for kib in peaks.rss_kib.values()]} "
          f"(bound {RSS_LIMIT_MIB} MiB)")

    assert statuses == {"completed": INSTANCES}, statuses
    assert leftovers == {"orchestrator_queue": 0, "work_queue": 0, "timers": 0}, leftovers
    assert peaks.samples >= 4
    assert 0 < peaks.connections.get(APP_NAME, 0) <= total_bound
    assert all(0 < n <= RUNTIME_SESSIONS for n in peaks.per_worker.values()), peaks.per_worker
    assert all(kib < RSS_LIMIT_MIB * 1024 for kib in peaks.rss_kib.values()), peaks.rss_kib
