"""Traces across processes: a worker process's activity spans join the trace of the process
that called ``client.start`` (the trace context travels with the instance, in the database).

The worker (tests/acceptance/ops_app.py with ``$PGDURABLE_OPS_SPANS``) exports its spans to a
file; the test process collects its own with the SDK's in-memory exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pgdurable_async as pgd
from tests.spans import as_dict, spans
from tests.workers import WorkerProcess

__all__ = ["spans"]  # the fixture

APP = "tests.acceptance.ops_app:app"
pytestmark = pytest.mark.timeout(90)


async def test_a_workers_spans_join_the_callers_trace(dsn: str, tmp_path: Path,
                                                      spans: InMemorySpanExporter) -> None:
    exported = tmp_path / "worker-spans.jsonl"
    worker = WorkerProcess(dsn, APP, tmp_path / "worker.log",
                           env={"PGDURABLE_OPS_SPANS": str(exported), "PGDURABLE_OPS_RELEASE": str(tmp_path / "r")})
    try:
        await worker.ready()
        async with pgd.Client(dsn) as client:
            with trace.get_tracer("test").start_as_current_span("request") as request:
                handle = await client.start("fan", 3, instance_id="across")
                other = await client.start("retrying", 5, instance_id="across-retry")
            assert await handle.result(timeout=30) == 6
            assert await other.result(timeout=30) == 5
        assert await worker.stop() == 0  # its turn spans are recorded once their commits are seen
    finally:
        worker.close()

    trace_id = f"{request.get_span_context().trace_id:032x}"
    starts = {s["attributes"]["pgdurable.instance_id"]: s for s in map(as_dict, spans.get_finished_spans())
              if s["name"] == "pgdurable.start"}
    assert {s["trace_id"] for s in starts.values()} == {trace_id}

    theirs: list[dict[str, Any]] = [json.loads(line) for line in exported.read_text().splitlines()]
    for instance_id, n_activities in (("across", 3), ("across-retry", 2)):
        mine = [s for s in theirs if s["attributes"].get("pgdurable.instance_id") == instance_id]
        activities = [s for s in mine if s["name"] == "pgdurable.activity"]
        turns = [s for s in mine if s["name"] == "pgdurable.turn"]
        assert len(activities) == n_activities and len(turns) >= 2
        assert {(s["trace_id"], s["parent_span_id"]) for s in activities + turns} == {
            (trace_id, starts[instance_id]["span_id"])}
    retried = sorted((s["attributes"]["pgdurable.attempt"], s["status"]) for s in theirs
                     if s["attributes"].get("pgdurable.instance_id") == "across-retry"
                     and s["name"] == "pgdurable.activity")
    assert retried == [(1, "ERROR"), (2, "UNSET")]
