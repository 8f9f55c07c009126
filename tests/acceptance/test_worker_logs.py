"""``worker --log-format json``: one JSON object per line on a real worker's stderr (tests/acceptance/ops_app.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

APP = "tests.acceptance.ops_app:app"
pytestmark = pytest.mark.timeout(90)


def records(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = [line for line in worker.log().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= r.keys() for r in parsed)
    return parsed


def about(found: list[dict[str, Any]], instance_id: str, logger: str) -> list[dict[str, Any]]:
    return [r for r in found if r.get("instance_id") == instance_id and r["logger"] == logger]


async def test_json_log_lines_name_instances_attempts_and_retries(dsn: str, tmp_path: Path) -> None:
    worker = WorkerProcess(dsn, APP, tmp_path / "worker.log", "--log-format", "json",
                           env={"PGDURABLE_OPS_RELEASE": str(tmp_path / "release")})
    try:
        await worker.ready()
        async with pgd.Client(dsn) as client:
            assert await (await client.start("retrying", 3, instance_id="r-1")).result(timeout=30) == 3
            with pytest.raises(pgd.InstanceFailed):
                await (await client.start("failing", 4, instance_id="f-1")).result(timeout=30)
        assert await worker.stop() == 0
    finally:
        worker.close()

    found = records(worker)
    assert any(r["logger"] == "pgdurable_async.cli" and " ready: " in r["message"] for r in found)
    assert [(r["level"], r["message"]) for r in about(found, "r-1", "pgdurable_async.instances")] == [
        ("INFO", "instance r-1 (retrying) started"), ("INFO", "instance r-1 (retrying) completed")]
    assert {r["orchestration"] for r in about(found, "r-1", "pgdurable_async.instances")} == {"retrying"}

    [retry] = about(found, "r-1", "pgdurable_async.activities")
    assert retry["level"] == "WARNING" and retry["activity"] == "flaky"
    assert (retry["attempt"], retry["max_attempts"]) == (1, 3)
    assert retry["error"] == "ValueError: the first attempt fails"
    next_at = datetime.fromisoformat(retry["next_attempt_at"])
    logged_at = datetime.fromisoformat(retry["time"])
    assert timedelta(0) <= next_at - logged_at <= timedelta(seconds=5)  # 0.1 s of backoff, on the worker's clock
    assert retry["message"].endswith(f"retrying at {retry['next_attempt_at']}")

    attempts = about(found, "f-1", "pgdurable_async.activities")
    assert [(r["attempt"], r["max_attempts"], "next_attempt_at" in r) for r in attempts] == [
        (1, 2, True), (2, 2, False)]
    assert "no attempts left" in attempts[1]["message"]
    ending = about(found, "f-1", "pgdurable_async.instances")[-1]
    assert ending["level"] == "WARNING" and ending["message"].startswith("instance f-1 (failing) failed: ActivityError")
    assert "RuntimeError: doomed 4" in ending["error"]


async def test_a_log_format_that_does_not_exist_is_refused(dsn: str, tmp_path: Path) -> None:
    worker = WorkerProcess(dsn, APP, tmp_path / "bad.log", "--log-format", "xml")
    assert worker.proc.wait(timeout=60) == 2
    assert worker.log().startswith("error: argument --log-format: invalid choice: 'xml'")
