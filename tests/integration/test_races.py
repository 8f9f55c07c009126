"""Concurrency races inside one database.

Duplicate starts from several clients, events racing completion and continue_as_new,
cancel racing a timer, and an idle worker waiting on another's locked work item.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

pytestmark = pytest.mark.timeout(60)

app = pgd.App()


@app.activity
async def quick(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.transaction
async def count_start(ctx: pgd.TransactionContext, instance_id: str) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO public.starts (instance_id) VALUES ($1)", instance_id)


@app.transaction
async def long_tx(ctx: pgd.TransactionContext, seconds: float) -> float:
    """Holds its work item's row lock for ``seconds``."""
    await anyio.sleep(seconds)
    return seconds


@app.orchestration
async def hold(ctx: pgd.OrchestrationContext, seconds: float) -> float:
    return float(await ctx.call_activity(long_tx, seconds))


@app.orchestration
async def once(ctx: pgd.OrchestrationContext, tag: str) -> str:
    await ctx.call_activity(count_start, ctx.instance_id)
    return tag


@app.orchestration
async def collect(ctx: pgd.OrchestrationContext, n: int) -> list[Any]:
    """Completes on its own after ``n`` events, however many more are raised."""
    return [await ctx.wait_for_event("tick") for _ in range(n)]


@app.orchestration
async def busy(ctx: pgd.OrchestrationContext, n: int) -> int:
    """Completes on its own; never waits for an event."""
    value = 0
    for _ in range(n):
        value = await ctx.call_activity(quick, value)
    return value


@app.orchestration
async def relay(ctx: pgd.OrchestrationContext, state: dict[str, Any]) -> dict[str, Any]:
    """One event per execution, then continue_as_new: events must survive the hand-over."""
    got = await ctx.wait_for_event("inc")
    seen = [*state["seen"], got]
    if len(seen) == state["until"]:
        return {"seen": seen, "execution": ctx.execution_id}
    ctx.continue_as_new({"seen": seen, "until": state["until"]})


@app.orchestration
async def nap(ctx: pgd.OrchestrationContext, seconds: float) -> str:
    await ctx.sleep(seconds)
    return "woke"


@app.orchestration
async def nap_then_work(ctx: pgd.OrchestrationContext, seconds: float) -> int:
    await ctx.sleep(seconds)
    return int(await ctx.call_activity(quick, 1))


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def _kinds(dsn: str, instance_id: str) -> list[str]:
    """Event kinds of every execution of ``instance_id``, checking seq has no gaps."""
    rows = await _fetch(
        dsn,
        "SELECT execution_id, seq, event_type FROM pgdurable.history WHERE instance_id = $1"
        " ORDER BY execution_id, seq",
        instance_id,
    )
    by_execution: dict[int, list[int]] = {}
    for r in rows:
        by_execution.setdefault(r["execution_id"], []).append(r["seq"])
    for seqs in by_execution.values():
        assert seqs == list(range(1, len(seqs) + 1)), f"seq gaps in {instance_id}: {seqs}"
    return [r["event_type"] for r in rows]


async def _queued(dsn: str, instance_id: str) -> int:
    rows = await _fetch(
        dsn,
        "SELECT (SELECT count(*) FROM pgdurable.orchestrator_queue WHERE instance_id = $1)"
        " + (SELECT count(*) FROM pgdurable.work_queue WHERE instance_id = $1)"
        " + (SELECT count(*) FROM pgdurable.timers WHERE instance_id = $1) AS n",
        instance_id,
    )
    return int(rows[0]["n"])


async def _drained(dsn: str, instance_id: str, timeout: float = 10) -> None:
    """Messages that raced a completion are consumed (dropped) by the next turn."""
    with anyio.fail_after(timeout):
        while await _queued(dsn, instance_id):
            await anyio.sleep(0.05)


async def test_clients_racing_to_start_the_same_id(dsn: str) -> None:
    """Of several clients starting one id at the same moment, exactly one wins; it starts once."""
    await _fetch(dsn, "CREATE TABLE public.starts (instance_id text NOT NULL)")
    ids = [f"dup-{i}" for i in range(12)]
    outcomes: Counter[tuple[str, str]] = Counter()
    async with pgd.Runtime(app, dsn) as runtime:
        clients = [pgd.Client(dsn) for _ in range(3)]
        try:
            for client in clients:
                await client.list(limit=1)  # connect now: the race is on the INSERT, not on connecting

            async def start(client: pgd.Client, tag: str, instance_id: str, go: anyio.Event) -> None:
                await go.wait()
                try:
                    await client.start(once, tag, instance_id=instance_id)
                    outcomes[(instance_id, "won")] += 1
                except pgd.InstanceAlreadyExists as exc:
                    assert exc.instance_id == instance_id
                    outcomes[(instance_id, "lost")] += 1

            go = anyio.Event()
            async with anyio.create_task_group() as tg:
                for instance_id in ids:
                    for n, client in enumerate(clients):
                        tg.start_soon(start, client, f"client-{n}", instance_id, go)
                await anyio.sleep(0.05)
                go.set()
        finally:
            for client in clients:
                await client.close()
        for instance_id in ids:
            assert outcomes[(instance_id, "won")] == 1 and outcomes[(instance_id, "lost")] == 2
            assert (await runtime.client.wait(instance_id, timeout=30)).startswith("client-")

    rows = await _fetch(dsn, "SELECT instance_id FROM pgdurable.instances ORDER BY instance_id")
    assert sorted(r["instance_id"] for r in rows) == sorted(ids)
    starts = Counter(r["instance_id"] for r in await _fetch(dsn, "SELECT instance_id FROM public.starts"))
    assert starts == Counter({i: 1 for i in ids}), "each instance ran exactly once"
    for instance_id in ids:
        kinds = await _kinds(dsn, instance_id)
        assert kinds.count("orchestration_started") == 1 and kinds[-1] == "orchestration_completed"


async def test_raise_event_racing_completion(dsn: str) -> None:
    """Events raised while the instance completes never fail; the output matches the recorded events."""
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await client.start(collect, 10, instance_id="collector")
        await client.start(busy, 5, instance_id="busy")

        async def raiser(k: int) -> None:
            for j in range(15):
                await client.raise_event("collector", "tick", f"{k}-{j}")
                await client.raise_event("busy", "nobody-waits", [k, j])

        async with anyio.create_task_group() as tg:
            for k in range(3):
                tg.start_soon(raiser, k)
        output = await client.wait("collector", timeout=30)
        assert await client.wait("busy", timeout=30) == 5

        history = await client.history("collector")
        received = [e.data["data"] for e in history if e.kind == "event_received"]
        assert 10 <= len(received) <= 45 and len(set(received)) == len(received)
        assert output == received[:10], "the output is the first ten events the history records"
        assert [e.kind for e in history][-1] == "orchestration_completed"
        busy_kinds = await _kinds(dsn, "busy")
        assert busy_kinds[-1] == "orchestration_completed" and busy_kinds.count("orchestration_completed") == 1
        assert busy_kinds.count("activity_completed") == 5

        # After the end, raising is a documented no-op: no error, nothing written.
        before = len(await client.history("collector"))
        await client.raise_event("collector", "tick", "late")
        assert len(await client.history("collector")) == before
        for instance_id in ("collector", "busy"):
            await _drained(dsn, instance_id)
            assert (await client.status(instance_id)).status is pgd.Status.COMPLETED


async def _park_relay(dsn: str, instance_id: str) -> None:
    """Start ``relay`` and stop the runtime while it waits, so later messages share one turn."""
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.start(relay, {"seen": [], "until": 2}, instance_id=instance_id)
        with anyio.fail_after(20):
            while (await runtime.client.status(instance_id)).status is not pgd.Status.RUNNING:
                await anyio.sleep(0.02)




async def test_event_arriving_with_continue_as_new_reaches_the_next_execution(dsn: str) -> None:
    """Two events in one turn: the first ends the execution, the second belongs to the next one."""
    await _park_relay(dsn, "relay-events")
    async with pgd.Client(dsn) as client:
        await client.raise_event("relay-events", "inc", 1)
        await client.raise_event("relay-events", "inc", 2)  # the instance is live: no error, so it must count
    async with pgd.Runtime(app, dsn) as runtime:
        assert await runtime.client.wait("relay-events", timeout=4) == {"seen": [1, 2], "execution": 2}


async def test_cancel_arriving_with_continue_as_new_cancels_the_next_execution(dsn: str) -> None:
    await _park_relay(dsn, "relay-cancel")
    async with pgd.Client(dsn) as client:
        await client.raise_event("relay-cancel", "inc", 1)
        await client.cancel("relay-cancel", reason="stop")
    async with pgd.Runtime(app, dsn) as runtime:
        with pytest.raises(pgd.Cancelled):
            await runtime.client.wait("relay-cancel", timeout=4)


async def _cancel_at(client: pgd.Client, instance_id: str, offset: float) -> None:
    """Cancel ``offset`` seconds after the instance's timer is due (negative: before)."""
    with anyio.fail_after(20):
        while True:
            created = [e for e in await client.history(instance_id) if e.kind == "timer_created"]
            if created:
                break
            await anyio.sleep(0.01)
    fire_at = datetime.fromisoformat(created[0].data["fire_at"])
    db_now = await client.db.run(lambda conn: conn.fetchval("SELECT now()"), transaction=False)
    await anyio.sleep(max(0.0, (fire_at - db_now).total_seconds() + offset))
    await client.cancel(instance_id, reason=f"offset {offset}")


async def test_cancel_racing_a_timer(dsn: str) -> None:
    """Cancel lands just before, at or after a timer fires: one ending, applied once, nothing stranded."""
    offsets = [-1.0, -0.04, -0.02, -0.01, 0.0, 0.0, 0.01, 0.02, 0.04, 2.0]
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        cases = []
        for n, offset in enumerate(offsets):
            orchestration = nap if n % 2 else nap_then_work
            cases.append((await client.start(orchestration, 1.5, instance_id=f"race-{n}"), offset))
        async with anyio.create_task_group() as tg:
            for handle, offset in cases:
                tg.start_soon(_cancel_at, client, handle.instance_id, offset)
        endings: dict[str, str] = {}
        for handle, _ in cases:
            try:
                assert await handle.result(timeout=30) in ("woke", 2)
                endings[handle.instance_id] = "completed"
            except pgd.Cancelled as exc:
                assert exc.reason is not None and exc.reason.startswith("offset")
                endings[handle.instance_id] = "cancelled"

    for handle, _ in cases:
        kinds = await _kinds(dsn, handle.instance_id)
        terminal = [k for k in kinds if k.startswith("orchestration_") and k != "orchestration_started"]
        assert len(terminal) == 1 and kinds[-1] == terminal[0], kinds
        assert kinds.count("timer_fired") <= 1 and kinds.count("cancel_requested") <= 1
        ending = endings[handle.instance_id]
        assert terminal[0] == f"orchestration_{ending}"
        assert ("cancel_requested" in kinds) == (ending == "cancelled"), kinds
        assert ("timer_fired" in kinds) or ending == "cancelled"
        assert await _queued(dsn, handle.instance_id) == 0, "a timer, work item or message was stranded"
    assert endings["race-0"] == "cancelled", "cancelled a second before the timer fired"
    assert endings[f"race-{len(offsets) - 1}"] == "completed", "cancelled two seconds after it ended"


async def test_idle_worker_does_not_poll_while_a_transactional_activity_outlives_its_lease(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No steady-state polling: waiting on a locked work item backs off to a few queries.

    Counts the runtime's own round trips (every query goes through ``Database.acquire``)
    rather than server-wide commit statistics, which backends flush late and in bursts.
    """
    async with pgd.Runtime(app, dsn, lease_seconds=0.5) as runtime:
        round_trips = 0
        acquire = runtime.db.acquire

        def counting_acquire() -> Any:
            nonlocal round_trips
            round_trips += 1
            return acquire()

        monkeypatch.setattr(runtime.db, "acquire", counting_acquire)
        handle = await runtime.client.start(hold, 3.5)
        await anyio.sleep(1.0)  # the activity is running and its lease has lapsed
        before = round_trips
        await anyio.sleep(2.0)
        during = round_trips - before
        assert await handle.result(timeout=30) == 3.5
    # Backing off (0.1 s, 0.2 s, 0.4 s, ... up to the lease) leaves about two claim
    # attempts of two queries each in this window; polling at 10 Hz would make 40.
    assert during <= 8, f"{during} round trips in 2 s while waiting on a locked item"
