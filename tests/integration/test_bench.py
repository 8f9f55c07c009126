"""The benchmark harness, at toy sizes: it runs every phase, every instance completes, it cleans up."""

from __future__ import annotations

import io
import os

import asyncpg
import pytest

from benchmarks.harness import run_bench
from tests.conftest import PgServer


@pytest.mark.timeout(120)
async def test_bench_reports_engine_and_both_floors(pg_server: PgServer) -> None:
    out = io.StringIO()
    report = await run_bench(pg_server.admin_dsn, sizes=[300, 100], workflows=20, concurrency=64, out=out)

    assert report["ok"], report
    assert report["params"]["sizes"] == [100, 300]
    assert set(report["sizes"]) == {"100", "300"}
    for n, found in report["sizes"].items():
        for side in ("engine", "minimal_floor", "engine_floor"):
            figures = found[side]
            assert figures["fanout_ok"], (n, side)
            assert figures["fanout_activities_per_s"] > 0
            assert figures["cpu_us_per_activity"] > 0
            assert figures["load_average"]
        assert found["ratio"]["engine/minimal_floor"] > 0 and found["ratio"]["engine/engine_floor"] > 0
        events = found["engine"]["fanout_events"]
        assert events["activity_scheduled"] == events["activity_completed"] == int(n)
        assert found["engine"]["peak_rss_mb"] > 0
        assert found["minimal_floor"]["claims"] >= int(n) / 64
    engine, floor = report["engine"], report["floor"]
    for side in (engine, floor):
        assert side["workflows_per_s"] > 0
        assert 0 < side["workflow_latency_p50_ms"] <= side["workflow_latency_p99_ms"]
        assert 0 < side["wake_latency_p50_ms"] <= side["wake_latency_p99_ms"]
        assert side["workflows_ok"] and side["wake_ok"]
    assert engine["workflow_statuses"] == {"completed": 20}
    assert engine["workflows_turns"] == 20 * 4
    assert report["machine"]["load_average_start"]

    text = out.getvalue()
    assert "minimal floor" in text and "engine-shaped floor" in text and "activities/s" in text
    assert "all instances completed" in text

    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        left = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"pgd_bench_%_{os.getpid()}_%"
        )
    finally:
        await admin.close()
    assert not left, "scratch databases must be dropped"


async def test_bench_refuses_empty_sizes(pg_server: PgServer) -> None:
    from pgdurable_async._base.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        await run_bench(pg_server.admin_dsn, sizes=[], out=io.StringIO())
