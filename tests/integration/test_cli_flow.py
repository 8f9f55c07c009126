"""The ``schedule`` and ``queues`` commands, as real subprocesses against a real database."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson
import pytest

import pgdurable_async as pgd
from tests.integration.test_cli import assert_one_error_line, cli, ok, worker


@pytest.mark.timeout(60)
async def test_schedule_commands(dsn: str, tmp_path: Path) -> None:
    out = await ok("schedule", "create", "pairs", "add_pair", "--every", "1", "--input", "[2, 3]", dsn=dsn)
    assert out.startswith("created schedule pairs: next fire at ")
    await ok("schedule", "create", "nightly", "add_pair", "--cron", "0 3 * * *", "--timezone", "Asia/Tokyo",
             "--overlap", "allow", "--catchup", "none", "--input", "[1, 1]", dsn=dsn)
    conn = await asyncpg.connect(dsn)
    try:  # nobody registers add_pair yet: the schedule waits, and shows it
        await conn.execute("UPDATE pgdurable.schedules SET next_fire_at = now() - interval '1 minute'"
                           " WHERE schedule_id = 'pairs'")
    finally:
        await conn.close()
    listed = await ok("schedule", "list", dsn=dsn)
    lines = listed.splitlines()
    assert lines[0].split()[:3] == ["SCHEDULE", "ORCHESTRATION", "WHEN"]
    assert "overdue" in next(line for line in lines if line.startswith("pairs"))
    nightly = next(line for line in lines if line.startswith("nightly"))
    assert "cron 0 3 * * * (Asia/Tokyo)" in nightly and "allow" in nightly and "active" in nightly

    await ok("schedule", "pause", "nightly", dsn=dsn)
    as_json = orjson.loads(await ok("schedule", "list", "--json", dsn=dsn))
    assert [(s["schedule_id"], s["paused"], s["every"]) for s in as_json] == [("nightly", True, None),
                                                                             ("pairs", False, 1.0)]
    await ok("schedule", "resume", "nightly", dsn=dsn)
    instance_id = (await ok("schedule", "trigger", "nightly", dsn=dsn)).strip()
    assert instance_id.startswith("nightly@")

    async with worker(dsn, tmp_path / "worker.log"):
        async with pgd.Client(dsn) as client:
            assert await client.wait(instance_id, timeout=20) == 2
            fired = [s for s in await client.list_schedules() if s.schedule_id == "pairs"][0]
            assert fired.last_instance_id is not None
            assert await client.wait(fired.last_instance_id, timeout=20) == 5
    listed = await ok("schedule", "list", dsn=dsn)
    assert "overdue" not in listed

    await ok("schedule", "delete", "pairs", dsn=dsn)
    for action in ("pause", "resume", "trigger", "delete"):
        assert "schedule 'pairs' not found" in assert_one_error_line(await cli("schedule", action, "pairs", dsn=dsn))
    assert "already exists" in assert_one_error_line(
        await cli("schedule", "create", "nightly", "add_pair", "--every", "5", dsn=dsn))
    assert "bad cron expression" in assert_one_error_line(
        await cli("schedule", "create", "bad", "add_pair", "--cron", "99 * * * *", dsn=dsn))
    usage = await cli("schedule", "create", "bad", "add_pair", "--cron", "* * * * *", "--every", "5", dsn=dsn)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    assert (await cli("schedule", "create", "bad", "add_pair", "--every", "0.5", dsn=dsn)).returncode == 2


@pytest.mark.timeout(60)
async def test_queues_command(dsn: str, tmp_path: Path) -> None:
    async with worker(dsn, tmp_path / "worker.log"):
        table = await ok("queues", dsn=dsn)
        as_json = orjson.loads(await ok("queues", "--json", dsn=dsn))
    assert table.splitlines()[0].split() == ["QUEUE", "CONCURRENCY", "RATE", "LIMIT", "PER", "KEY", "READY",
                                             "RUNNING", "DELAYED"]
    assert table.splitlines()[2].split() == ["cli-queue", "2", "5/1s", "1", "0", "0", "0"]
    assert as_json == [{"name": "cli-queue", "concurrency": 2, "rate_limit": {"n": 5, "per": 1.0},
                        "key_concurrency": 1, "ready": 0, "running": 0, "delayed": 0}]
