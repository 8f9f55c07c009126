"""Fan-out throughput harness: the engine beside a raw-SQL floor, measured in one run.

``run_bench`` creates two scratch databases on the server named by the DSN (one
for the engine, one for the floor; both dropped afterwards), and measures:

1. **fan-out** — one orchestration awaiting ``ctx.all`` over N trivial activities:
   activities/s from ``client.start`` to the completion NOTIFY, peak RSS, turns,
   replays and cache hits;
2. **workflows** — W concurrent three-step workflows: workflows/s and the p50/p99
   of start→completion per workflow;
3. **wake latency** — from ``client.start`` returning to the first activity's
   body running, on an idle runtime (p50/p99);

and the same database work without the engine (the *floor*): the same statements
from ``queries.sql`` (start, claim instances, fetch messages, append history,
enqueue work, claim work, ack work, update instances, delete messages), with the
same batch sizes and the same number of concurrent turn / claim / ack / start
sessions (each on its own asyncpg connection), driven by a few lines of Python
that know the workload's shape instead of by the replay engine.  The ratio
engine/floor is what survives a noisy machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from pgdurable_async import ActivityContext, App, OrchestrationContext, Runtime
from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._runtime.wakeup import Wakeup
from pgdurable_async._store import Database
from pgdurable_async._store.listener import Listener
from pgdurable_async._store.migrations import migrate
from pgdurable_async._store.records import NO_OFFSET
from pgdurable_async._store.sql_loader import q

__all__ = ["run_bench"]

SCHEMA = "pgdurable"
WAKE_SAMPLES = 50
START_CONCURRENCY = 16  # concurrent client.start calls (engine and floor alike)
_LEASE_SECONDS = 30.0

FANOUT = "bench_fanout"
STEPS = "bench_three_steps"
WAKE = "bench_wake"
NOOP = "bench_noop"
STEP = "bench_step"
MARK = "bench_mark"


# -- the engine's workload ---------------------------------------------------------


@dataclass
class _Probe:
    """Times observed inside activity bodies (wake latency)."""

    seen: dict[str, float] = field(default_factory=dict)
    signal: Wakeup = field(default_factory=Wakeup)

    def mark(self, key: str) -> None:
        self.seen.setdefault(key, time.perf_counter())
        self.signal.set()


def bench_app(probe: _Probe) -> App:
    """A fresh app with the benchmark's orchestrations and trivial activities."""
    app = App()

    @app.activity(name=NOOP)
    async def noop(ctx: ActivityContext, value: int) -> int:
        return value

    @app.activity(name=STEP)
    async def step(ctx: ActivityContext, value: int) -> int:
        return value + 1

    @app.activity(name=MARK)
    async def mark(ctx: ActivityContext, key: str) -> str:
        probe.mark(key)
        return key

    @app.orchestration(name=FANOUT)
    async def fanout(ctx: OrchestrationContext, n: int) -> int:
        results = await ctx.all([ctx.call_activity(noop, i) for i in range(n)])
        return len(results)

    @app.orchestration(name=STEPS)
    async def three_steps(ctx: OrchestrationContext, value: int) -> int:
        for _ in range(3):
            value = await ctx.call_activity(step, value)
        return value

    @app.orchestration(name=WAKE)
    async def wake(ctx: OrchestrationContext, key: str) -> str:
        result: str = await ctx.call_activity(mark, key)
        return result

    return app


# -- helpers ---------------------------------------------------------------------------


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``values`` must not be empty)."""
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]


def _cpu_seconds() -> float:
    """CPU time of this process (user + system): the Python side of whatever ran."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return float("nan")


def _dsn_for(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError("bench needs a URL DSN: postgresql://user@host:port/dbname")
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def _scratch_database(dsn: str, tag: str) -> AsyncIterator[str]:
    """A new, migrated database on ``dsn``'s server, dropped on exit."""
    name = f"pgd_bench_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    target = _dsn_for(dsn, name)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(f"bench creates scratch databases: the DSN's role needs CREATEDB ({exc})") from None
    finally:
        await admin.close()
    try:
        await migrate(target, SCHEMA)
        yield target
    finally:
        with anyio.CancelScope(shield=True):
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA, "application_name": "pgdurable_bench"})


class _DoneWatcher:
    """LISTENs on the completion channel and records when each instance finished."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.finished: dict[str, float] = {}
        self._pending: set[str] = set()
        self._all_done = anyio.Event()
        db = Database(dsn, schema=SCHEMA)
        self._listener = Listener(db, {db.channel("done"): self._on_done})

    async def __aenter__(self) -> _DoneWatcher:
        await self._listener.ensure()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._listener.close()

    def _on_done(self, instance_id: str) -> None:
        self.finished.setdefault(instance_id, time.perf_counter())
        self._pending.discard(instance_id)
        if not self._pending:
            self._all_done.set()

    def expect(self, ids: Sequence[str]) -> None:
        """Call before starting ``ids``; :meth:`wait` returns once all have finished."""
        self._pending = {i for i in ids if i not in self.finished}
        self._all_done = anyio.Event()
        if not self._pending:
            self._all_done.set()

    async def wait(self, timeout: float) -> None:
        with anyio.fail_after(timeout):
            await self._all_done.wait()


async def _statuses(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM instances WHERE instance_id LIKE $1 || '%' GROUP BY status", prefix
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def _event_counts(conn: asyncpg.Connection, instance_id: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT event_type, count(*) AS n FROM history WHERE instance_id = $1 GROUP BY event_type", instance_id
    )
    return {r["event_type"]: int(r["n"]) for r in rows}


def _timeout_for(items: int) -> float:
    return max(120.0, items / 50)


# -- engine measurements ------------------------------------------------------------------


async def _engine_fanout(runtime: Runtime, dsn: str, n: int) -> dict[str, Any]:
    before = dict(runtime.turns.stats)
    rss_before = _current_rss_mb()
    instance_id = f"fanout-{uuid.uuid4().hex[:8]}"
    async with _DoneWatcher(dsn) as done:
        done.expect([instance_id])
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        await runtime.client.start(FANOUT, n, instance_id=instance_id)
        await done.wait(_timeout_for(n))
        elapsed, cpu = done.finished[instance_id] - t0, _cpu_seconds() - cpu0
    stats = {k: v - before[k] for k, v in runtime.turns.stats.items()}
    conn = await _connect(dsn)
    try:
        events = await _event_counts(conn, instance_id)
        output = await conn.fetchval("SELECT output::text FROM instances WHERE instance_id = $1", instance_id)
    finally:
        await conn.close()
    return {
        "fanout_seconds": elapsed,
        "fanout_activities_per_s": n / elapsed,
        "fanout_cpu_us_per_activity": 1e6 * cpu / n,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "fanout_turns": stats["turns"],
        "fanout_replays": stats["replays"],
        "fanout_cache_hits": stats["cache_hits"],
        "fanout_ok": output == str(n)
        and events.get("activity_scheduled") == n
        and events.get("activity_completed") == n
        and events.get("orchestration_completed") == 1,
        "fanout_events": events,
    }


async def _start_all(
    ids: Sequence[str], start: Callable[[int, str], Awaitable[object]], started: dict[str, float]
) -> None:
    """``START_CONCURRENCY`` starters (numbered, so each may own a connection) work through ``ids``."""
    pending = iter(ids)

    async def starter(index: int) -> None:
        for instance_id in pending:
            started[instance_id] = time.perf_counter()
            await start(index, instance_id)

    async with anyio.create_task_group() as tg:
        for index in range(START_CONCURRENCY):
            tg.start_soon(starter, index)


def _latency_figures(ids: Sequence[str], started: dict[str, float], finished: dict[str, float]) -> dict[str, float]:
    latencies = [finished[i] - started[i] for i in ids]
    elapsed = max(finished[i] for i in ids) - min(started[i] for i in ids)
    return {
        "workflows_seconds": elapsed,
        "workflows_per_s": len(ids) / elapsed,
        "workflow_latency_p50_ms": 1000 * _percentile(latencies, 50),
        "workflow_latency_p99_ms": 1000 * _percentile(latencies, 99),
    }


async def _engine_workflows(runtime: Runtime, dsn: str, count: int) -> dict[str, Any]:
    before = dict(runtime.turns.stats)
    prefix = f"wf-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i}" for i in range(count)]
    started: dict[str, float] = {}

    async def start(_index: int, instance_id: str) -> None:
        await runtime.client.start(STEPS, 0, instance_id=instance_id)

    async with _DoneWatcher(dsn) as done:
        done.expect(ids)
        cpu0 = _cpu_seconds()
        await _start_all(ids, start, started)
        await done.wait(_timeout_for(count * 3))
        figures: dict[str, Any] = _latency_figures(ids, started, done.finished)
        figures["workflows_cpu_us_per_workflow"] = 1e6 * (_cpu_seconds() - cpu0) / count
    conn = await _connect(dsn)
    try:
        figures["workflow_statuses"] = await _statuses(conn, prefix)
        wrong = await conn.fetchval(
            "SELECT count(*) FROM instances WHERE instance_id LIKE $1 || '%' AND output <> '3'::jsonb", prefix
        )
    finally:
        await conn.close()
    figures["workflows_ok"] = figures["workflow_statuses"] == {"completed": count} and wrong == 0
    figures.update({f"workflows_{k}": v - before[k] for k, v in runtime.turns.stats.items()})
    return figures


async def _engine_wake(runtime: Runtime, dsn: str, probe: _Probe, samples: int) -> dict[str, Any]:
    latencies: list[float] = []
    prefix = f"wake-{uuid.uuid4().hex[:8]}-"
    async with _DoneWatcher(dsn) as done:
        for i in range(-1, samples):  # -1: a warm-up start (statements get prepared), not measured
            instance_id = f"{prefix}{i}"
            done.expect([instance_id])
            await runtime.client.start(WAKE, instance_id, instance_id=instance_id)
            returned = time.perf_counter()
            with anyio.fail_after(30):
                while instance_id not in probe.seen:
                    await probe.signal.wait(probe.signal.generation)
            if i >= 0:
                latencies.append(probe.seen[instance_id] - returned)
            await done.wait(30)  # idle again before the next start
            await anyio.sleep(0.01)
    conn = await _connect(dsn)
    try:
        statuses = await _statuses(conn, prefix)
    finally:
        await conn.close()
    return {
        "wake_latency_p50_ms": 1000 * _percentile(latencies, 50),
        "wake_latency_p99_ms": 1000 * _percentile(latencies, 99),
        "wake_statuses": statuses,
        "wake_ok": statuses == {"completed": samples + 1},
    }


# -- the raw-SQL floor ---------------------------------------------------------------------

# plan(row, messages) -> (new events [(kind, payload json)], work [(task_id, name, input json)], output json | None)
_Plan = Callable[[Any, list[Any]], tuple[list[tuple[str, str]], list[tuple[int, str, str]], str | None]]


def _fanout_plan(n: int) -> _Plan:
    """One instance: schedule n noops on start; complete once n results are in."""

    def plan(row: Any, msgs: list[Any]) -> tuple[list[tuple[str, str]], list[tuple[int, str, str]], str | None]:
        events: list[tuple[str, str]] = []
        work: list[tuple[int, str, str]] = []
        done = max(0, row["history_len"] - 1 - n)  # started + n scheduled + completions so far
        for m in msgs:
            if m["kind"] == "orchestration_started":
                events.append(("orchestration_started", m["payload"]))
                for i in range(n):
                    events.append(("activity_scheduled", f'{{"task_id":{i + 1},"name":"{NOOP}","input":{i}}}'))
                    work.append((i + 1, NOOP, str(i)))
            else:
                events.append((m["kind"], m["payload"]))
                done += 1
        if done == n:
            events.append(("orchestration_completed", f'{{"output":{n}}}'))
            return events, work, str(n)
        return events, work, None

    return plan


def _sequence_plan(row: Any, msgs: list[Any]) -> tuple[list[tuple[str, str]], list[tuple[int, str, str]], str | None]:
    """Sequential steps (three ``bench_step`` or one ``bench_mark``): two events per step, then the completion."""
    steps, activity = (1, MARK) if row["name"] == WAKE else (3, STEP)
    events: list[tuple[str, str]] = []
    work: list[tuple[int, str, str]] = []
    output: str | None = None
    for m in msgs:
        events.append((m["kind"], m["payload"]))
        done = 0 if m["kind"] == "orchestration_started" else (row["history_len"] + len(events)) // 2
        if done < steps:
            task_id = done + 1
            value = f'"{row["instance_id"]}"' if activity == MARK else str(done)
            events.append(("activity_scheduled", f'{{"task_id":{task_id},"name":"{activity}","input":{value}}}'))
            work.append((task_id, activity, value))
        else:
            output = f'"{row["instance_id"]}"' if activity == MARK else str(steps)
    if output is not None:
        events.append(("orchestration_completed", f'{{"output":{output}}}'))
    return events, work, output


class _Floor:
    """The engine's database work with no engine: same statements, batches and sessions."""

    def __init__(
        self,
        plan: _Plan,
        *,
        orchestrations: list[str],
        activities: list[str],
        turn_batch: int,
        claim_batch: int,
        max_inflight: int,
    ) -> None:
        self.plan = plan
        self.orchestrations = orchestrations
        self.activities = activities
        self.turn_batch = turn_batch
        self.claim_batch = claim_batch
        self.max_inflight = max_inflight
        self.owner = f"floor:{os.getpid()}"
        self.orch = Wakeup()
        self.work = Wakeup()
        self.capacity = Wakeup()
        self.acks_pending = Wakeup()
        self.inflight = 0
        self.results: list[tuple[int, uuid.UUID, str]] = []
        self.turns = 0

    async def start(self, conn: asyncpg.Connection, orchestration: str, instance_id: str, input_json: str) -> None:
        """``client.start``'s statement (the NOTIFY a runtime would get becomes a local wake-up)."""
        await conn.fetchval(q("api_start"), instance_id, orchestration, input_json)
        self.orch.set()

    async def turn_batch_once(self, conn: asyncpg.Connection) -> int:
        """One transaction: claim instances, read messages, append, enqueue, update, delete."""
        async with conn.transaction():
            rows = await conn.fetch(  # $4: quarantined instances (none here); $5: clock offset (none)
                q("claim_instances"), self.orchestrations, self.turn_batch, self.turn_batch * 4, [], NO_OFFSET
            )
            if not rows:
                return 0
            inbox: dict[str, list[Any]] = defaultdict(list)
            for m in await conn.fetch(q("fetch_messages"), [r["instance_id"] for r in rows]):
                inbox[m["instance_id"]].append(m)
            now = datetime.now(UTC)
            history: list[tuple[str, int, int, str, str, datetime]] = []
            work: list[tuple[str, int, int, str, str, str, str | None]] = []
            updates: list[tuple[str, str, str | None, None, bool, None, int, int, None, None]] = []
            consumed: list[int] = []
            finished: list[str] = []
            for row in rows:
                iid, exe, msgs = row["instance_id"], row["execution_id"], inbox.get(row["instance_id"], [])
                consumed.extend(m["id"] for m in msgs)
                if not msgs or row["status"] not in ("pending", "running"):
                    continue
                events, items, output = self.plan(row, msgs)
                seq = row["history_len"]
                for kind, payload in events:
                    seq += 1
                    history.append((iid, exe, seq, kind, payload, now))
                work.extend((iid, exe, task_id, row["name"], name, inp, None) for task_id, name, inp in items)
                if output is not None:
                    finished.append(iid)
                updates.append((iid, "running" if output is None else "completed", output, None, False, None, exe,
                                seq, None, None))
            if history:
                await conn.execute(q("append_history"), *_columns(history, 6))
            if work:
                await conn.execute(q("enqueue_work"), *_columns(work, 7))
            if finished:
                await conn.execute(q("drop_pending_work"), finished)
            if updates:
                await conn.execute(q("update_instances"), *_columns(updates, 10))
            if consumed:
                await conn.execute(q("delete_messages"), consumed)
            self.turns += len(updates)
            return len(rows)

    async def turn_loop(self, conn: asyncpg.Connection) -> None:
        """Like ``Runtime._turn_loop``: batches until none is found, then wait for messages."""
        while True:
            seen = self.orch.generation
            progressed = await self.turn_batch_once(conn)
            if progressed:
                self.work.set()
                continue
            await self.orch.wait(seen)

    async def claim_once(self, conn: asyncpg.Connection, want: int) -> int:
        """Lease up to ``want`` items and "run" them at once (the result echoes the input)."""
        rows = await conn.fetch(q("claim_work"), self.activities, want, _LEASE_SECONDS, self.owner, NO_OFFSET)
        self.inflight += len(rows)
        for r in rows:
            self.results.append((r["id"], r["lease_token"], f'{{"task_id":{r["task_id"]},"result":{r["input"]}}}'))
        if rows:
            self.acks_pending.set()
        return len(rows)

    async def claim_loop(self, conn: asyncpg.Connection) -> None:
        """Like ``Runtime._activity_loop``: claim once a quarter of the capacity is free."""
        threshold = max(1, self.max_inflight // 4)
        while True:
            seen_work, seen_cap = self.work.generation, self.capacity.generation
            free = self.max_inflight - self.inflight
            if free < threshold and self.inflight:
                await self.capacity.wait(seen_cap)
                continue
            want = min(free, self.claim_batch)
            got = await self.claim_once(conn, want)
            if got < want:
                await self.work.wait(seen_work)

    async def ack_once(self, conn: asyncpg.Connection) -> int:
        """Ack every buffered result in one transaction (``ack_work``), as ``ActivityWorker.flush``."""
        batch, self.results = self.results, []
        if not batch:
            return 0
        async with conn.transaction():
            await conn.fetch(q("ack_work"), [b[0] for b in batch], [b[1] for b in batch],
                             ["activity_completed"] * len(batch), [b[2] for b in batch])
        self.inflight -= len(batch)
        self.capacity.set()
        self.orch.set()
        return len(batch)

    async def ack_loop(self, conn: asyncpg.Connection) -> None:
        """Like ``Runtime._ack_loop``."""
        while True:
            seen = self.acks_pending.generation
            acked = await self.ack_once(conn)
            if not acked:
                await self.acks_pending.wait(seen)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


@contextlib.asynccontextmanager
async def _running_floor(
    dsn: str, floor_args: dict[str, Any], plan: _Plan, turn_loops: int
) -> AsyncIterator[tuple[_Floor, list[asyncpg.Connection]]]:
    """The floor's loops running, each on its own connection; yields it and ``START_CONCURRENCY`` spare ones."""
    conns: list[asyncpg.Connection] = []
    try:
        for _ in range(turn_loops + 2 + START_CONCURRENCY):
            conns.append(await _connect(dsn))
        floor = _Floor(plan, **floor_args)
        async with anyio.create_task_group() as tg:
            for conn in conns[:turn_loops]:
                tg.start_soon(floor.turn_loop, conn)
            tg.start_soon(floor.claim_loop, conns[turn_loops])
            tg.start_soon(floor.ack_loop, conns[turn_loops + 1])
            yield floor, conns[turn_loops + 2:]
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for conn in conns:
                await conn.close()


async def _floor_fanout(dsn: str, n: int, floor_args: dict[str, Any], turn_loops: int) -> dict[str, Any]:
    instance_id = f"fanout-{uuid.uuid4().hex[:8]}"
    async with _DoneWatcher(dsn) as done, _running_floor(dsn, floor_args, _fanout_plan(n), turn_loops) as running:
        floor, spare = running
        done.expect([instance_id])
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        await floor.start(spare[0], FANOUT, instance_id, str(n))
        await done.wait(_timeout_for(n))
        elapsed, cpu = done.finished[instance_id] - t0, _cpu_seconds() - cpu0
    conn = await _connect(dsn)
    try:
        events = await _event_counts(conn, instance_id)
    finally:
        await conn.close()
    return {
        "fanout_seconds": elapsed,
        "fanout_activities_per_s": n / elapsed,
        "fanout_cpu_us_per_activity": 1e6 * cpu / n,
        "fanout_turns": floor.turns,
        "fanout_ok": events.get("activity_completed") == n,
    }


async def _floor_workflows(dsn: str, count: int, floor_args: dict[str, Any], turn_loops: int) -> dict[str, Any]:
    prefix = f"wf-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i}" for i in range(count)]
    started: dict[str, float] = {}
    async with _DoneWatcher(dsn) as done, _running_floor(dsn, floor_args, _sequence_plan, turn_loops) as running:
        floor, spare = running

        async def start(index: int, instance_id: str) -> None:
            await floor.start(spare[index], STEPS, instance_id, "0")

        done.expect(ids)
        cpu0 = _cpu_seconds()
        await _start_all(ids, start, started)
        await done.wait(_timeout_for(count * 3))
        figures: dict[str, Any] = _latency_figures(ids, started, done.finished)
        figures["workflows_cpu_us_per_workflow"] = 1e6 * (_cpu_seconds() - cpu0) / count
    conn = await _connect(dsn)
    try:
        statuses = await _statuses(conn, prefix)
    finally:
        await conn.close()
    figures["workflows_turns"] = floor.turns
    figures["workflows_ok"] = statuses == {"completed": count}
    return figures


async def _floor_wake(dsn: str, samples: int, floor_args: dict[str, Any]) -> dict[str, Any]:
    """Start → NOTIFY → one turn → NOTIFY → claim, with a real LISTEN session between."""
    prefix = f"wake-{uuid.uuid4().hex[:8]}-"
    orch, work = Wakeup(), Wakeup()
    db = Database(dsn, schema=SCHEMA)
    listener = Listener(db, {db.channel("orch"): lambda _: orch.set(), db.channel("work"): lambda _: work.set()})
    await listener.ensure()
    starter, worker = await _connect(dsn), await _connect(dsn)
    latencies: list[float] = []
    try:
        floor = _Floor(_sequence_plan, **floor_args)  # driven by hand, not by its loops
        for i in range(-1, samples):  # -1: a warm-up start, not measured
            instance_id = f"{prefix}{i}"
            seen_orch, seen_work = orch.generation, work.generation
            await starter.fetchval(q("api_start"), instance_id, WAKE, f'"{instance_id}"')
            returned = time.perf_counter()
            with anyio.fail_after(30):
                await orch.wait(seen_orch)
                await floor.turn_batch_once(worker)
                await work.wait(seen_work)
                if not await floor.claim_once(worker, floor.claim_batch):
                    raise RuntimeError("floor: a work NOTIFY arrived but nothing could be claimed")
            if i >= 0:
                latencies.append(time.perf_counter() - returned)
            await floor.ack_once(worker)
            await floor.turn_batch_once(worker)  # complete the instance
            await anyio.sleep(0.01)
        statuses = await _statuses(worker, prefix)
    finally:
        await listener.close()
        for conn in (starter, worker):
            await conn.close()
    return {
        "wake_latency_p50_ms": 1000 * _percentile(latencies, 50),
        "wake_latency_p99_ms": 1000 * _percentile(latencies, 99),
        "wake_ok": statuses == {"completed": samples + 1},
    }


# -- report --------------------------------------------------------------------------------

_ROWS: list[tuple[str, str, str, bool]] = [
    # key, label, format, compared with the floor
    ("fanout_activities_per_s", "fan-out throughput (activities/s)", "{:,.0f}", True),
    ("fanout_seconds", "fan-out wall time (s)", "{:.2f}", True),
    ("fanout_cpu_us_per_activity", "fan-out Python CPU per activity (us)", "{:,.0f}", True),
    ("workflows_per_s", "3-step workflows (workflows/s)", "{:,.0f}", True),
    ("workflow_latency_p50_ms", "workflow start->done p50 (ms)", "{:,.1f}", True),
    ("workflow_latency_p99_ms", "workflow start->done p99 (ms)", "{:,.1f}", True),
    ("workflows_cpu_us_per_workflow", "Python CPU per workflow (us)", "{:,.0f}", True),
    ("wake_latency_p50_ms", "wake start->activity p50 (ms)", "{:.2f}", True),
    ("wake_latency_p99_ms", "wake start->activity p99 (ms)", "{:.2f}", True),
    ("fanout_turns", "fan-out turns", "{:,}", False),
    ("fanout_replays", "fan-out replays", "{:,}", False),
    ("fanout_cache_hits", "fan-out cache hits", "{:,}", False),
    ("workflows_turns", "workflow turns", "{:,}", False),
    ("rss_before_mb", "RSS before fan-out (MB)", "{:,.0f}", False),
    ("peak_rss_mb", "peak RSS after fan-out (MB)", "{:,.0f}", False),
]


def _ratios(engine: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for key, _label, _fmt, compared in _ROWS:
        e, f = engine.get(key), floor.get(key)
        if compared and isinstance(e, (int, float)) and isinstance(f, (int, float)) and f:
            found[key] = e / f
    return found


def _table(report: dict[str, Any]) -> str:
    """Metric, engine, floor, engine/floor (%): throughput ratios want to be high, latency ratios low."""
    engine, floor, ratio = report["engine"], report["floor"], report["ratio"]
    lines: list[tuple[str, ...]] = [("metric", "engine", "floor", "engine/floor")]
    for key, label, fmt, _compared in _ROWS:
        if key not in engine and key not in floor:
            continue
        cells = [fmt.format(side[key]) if key in side else "-" for side in (engine, floor)]
        lines.append((label, *cells, f"{100 * ratio[key]:.0f} %" if key in ratio else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- entry point --------------------------------------------------------------------------


async def run_bench(
    dsn: str, *, fanout: int = 10000, workflows: int = 1000, concurrency: int = 256, out: TextIO
) -> dict[str, Any]:
    """Measure the engine and the raw-SQL floor side by side; print a table to ``out``.

    Works in two scratch databases created on ``dsn``'s server (its role needs
    CREATEDB) and dropped afterwards.  Returns every figure: ``engine``, ``floor``,
    ``ratio`` (engine/floor), ``params``, ``machine`` and ``ok`` (every instance
    of every phase completed with the expected result and history).
    """
    if fanout < 1 or workflows < 1 or concurrency < 1:
        raise ConfigurationError("fanout, workflows and concurrency must be >= 1")

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    probe = _Probe()
    app = bench_app(probe)
    engine: dict[str, Any] = {}
    floor: dict[str, Any] = {}
    async with _scratch_database(dsn, "engine") as engine_dsn, _scratch_database(dsn, "floor") as floor_dsn:
        admin = await _connect(engine_dsn)
        try:
            server_version = await admin.fetchval("SHOW server_version")
        finally:
            await admin.close()
        say(f"pgdurable_async bench: fanout={fanout} workflows={workflows} concurrency={concurrency} "
            f"(PostgreSQL {server_version}, {os.cpu_count()} CPUs)")
        async with Runtime(app, engine_dsn, max_concurrency=concurrency) as runtime:
            floor_args = {
                "orchestrations": sorted(app.orchestrations),
                "activities": sorted(app.activities),
                "turn_batch": runtime.turns.batch_size,
                "claim_batch": min(concurrency, runtime.activities.claim_batch),
                "max_inflight": concurrency,
            }
            turn_loops = runtime.turn_concurrency

            say(f"  engine fan-out of {fanout} ...")
            engine.update(await _engine_fanout(runtime, engine_dsn, fanout))
            say(f"    {engine['fanout_activities_per_s']:,.0f} activities/s")
            say(f"  floor  fan-out of {fanout} ...")
            floor.update(await _floor_fanout(floor_dsn, fanout, floor_args, turn_loops))
            say(f"    {floor['fanout_activities_per_s']:,.0f} activities/s")

            say(f"  engine {workflows} three-step workflows ...")
            engine.update(await _engine_workflows(runtime, engine_dsn, workflows))
            say(f"    {engine['workflows_per_s']:,.0f} workflows/s")
            say(f"  floor  {workflows} three-step workflows ...")
            floor.update(await _floor_workflows(floor_dsn, workflows, floor_args, turn_loops))
            say(f"    {floor['workflows_per_s']:,.0f} workflows/s")

            say(f"  engine wake latency ({WAKE_SAMPLES} starts) ...")
            engine.update(await _engine_wake(runtime, engine_dsn, probe, WAKE_SAMPLES))
            say(f"  floor  wake latency ({WAKE_SAMPLES} starts) ...")
            floor.update(await _floor_wake(floor_dsn, WAKE_SAMPLES, floor_args))
            engine["activity_stats"] = dict(runtime.activities.stats)

    report: dict[str, Any] = {
        "params": {"fanout": fanout, "workflows": workflows, "concurrency": concurrency,
                   "wake_samples": WAKE_SAMPLES, "start_concurrency": START_CONCURRENCY},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "postgres": server_version},
        "engine": engine,
        "floor": floor,
        "ratio": _ratios(engine, floor),
    }
    report["ok"] = all(side[k] for side in (engine, floor) for k in ("fanout_ok", "workflows_ok", "wake_ok"))
    say("")
    say(_table(report))
    say("")
    say("all instances completed" if report["ok"] else "SOME INSTANCES DID NOT COMPLETE AS EXPECTED")
    return report
