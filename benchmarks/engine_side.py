"""The engine's side of the benchmark: its app, and the fan-out, workflow and wake-latency phases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pgdurable_async import ActivityContext, App, OrchestrationContext, Runtime
from pgdurable_async._runtime.wakeup import Wakeup

from .common import (
    FANOUT,
    MARK,
    NOOP,
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
from .costs import current_rss_mb, peak_rss_mb

__all__ = ["Probe", "bench_app", "engine_fanout", "engine_workflows", "engine_wake", "worker_app"]


@dataclass
class Probe:
    """Times observed inside activity bodies (wake latency)."""

    seen: dict[str, float] = field(default_factory=dict)
    signal: Wakeup = field(default_factory=Wakeup)

    def mark(self, key: str) -> None:
        self.seen.setdefault(key, time.perf_counter())
        self.signal.set()


def bench_app(probe: Probe) -> App:
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



async def engine_fanout(
    runtime: Runtime, dsn: str, n: int, track: Callable[[Callable[[], int]], None]
) -> dict[str, Any]:
    """The fan-out of ``n``; ``track`` is handed a function that counts the acked activities."""
    before = dict(runtime.turns.stats)
    acked = runtime.activities.stats["completed"]
    track(lambda: runtime.activities.stats["completed"] - acked)
    rss_before = current_rss_mb()
    instance_id = f"fanout-{uuid.uuid4().hex[:8]}"
    async with DoneWatcher(dsn) as done:
        done.expect([instance_id])
        t0 = time.perf_counter()
        await runtime.client.start(FANOUT, n, instance_id=instance_id)
        await done.wait(timeout_for(n))
        elapsed = done.finished[instance_id] - t0
    stats = {k: v - before[k] for k, v in runtime.turns.stats.items()}
    conn = await connect(dsn)
    try:
        events = await event_counts(conn, instance_id)
        output = await conn.fetchval("SELECT output::text FROM instances WHERE instance_id = $1", instance_id)
    finally:
        await conn.close()
    return {
        "fanout_seconds": elapsed,
        "fanout_activities_per_s": n / elapsed,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "fanout_turns": stats["turns"],
        "fanout_replays": stats["replays"],
        "fanout_cache_hits": stats["cache_hits"],
        "fanout_ok": output == str(n)
        and events.get("activity_scheduled") == n
        and events.get("activity_completed") == n
        and events.get("orchestration_completed") == 1,
        "fanout_events": events,
    }



async def engine_workflows(runtime: Runtime, dsn: str, count: int) -> dict[str, Any]:
    before = dict(runtime.turns.stats)
    prefix = f"wf-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i}" for i in range(count)]
    started: dict[str, float] = {}

    async def start(_index: int, instance_id: str) -> None:
        await runtime.client.start(STEPS, 0, instance_id=instance_id)

    async with DoneWatcher(dsn) as done:
        done.expect(ids)
        await start_all(ids, start, started)
        await done.wait(timeout_for(count * 3))
        figures: dict[str, Any] = latency_figures(ids, started, done.finished)
    conn = await connect(dsn)
    try:
        figures["workflow_statuses"] = await statuses(conn, prefix)
        wrong = await conn.fetchval(
            "SELECT count(*) FROM instances WHERE instance_id LIKE $1 || '%' AND output <> '3'::jsonb", prefix
        )
    finally:
        await conn.close()
    figures["workflows_ok"] = figures["workflow_statuses"] == {"completed": count} and wrong == 0
    figures.update({f"workflows_{k}": v - before[k] for k, v in runtime.turns.stats.items()})
    return figures


async def engine_wake(runtime: Runtime, dsn: str, probe: Probe, samples: int) -> dict[str, Any]:
    latencies: list[float] = []
    prefix = f"wake-{uuid.uuid4().hex[:8]}-"
    async with DoneWatcher(dsn) as done:
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
    conn = await connect(dsn)
    try:
        found = await statuses(conn, prefix)
    finally:
        await conn.close()
    return {
        "wake_latency_p50_ms": 1000 * percentile(latencies, 50),
        "wake_latency_p99_ms": 1000 * percentile(latencies, 99),
        "wake_statuses": found,
        "wake_ok": found == {"completed": samples + 1},
    }


#: The app of ``bench --processes N``'s extra worker processes (their activities probe nothing).
worker_app = bench_app(Probe())
