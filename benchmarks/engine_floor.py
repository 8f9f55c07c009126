"""The engine-shaped floor: the engine's own statements and sessions, with no engine around them.

The same statements from ``queries.sql`` (start, claim instances, fetch messages, append
history, enqueue work, claim work, ack work, update instances, delete messages), the same
batch sizes, the same number of turn sessions and one claim and one ack session (each on its
own asyncpg connection), under the runtime's current capacity rule: a claim asks for
``min(free, claim_batch)`` where ``free`` counts items still *running* (here: none, they
finish at once), and nothing while ``4 * max_inflight`` results wait for their ack.  A few
lines of Python that know the workload's shape stand in for the replay engine.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg

from pgdurable_async._runtime.wakeup import Wakeup
from pgdurable_async._store import Database
from pgdurable_async._store.listener import Listener
from pgdurable_async._store.records import NO_OFFSET
from pgdurable_async._store.sql_loader import q

from .common import (
    FANOUT,
    LEASE_SECONDS,
    MARK,
    NOOP,
    SCHEMA,
    START_CONCURRENCY,
    STEP,
    STEPS,
    WAKE,
    DoneWatcher,
    connect,
    event_counts,
    latency_figures,
    percentile,
    start_all,
    statuses,
    timeout_for,
)
from .costs import Meter

__all__ = ["EngineFloor", "floor_fanout", "floor_workflows", "floor_wake"]


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


class EngineFloor:
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
        self.completed = 0  # acked results (progress)
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
        rows = await conn.fetch(q("claim_work"), self.activities, want, LEASE_SECONDS, self.owner, NO_OFFSET)
        for r in rows:
            self.results.append((r["id"], r["lease_token"], f'{{"task_id":{r["task_id"]},"result":{r["input"]}}}'))
        if rows:
            self.acks_pending.set()
        return len(rows)

    @property
    def free(self) -> int:
        """``ActivityWorker.free``: nothing is still running, so all slots, unless the ack backlog is full."""
        return 0 if len(self.results) >= 4 * self.max_inflight else self.max_inflight

    async def claim_loop(self, conn: asyncpg.Connection) -> None:
        """Like ``Runtime._activity_loop``: claim once a quarter of the capacity is free."""
        threshold = max(1, self.max_inflight // 4)
        while True:
            seen_work, seen_cap = self.work.generation, self.capacity.generation
            free = self.free
            if free < threshold:
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
        await conn.fetch(q("ack_work"), [b[0] for b in batch], [b[1] for b in batch],  # one statement, no BEGIN
                         ["activity_completed"] * len(batch), [b[2] for b in batch], "")
        self.completed += len(batch)
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
) -> AsyncIterator[tuple[EngineFloor, list[asyncpg.Connection]]]:
    """The floor's loops running, each on its own connection; yields it and ``START_CONCURRENCY`` spare ones."""
    conns: list[asyncpg.Connection] = []
    try:
        for _ in range(turn_loops + 2 + START_CONCURRENCY):
            conns.append(await connect(dsn))
        floor = EngineFloor(plan, **floor_args)
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


async def floor_fanout(
    dsn: str, n: int, floor_args: dict[str, Any], turn_loops: int, track: Callable[[Callable[[], int]], None],
    meter: Meter,
) -> dict[str, Any]:
    """The fan-out of ``n``, with its costs per activity (metered once the floor's sessions are open);
    ``track`` is handed a function that counts the acked activities."""
    instance_id = f"fanout-{uuid.uuid4().hex[:8]}"
    async with DoneWatcher(dsn) as done, _running_floor(dsn, floor_args, _fanout_plan(n), turn_loops) as running:
        floor, spare = running
        track(lambda: floor.completed)
        done.expect([instance_id])
        before = await meter.snapshot()
        t0 = time.perf_counter()
        await floor.start(spare[0], FANOUT, instance_id, str(n))
        await done.wait(timeout_for(n))
        elapsed = done.finished[instance_id] - t0
        costs = Meter.costs(before, await meter.snapshot(), n)
    conn = await connect(dsn)
    try:
        events = await event_counts(conn, instance_id)
    finally:
        await conn.close()
    return {
        "fanout_seconds": elapsed,
        "fanout_activities_per_s": n / elapsed,
        "fanout_turns": floor.turns,
        "fanout_ok": events.get("activity_completed") == n,
        **costs,
    }


async def floor_workflows(dsn: str, count: int, floor_args: dict[str, Any], turn_loops: int) -> dict[str, Any]:
    prefix = f"wf-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i}" for i in range(count)]
    started: dict[str, float] = {}
    async with DoneWatcher(dsn) as done, _running_floor(dsn, floor_args, _sequence_plan, turn_loops) as running:
        floor, spare = running

        async def start(index: int, instance_id: str) -> None:
            await floor.start(spare[index], STEPS, instance_id, "0")

        done.expect(ids)
        await start_all(ids, start, started)
        await done.wait(timeout_for(count * 3))
        figures: dict[str, Any] = latency_figures(ids, started, done.finished)
    conn = await connect(dsn)
    try:
        found = await statuses(conn, prefix)
    finally:
        await conn.close()
    figures["workflows_turns"] = floor.turns
    figures["workflows_ok"] = found == {"completed": count}
    return figures


async def floor_wake(dsn: str, samples: int, floor_args: dict[str, Any]) -> dict[str, Any]:
    """Start → NOTIFY → one turn → NOTIFY → claim, with a real LISTEN session between."""
    prefix = f"wake-{uuid.uuid4().hex[:8]}-"
    orch, work = Wakeup(), Wakeup()
    db = Database(dsn, schema=SCHEMA)
    listener = Listener(db, {db.channel("orch"): lambda _: orch.set(), db.channel("work"): lambda _: work.set()})
    await listener.ensure()
    starter, worker = await connect(dsn), await connect(dsn)
    latencies: list[float] = []
    try:
        floor = EngineFloor(_sequence_plan, **floor_args)  # driven by hand, not by its loops
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
        found = await statuses(worker, prefix)
    finally:
        await listener.close()
        for conn in (starter, worker):
            await conn.close()
    return {
        "wake_latency_p50_ms": 1000 * percentile(latencies, 50),
        "wake_latency_p99_ms": 1000 * percentile(latencies, 99),
        "wake_ok": found == {"completed": samples + 1},
    }
