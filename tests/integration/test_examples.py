"""Every graph example in examples/ runs to completion and does what it says."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from pgdurable_async._cli.examples import EXAMPLES, load_example

ROOT = Path(__file__).resolve().parents[2]


async def test_document_batch(dsn: str) -> None:
    out = io.StringIO()
    result = await load_example("document_batch").run(dsn, out=out, count=250)
    assert result["status"] == "completed"
    assert result["processed"] == 250
    assert result["batches"] == 3
    assert "flowchart TD" in out.getvalue()


async def test_embedding_pipeline(dsn: str) -> None:
    result = await load_example("embedding_pipeline").run(dsn, out=io.StringIO())
    assert result["docs"] == 6 and result["marked"] == 6
    assert result["chunks"] == result["embedded"] == result["keys"] == 18
    assert result["failures"] > 0  # transient API failures were retried to success
    assert result["peak"] <= 4 and result["peak_per_tenant"] <= 2  # the queue held the API's limits


async def test_outbox(dsn: str) -> None:
    result = await load_example("outbox").run(dsn, out=io.StringIO(), count=110)
    assert result["result"] == {"drained": True}
    assert result["delivered"] == 110 and result["broker"] == 110
    assert result["groups"] == 5  # 25 + 25 + 25 + 25 + 10, each checkpointed
    assert result["instance_id"].startswith("outbox-drain@")  # a firing of its schedule


async def test_maintenance_approved(dsn: str) -> None:
    result = await load_example("maintenance").run(dsn, out=io.StringIO())
    assert result["status"] == "completed"
    assert result["log"] == [{"action": "analyzed 1 table(s)", "tables": ["events_archive"], "approved_by": "alice"}]
    assert result["instance_id"].startswith("maintenance-window@")  # a firing of its schedule


async def test_maintenance_approval_times_out(dsn: str) -> None:
    result = await load_example("maintenance").run(dsn, out=io.StringIO(), approve=False, timeout=1)
    assert [row["action"] for row in result["log"]] == ["approval timed out"]


@pytest.mark.parametrize("name", ["document_batch"])
def test_demo_command_runs_an_example(dsn: str, name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgdurable_async", "demo", name, "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "status: completed" in proc.stdout and "flowchart TD" in proc.stdout


def test_demo_rejects_unknown_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgdurable_async", "demo", "nope", "--dsn", "postgresql://localhost:1/x"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "no example named 'nope'" in proc.stderr
    assert set(EXAMPLES) == {"document_batch", "embedding_pipeline", "outbox", "maintenance"}
