"""Queues in one process: concurrency, per-key concurrency, sliding-window rate limits and priorities,
enforced when items are claimed (tests/acceptance/test_flow_processes.py runs the same across processes)."""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()
pair = pgd.Queue("pair", concurrency=2)
per_key = pgd.Queue("per-key", concurrency=4, key_concurrency=1)
rated = pgd.Queue("rated", rate_limit=pgd.RateLimit(3, per=timedelta(seconds=1)))
single = pgd.Queue("single", concurrency=1)
spans: dict[str, list[tuple[str, float, float]]] = {}
order: list[str] = []


async def _span(group: str, label: str, seconds: float) -> None:
    start = time.monotonic()
    await anyio.sleep(seconds)
    spans.setdefault(group, []).append((label, start, time.monotonic()))


@app.activity(queue=pair)
async def paired(ctx: pgd.ActivityContext, job: list[object]) -> None:
    await _span(str(job[0]), str(job[1]), 0.1)


@app.activity(queue=per_key)
async def keyed(ctx: pgd.ActivityContext, job: list[object]) -> None:
    await _span(str(job[0]), str(job[1]), 0.08)


@app.activity(queue=rated)
async def limited(ctx: pgd.ActivityContext, job: list[object]) -> None:
    await _span(str(job[0]), str(job[1]), 0.0)


@app.activity(queue=single)
async def one_at_a_time(ctx: pgd.ActivityContext, label: str) -> None:
    order.append(label)
    await anyio.sleep(0.5 if label == "blocker" else 0.01)


@app.activity(queue=pair, retry=pgd.RetryPolicy(max_attempts=3, initial_interval=0.05))
async def flaky_paired(ctx: pgd.ActivityContext, key: str) -> int:
    if ctx.attempt < 3:
        raise ConnectionError("try again")
    return ctx.attempt


@app.orchestration
async def fan(ctx: pgd.OrchestrationContext, job: dict[str, object]) -> int:
    activity, group, n = str(job["activity"]), str(job["group"]), int(job["n"])  # type: ignore[call-overload]
    keys = job.get("keys") or [None]
    await ctx.all([ctx.call_activity(activity, [group, i], key=keys[i % len(keys)]) for i in range(n)])
    return n


@app.orchestration
async def backlog(ctx: pgd.OrchestrationContext, items: list[list[object]]) -> None:
    await ctx.all([ctx.call_activity(one_at_a_time, str(label), priority=int(prio))  # type: ignore[call-overload]
                   for label, prio in items])


@app.orchestration
async def retried(ctx: pgd.OrchestrationContext, _: object) -> int:
    return int(await ctx.call_activity(flaky_paired, "k"))


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.timeout(60)
async def test_concurrency_holds_for_the_queue(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_concurrency=16) as runtime:
        handle = await runtime.client.start(fan, {"activity": "paired", "group": "pair-1", "n": 12})
        assert await handle.result(timeout=30) == 12
    got = spans["pair-1"]
    assert len(got) == 12
    assert _max_overlap([(s, e) for _, s, e in got]) == 2


@pytest.mark.timeout(60)
async def test_one_key_never_overlaps_itself_and_keys_run_side_by_side(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_concurrency=16) as runtime:
        handle = await runtime.client.start(fan, {"activity": "keyed", "group": "keys-1", "n": 12,
                                                  "keys": ["a", "b", "c"]})
        assert await handle.result(timeout=30) == 12
        scheduled = [e.data for e in await handle.history() if e.kind == "activity_scheduled"]
    assert {d["key"] for d in scheduled} == {"a", "b", "c"}  # the key is part of the history
    by_key: dict[str, list[tuple[float, float]]] = {}
    for label, s, e in spans["keys-1"]:
        by_key.setdefault("abc"[int(label) % 3], []).append((s, e))
    assert all(_max_overlap(v) == 1 for v in by_key.values()), by_key
    assert _max_overlap([(s, e) for _, s, e in spans["keys-1"]]) >= 2  # different keys did overlap


#: A log of every start a rate-limited claim records, by the database's clock, copied as it is made
#: (pgdurable.queue_starts itself keeps only the current window).
CLAIM_LOG = """
    CREATE TABLE public.queue_claims (queue text NOT NULL, started_at timestamptz NOT NULL);
    CREATE FUNCTION public.log_queue_claim() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.queue_claims VALUES (NEW.queue, NEW.started_at);
        RETURN NEW;
    END $$;
    CREATE TRIGGER log_queue_claim AFTER INSERT ON pgdurable.queue_starts
        FOR EACH ROW EXECUTE FUNCTION public.log_queue_claim();"""
CLAIMS = "SELECT started_at FROM public.queue_claims WHERE queue = $1 ORDER BY started_at"


@pytest.mark.timeout(60)
async def test_rate_limit_is_a_sliding_window(dsn: str) -> None:
    log = await asyncpg.connect(dsn)
    try:
        await log.execute(CLAIM_LOG)
        async with pgd.Runtime(app, dsn, max_concurrency=16) as runtime:
            began = time.monotonic()
            handle = await runtime.client.start(fan, {"activity": "limited", "group": "rate-1", "n": 9})
            assert await handle.result(timeout=30) == 9
            took = time.monotonic() - began
        claims = [r[0] for r in await log.fetch(CLAIMS, "rated")]
    finally:
        await log.close()
    assert len(claims) == len(spans["rate-1"]) == 9  # each start was claimed once, under the limit
    assert took >= 2.0  # 3 per second: the 7th start waits two windows
    # In any window of 1 s at most 3 were claimed (by the database's clock, where the limit is kept);
    # fixed buckets would let 6 through within a few ms of a bucket's end.
    window = timedelta(seconds=1)
    assert max(sum(1 for t in claims if s <= t < s + window) for s in claims) == 3


@pytest.mark.timeout(60)
async def test_priorities_reorder_a_backlog(dsn: str) -> None:
    items = [["low-1", 0], ["high-1", 10], ["mid-1", 5], ["low-2", 0], ["high-2", 10], ["neg", -1], ["mid-2", 5]]
    async with pgd.Runtime(app, dsn, max_concurrency=8) as runtime:
        blocker = await runtime.client.start(backlog, [["blocker", 0]])
        with anyio.fail_after(10):
            while order != ["blocker"]:  # it holds the queue's one slot: the backlog waits behind it
                await anyio.sleep(0.01)
        handle = await runtime.client.start(backlog, items)
        await handle.result(timeout=30)
        await blocker.result(timeout=30)
    assert order == ["blocker", "high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2", "neg"]


@pytest.mark.timeout(60)
async def test_retries_in_a_limited_queue_free_their_slot(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_concurrency=4) as runtime:
        assert await (await runtime.client.start(retried)).result(timeout=30) == 3
        queues = {q.name: q for q in await runtime.client.list_queues()}
    assert set(queues) >= {"pair", "per-key", "rated", "single"}
    assert queues["pair"].concurrency == 2 and queues["pair"].running == 0 and queues["pair"].ready == 0
    assert queues["rated"].rate_limit == pgd.RateLimit(3, per=timedelta(seconds=1))
    assert queues["per-key"].key_concurrency == 1


# -- another service's activity: its queue comes from the registry ------------------------------
caller_app = pgd.App()
callee_app = pgd.App()
remote_q = pgd.Queue("remote", concurrency=1)


@callee_app.activity(name="remote.work", queue=remote_q)
async def remote_work(ctx: pgd.ActivityContext, i: int) -> int:
    await _span("remote", str(i), 0.05)
    return i


@caller_app.orchestration
async def calls_remote(ctx: pgd.OrchestrationContext, n: int) -> list[int]:
    return list(await ctx.all([ctx.call_activity("remote.work", i) for i in range(n)]))


@pytest.mark.timeout(60)
async def test_an_activity_of_another_app_runs_under_its_queue(dsn: str) -> None:
    async with pgd.Runtime(callee_app, dsn) as _callee, pgd.Runtime(caller_app, dsn) as caller:
        assert await (await caller.client.start(calls_remote, 5)).result(timeout=30) == [0, 1, 2, 3, 4]
    assert _max_overlap([(s, e) for _, s, e in spans["remote"]]) == 1


async def test_queue_and_key_arguments_are_checked(dsn: str) -> None:
    with pytest.raises(pgd.InvalidArgument):
        pgd.Queue("q", concurrency=0)
    with pytest.raises(pgd.InvalidArgument):
        pgd.RateLimit(0, per=timedelta(seconds=1))
    with pytest.raises(pgd.InvalidArgument):
        pgd.RateLimit(1, per=timedelta(0))
    assert pgd.RateLimit(5, per=2).per == timedelta(seconds=2)
    other = pgd.App()
    other.activity(queue=pgd.Queue("same", concurrency=1))(_noop)
    with pytest.raises(pgd.ConfigurationError):
        other.activity(name="second", queue=pgd.Queue("same", concurrency=2))(_noop2)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.queues") == 0  # stored by a runtime's start
    finally:
        await conn.close()


async def _noop(ctx: pgd.ActivityContext, _: object) -> None:
    return None


async def _noop2(ctx: pgd.ActivityContext, _: object) -> None:
    return None
