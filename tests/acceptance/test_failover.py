"""Failover: the primary is SIGKILLed mid-fan-out, its synchronous standby is promoted.

Two local PostgreSQL clusters (tests/replication.py): a primary whose commits wait
for a standby, and that standby.  Two real worker processes and this test's client
use one DSN naming both hosts with ``target_session_attrs=read-write``.  While a
fan-out runs and small workflows keep being started and signalled, every server
process of the primary is SIGKILLed and the standby promoted.  Then: every instance
finishes with the right output, each activity is scheduled and completed exactly
once in history, each transactional effect row exists exactly once, and every write
the client saw acknowledged (instance starts, raised events, rows of a ledger
table written straight through asyncpg) is on the new primary.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store.cluster import find_pg_bindir
from pgdurable_async._store.migrations import migrate
from tests.acceptance.failover_app import RECORD_EVERY, fanout_output
from tests.replication import ReplicatedPair
from tests.workers import WorkerProcess


def _missing_binaries() -> str | None:
    try:
        bindir = find_pg_bindir()
    except ConfigurationError as exc:
        return str(exc)
    missing = [name for name in ("postgres", "pg_basebackup") if not (bindir / name).is_file()]
    return f"no {', '.join(missing)} in {bindir}" if missing else None


_MISSING = _missing_binaries()
pytestmark = [
    pytest.mark.timeout(100),
    pytest.mark.skipif(_MISSING is not None, reason=f"needs the PostgreSQL server binaries: {_MISSING}"),
]

FANOUT = 400  # tasks of the fan-out; every RECORD_EVERY-th one writes an effect row
KILL_AT = FANOUT // 3  # completions of the fan-out seen before the primary is killed
WORKERS = 2


@pytest.fixture
def leftovers() -> Iterator[contextlib.ExitStack]:
    """Cleanups that run even when the test is cut short (a timeout abandons its coroutine)."""
    with contextlib.ExitStack() as stack:
        yield stack


async def test_failover_to_synchronous_standby(tmp_path: Path, leftovers: contextlib.ExitStack,
                                               record_property: Callable[[str, object], None]) -> None:
    pair = ReplicatedPair(synchronous=True, log_dir=tmp_path)
    leftovers.callback(pair.stop)
    async with pair:
        dsn = pair.dsn
        await migrate(dsn)
        await _execute(dsn, "CREATE TABLE public.effects (key text NOT NULL, activity_id text NOT NULL)",
                       "CREATE TABLE public.ledger (n int PRIMARY KEY)")
        workers = [WorkerProcess(dsn, "tests.acceptance.failover_app:app", tmp_path / f"worker-{i}.log",
                                 "--concurrency", "16") for i in range(WORKERS)]
        for worker in workers:
            leftovers.callback(worker.close)
        try:
            for worker in workers:
                await worker.ready()
            timings = await _run_through_failover(pair, dsn)
            for worker in workers:
                assert worker.proc.poll() is None, f"a worker died in the failover:\n{worker.log()}"
        except BaseException:
            print(f"worker and server logs: {tmp_path}")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for worker in workers:
                        tg.start_soon(worker.stop, 15)
        await _check_new_primary(pair.standby.dsn, timings)
    line = (f"failover: kill -> promoted {timings['promoted']:.2f} s, -> first turn committed on the new primary "
            f"{timings['first_turn']:.2f} s, -> fan-out finished {timings['fanout_done']:.2f} s, -> all "
            f"{timings['instances_at_kill']} instances started before the kill finished {timings['all_done']:.2f} s "
            f"(client saw the fan-out finish {timings['fanout_seen']:.2f} s after the kill); all "
            f"{len(timings['ledger'])} acknowledged ledger commits ({timings['ledger_before_kill']} before the kill) "
            f"and {len(timings['started'])} acknowledged starts are on the new primary")
    print(line)
    record_property("failover", line)


async def _run_through_failover(pair: ReplicatedPair, dsn: str) -> dict[str, Any]:
    """Start the work, kill the primary mid-fan-out, promote the standby, wait for everything."""
    timings: dict[str, Any] = {}
    started: dict[str, int] = {}  # instance id -> k, for each start the client saw acknowledged
    signalled: set[str] = set()  # instances whose "go" event the client saw acknowledged
    ledger: list[int] = []  # ledger rows whose INSERT the client saw acknowledged
    stop_traffic = anyio.Event()
    killed = anyio.Event()

    async with pgd.Client(dsn) as client:
        fan = await client.start("fanout", FANOUT, instance_id="fanout")

        async def traffic() -> None:  # small workflows, started and signalled all through the failover
            for k in itertools.count():
                if stop_traffic.is_set():
                    return
                handle = await client.start("small", k)
                started[handle.instance_id] = k
                await handle.raise_event("go", k, idempotency_key=f"go-{handle.instance_id}")
                signalled.add(handle.instance_id)
                await anyio.sleep(0.03)

        async def wait_fanout() -> None:  # a client waiting across the failover
            assert await fan.result(timeout=80) == fanout_output(FANOUT)
            timings["fanout_seen"] = time.monotonic() - timings["kill_monotonic"]

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            tg.start_soon(_write_ledger, dsn, ledger, stop_traffic, killed, timings)
            tg.start_soon(wait_fanout)
            await _wait_for_completions(pair.primary.dsn, "fanout", KILL_AT)

            timings["kill_wall"] = time.time()
            timings["kill_monotonic"] = t0 = time.monotonic()
            await anyio.to_thread.run_sync(pair.primary.kill)
            killed.set()
            await anyio.to_thread.run_sync(pair.standby.promote)
            timings["promoted"] = time.monotonic() - t0
            timings["first_turn"] = await _first_turn_after(pair.standby.dsn, timings["kill_wall"]) - t0
            await anyio.sleep(1.5)  # keep starting and signalling on the new primary for a while
            stop_traffic.set()

        assert len(started) >= 10 and signalled == set(started)
        outputs = await _results(client, list(started))
        for instance_id, k in started.items():
            assert outputs[instance_id] == {"k": k, "sq": k * k, "go": k, "key": f"{instance_id}/0"}
    timings.update(started=started, ledger=ledger)
    return timings


async def _write_ledger(dsn: str, acked: list[int], stop: anyio.Event, killed: anyio.Event,
                        timings: dict[str, Any]) -> None:
    """INSERT numbered rows one by one (autocommit) and note each one the server acknowledged."""
    conn: asyncpg.Connection | None = None
    try:
        for n in itertools.count():
            if stop.is_set():
                return
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn, timeout=5)
                await conn.execute("INSERT INTO public.ledger (n) VALUES ($1)", n)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError):
                if conn is not None:
                    conn.terminate()  # a dying server may leave its protocol state unusable
                conn = None
                await anyio.sleep(0.02)  # the outcome of row n is unknown: it may or may not be there
                continue
            acked.append(n)
            if not killed.is_set():
                timings["ledger_before_kill"] = len(acked)
            await anyio.sleep(0.005)
    finally:
        if conn is not None:
            conn.terminate()


async def _wait_for_completions(primary_dsn: str, instance_id: str, count: int) -> None:
    conn = await asyncpg.connect(primary_dsn)
    try:
        with anyio.fail_after(40):
            while await conn.fetchval(
                "SELECT count(*) FROM pgdurable.history WHERE instance_id = $1 AND event_type = 'activity_completed'",
                instance_id,
            ) < count:
                await anyio.sleep(0.01)
    finally:
        await conn.close()


async def _first_turn_after(new_primary_dsn: str, wall: float) -> float:
    """The monotonic time at which a history row written after ``wall`` is first seen on the new primary."""
    conn = await asyncpg.connect(new_primary_dsn)
    try:
        with anyio.fail_after(40):
            while not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgdurable.history WHERE recorded_at > to_timestamp($1))", wall
            ):
                await anyio.sleep(0.005)
        return time.monotonic()
    finally:
        await conn.close()


async def _results(client: pgd.Client, ids: list[str]) -> dict[str, Any]:
    outputs: dict[str, Any] = {}

    async def one(instance_id: str) -> None:
        outputs[instance_id] = await client.wait(instance_id, timeout=60)

    async with anyio.create_task_group() as tg:
        for instance_id in ids:
            tg.start_soon(one, instance_id)
    return outputs


async def _check_new_primary(dsn: str, timings: dict[str, Any]) -> None:
    started: dict[str, int] = timings["started"]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False

        # Every write the client saw acknowledged, before or after the kill, is here.
        present = {r["n"] for r in await conn.fetch("SELECT n FROM public.ledger")}
        assert 0 < timings["ledger_before_kill"] < len(timings["ledger"])  # written on both primaries
        assert set(timings["ledger"]) <= present, "an acknowledged commit was lost in the failover"
        instances = {r["instance_id"] for r in await conn.fetch("SELECT instance_id FROM pgdurable.instances")}
        assert set(started) <= instances

        # Exactly once: one activity_scheduled and one activity_completed per task, nothing failed.
        ids = ["fanout", *started]
        rows = await conn.fetch(
            "SELECT instance_id, seq, event_type, payload->>'task_id' AS task FROM pgdurable.history"
            " WHERE instance_id = ANY($1) ORDER BY instance_id, seq", ids)
        by_instance: dict[str, list[asyncpg.Record]] = {}
        for r in rows:
            by_instance.setdefault(r["instance_id"], []).append(r)
        for instance_id in ids:
            events = by_instance[instance_id]
            assert [r["seq"] for r in events] == list(range(1, len(events) + 1)), f"{instance_id}: seq gaps"
            kinds = Counter(r["event_type"] for r in events)
            tasks = 2 if instance_id != "fanout" else FANOUT
            assert kinds["activity_scheduled"] == kinds["activity_completed"] == tasks, (instance_id, kinds)
            assert kinds["activity_failed"] == 0 and kinds["orchestration_completed"] == 1, (instance_id, kinds)
            for kind in ("activity_scheduled", "activity_completed"):
                per_task = Counter(r["task"] for r in events if r["event_type"] == kind)
                assert len(per_task) == tasks and set(per_task.values()) == {1}, (instance_id, kind)

        # Transactional effects: each exactly once, none stray.
        effects = await conn.fetch("SELECT key, count(*) AS n FROM public.effects GROUP BY key")
        expected = {f"fanout/{i}" for i in range(0, FANOUT, RECORD_EVERY)} | {f"{i}/0" for i in started}
        assert {r["key"] for r in effects} == expected
        assert all(r["n"] == 1 for r in effects), "a transactional activity was applied twice"

        for table in ("work_queue", "timers", "orchestrator_queue"):
            assert await conn.fetchval(f"SELECT count(*) FROM pgdurable.{table}") == 0, f"stranded rows in {table}"

        # The fan-out really was cut in two by the failover, and when things finished.
        wall = timings["kill_wall"]
        assert await conn.fetchval(
            "SELECT count(*) FROM pgdurable.history WHERE instance_id = 'fanout' AND event_type = 'activity_completed'"
            " AND recorded_at > to_timestamp($1)", wall) > 0
        timings["fanout_done"] = await conn.fetchval(
            "SELECT extract(epoch FROM updated_at)::float8 - $1::float8 FROM pgdurable.instances"
            " WHERE instance_id = 'fanout'", wall)
        at_kill = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(updated_at))::float8 - $1::float8 AS done"
            " FROM pgdurable.instances WHERE created_at < to_timestamp($1)", wall)
        timings["instances_at_kill"], timings["all_done"] = at_kill["n"], at_kill["done"]
    finally:
        await conn.close()


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
