"""The fan-out benchmark harness, at toy sizes: it runs, every instance completes, it cleans up."""

from __future__ import annotations

import io
import os

import asyncpg
import pytest

from benchmarks.harness import run_bench
from tests.conftest import PgServer


@pytest.mark.timeout(60)
async def test_bench_reports_engine_and_floor(pg_server: PgServer) -> None:
    out = io.StringIO()
    report = await run_bench(pg_server.admin_dsn, fanout=200, workflows=20, concurrency=64, out=out)

    assert report["ok"], report
    engine, floor = report["engine"], report["floor"]
    for side in (engine, floor):
        assert side["fanout_activities_per_s"] > 0
        assert side["workflows_per_s"] > 0
        assert 0 < side["workflow_latency_p50_ms"] <= side["workflow_latency_p99_ms"]
        assert 0 < side["wake_latency_p50_ms"] <= side["wake_latency_p99_ms"]
        assert side["fanout_ok"] and side["workflows_ok"] and side["wake_ok"]
    assert engine["fanout_events"]["activity_scheduled"] == 200
    assert engine["fanout_events"]["activity_completed"] == 200
    assert engine["workflow_statuses"] == {"completed": 20}
    assert engine["fanout_turns"] >= 2 and engine["workflows_turns"] == 20 * 4
    assert engine["peak_rss_mb"] > 0
    assert 0 < report["ratio"]["fanout_activities_per_s"]
    assert report["params"] == {"fanout": 200, "workflows": 20, "concurrency": 64, "wake_samples": 50,
                                "start_concurrency": 16}

    text = out.getvalue()
    assert "engine/floor" in text and "fan-out throughput (activities/s)" in text
    assert "all instances completed" in text

    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        left = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"pgd_bench_%_{os.getpid()}_%"
        )
    finally:
        await admin.close()
    assert not left, "scratch databases must be dropped"
