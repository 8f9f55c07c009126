"""OpenTelemetry spans in one process: start, turn and activity spans join the caller's trace.

The SDK's in-memory exporter collects them (tests/spans.py); the cross-process case is
tests/acceptance/test_tracing_processes.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pgdurable_async as pgd
from pgdurable_async._base import tracing
from tests.spans import as_dict, spans

__all__ = ["spans"]  # the fixture

ROOT = Path(__file__).resolve().parents[2]
app = pgd.App()


@app.activity(retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.05))
async def step(ctx: pgd.ActivityContext, x: str) -> str:
    if x == "flaky" and ctx.attempt == 1:
        raise ValueError("the first attempt fails")
    return x


@app.orchestration
async def traced(ctx: pgd.OrchestrationContext, xs: list[str]) -> list[str]:
    return list(await ctx.all([ctx.call_activity(step, x) for x in xs]))


@app.orchestration
async def parent(ctx: pgd.OrchestrationContext, xs: list[str]) -> list[str]:
    return list(await ctx.call_orchestration(traced, xs, instance_id=f"{ctx.instance_id}-child"))


def _finished(exporter: InMemorySpanExporter, name: str, instance_id: str) -> list[dict[str, Any]]:
    return [s for s in map(as_dict, exporter.get_finished_spans())
            if s["name"] == name and s["attributes"].get("pgdurable.instance_id") == instance_id]


async def test_start_turn_and_activity_spans_join_the_callers_trace(dsn: str, spans: InMemorySpanExporter) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            handle = await runtime.client.start(traced, ["a", "flaky"], instance_id="traced-1")
        assert await handle.result(timeout=30) == ["a", "flaky"]
    ctx = caller.get_span_context()
    trace_id, caller_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    [start] = _finished(spans, "pgdurable.start", "traced-1")
    assert start["trace_id"] == trace_id and start["parent_span_id"] == caller_id
    assert start["attributes"]["pgdurable.name"] == "traced"

    activities = _finished(spans, "pgdurable.activity", "traced-1")
    assert sorted((s["attributes"]["pgdurable.attempt"], s["status"]) for s in activities) == [
        (1, "ERROR"), (1, "UNSET"), (2, "UNSET")]
    assert {s["attributes"]["pgdurable.name"] for s in activities} == {"step"}
    assert {(s["trace_id"], s["parent_span_id"]) for s in activities} == {(trace_id, start["span_id"])}

    turns = _finished(spans, "pgdurable.turn", "traced-1")
    assert len(turns) >= 2  # the start, then the results (a retry takes a turn of its own or not)
    assert {(s["trace_id"], s["parent_span_id"]) for s in turns} == {(trace_id, start["span_id"])}
    assert {s["attributes"]["pgdurable.name"] for s in turns} == {"traced"}

    stored = await _trace_context(dsn, "traced-1")  # the start span's context, as W3C traceparent
    assert stored["traceparent"].startswith(f"00-{trace_id}-{start['span_id']}-")


async def test_a_child_instance_joins_its_parents_trace(dsn: str, spans: InMemorySpanExporter) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            handle = await runtime.client.start(parent, ["x", "y"], instance_id="family")
        assert await handle.result(timeout=30) == ["x", "y"]
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    [start] = _finished(spans, "pgdurable.start", "family")
    child_activities = _finished(spans, "pgdurable.activity", "family-child")
    assert len(child_activities) == 2
    assert {(s["trace_id"], s["parent_span_id"]) for s in child_activities} == {(trace_id, start["span_id"])}
    assert await _trace_context(dsn, "family-child") is None  # looked up through its parent


async def test_without_a_caller_span_the_instance_starts_its_own_trace(dsn: str, spans: InMemorySpanExporter) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(traced, ["solo"], instance_id="solo")
        assert await handle.result(timeout=30) == ["solo"]
    [start] = _finished(spans, "pgdurable.start", "solo")
    assert start["parent_span_id"] is None
    [activity] = _finished(spans, "pgdurable.activity", "solo")
    assert (activity["trace_id"], activity["parent_span_id"]) == (start["trace_id"], start["span_id"])


async def test_no_tracer_provider_means_no_spans_and_no_stored_context(dsn: str) -> None:
    assert tracing.installed() and not tracing.active()
    exporter = InMemorySpanExporter()  # attached to nothing: the global provider is the API's default
    async with pgd.Runtime(app, dsn) as runtime:
        with trace.get_tracer("test").start_as_current_span("caller"):
            handle = await runtime.client.start(traced, ["quiet"], instance_id="quiet")
        assert await handle.result(timeout=30) == ["quiet"]
    assert exporter.get_finished_spans() == ()
    assert await _trace_context(dsn, "quiet") is None


async def test_start_refuses_a_trace_context_that_is_not_an_object(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="trace_context must be a JSON object"):
            await conn.execute("SELECT pgdurable.start('traced', '[]', 'bad-context', '[1, 2]')")
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.instances WHERE instance_id = 'bad-context'") == 0
    finally:
        await conn.close()


_NO_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import anyio
import pgdurable_async as pgd
from pgdurable_async._base import tracing
app = pgd.App()

@app.activity
async def step(ctx, x):
    return x

@app.orchestration
async def traced(ctx, xs):
    return await ctx.all([ctx.call_activity(step, x) for x in xs])

async def main() -> None:
    assert not tracing.installed() and not tracing.active() and tracing.carrier() is None
    async with pgd.Runtime(app, sys.argv[1]) as runtime:
        handle = await runtime.client.start(traced, ["plain"], instance_id="no-otel")
        print(await handle.result(timeout=30))

anyio.run(main)
"""


async def test_everything_works_without_opentelemetry_installed(dsn: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", _NO_OTEL, dsn], cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "['plain']"


async def _trace_context(dsn: str, instance_id: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT trace_context::text FROM pgdurable.instances WHERE instance_id = $1",
                                    instance_id)
    finally:
        await conn.close()
    return None if value is None else orjson.loads(value)
