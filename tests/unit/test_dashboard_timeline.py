"""The dashboard's pure parts: timeline bars from history, their geometry, cursors, charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from pgdurable_async._base import events as ev
from pgdurable_async._base.errors import InvalidArgument
from pgdurable_async._base.types import HistoryEvent
from pgdurable_async.dashboard import _charts, _timeline, _views

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _history(*facts: tuple[float, str, dict[str, Any]]) -> list[HistoryEvent]:
    return [HistoryEvent(seq, kind, data, T0 + timedelta(seconds=at)) for seq, (at, kind, data) in
            enumerate(facts, start=1)]


HISTORY = _history(
    (0, ev.ORCHESTRATION_STARTED, {"name": "o", "input": None}),
    (0, ev.ACTIVITY_SCHEDULED, {"task_id": 1, "name": "fetch", "input": 1}),
    (0, ev.TIMER_CREATED, {"task_id": 2, "fire_at": (T0 + timedelta(hours=1)).isoformat()}),
    (1, ev.ACTIVITY_COMPLETED, {"task_id": 1, "result": 1, "attempts": 3}),
    (1, ev.SUB_ORCHESTRATION_SCHEDULED, {"task_id": 3, "name": "kid", "instance_id": "k", "input": None}),
    (2, ev.SUB_ORCHESTRATION_FAILED, {"task_id": 3, "instance_id": "k", "error": {"type": "E", "message": "no"}}),
    (2, ev.ACTIVITY_SCHEDULED, {"task_id": 4, "name": "pgdurable.graph.sql", "input": {"node": "n0.1"}}),
    (3, ev.EVENT_RECEIVED, {"name": "go", "data": 1}),
)


def test_bars_pair_each_command_with_its_completion() -> None:
    now = T0 + timedelta(seconds=10)
    live = {4: SimpleNamespace(attempt=2, running=False, visible_at=now + timedelta(seconds=5))}
    timeline = _timeline.build(HISTORY, finished=False, now=now, attempts=live, timeouts={2: "approve"})
    bars = {b.task_id: b for b in timeline.bars}
    assert [(b.kind, b.name, b.outcome) for b in timeline.bars] == [
        ("activity", "fetch", "completed"), ("timer", "timeout of approve", "running"),
        ("child", "kid", "failed"), ("activity", "sql n0.1", "running")]
    assert bars[1].attempts == 3 and bars[1].end == T0 + timedelta(seconds=1)
    assert bars[3].error == "E: no" and bars[3].child_id == "k"
    assert bars[4].attempts == 2 and bars[4].retry_at == now + timedelta(seconds=5)  # waiting out a backoff
    assert [m.kind for m in timeline.markers] == [ev.EVENT_RECEIVED] and timeline.end == now

    finished = _timeline.build(HISTORY, finished=True, now=now)
    assert [b.outcome for b in finished.bars] == ["completed", "cancelled", "failed", "cancelled"]
    assert finished.end == T0 + timedelta(seconds=3)  # the last fact, not the clock


def test_layout_keeps_bars_inside_the_chart_and_visible() -> None:
    now = T0 + timedelta(seconds=10)
    drawn = _timeline.layout(_timeline.build(HISTORY, finished=False, now=now))
    for row in drawn["bars"]:
        assert drawn["x0"] <= row["x"] <= drawn["x1"] and row["w"] >= 3
        assert row["x"] + row["w"] <= drawn["x1"] + 3
        assert row["fill"] == _timeline.COLOURS[row["bar"].outcome][0]
    assert [row["retried"] for row in drawn["bars"]] == [True, False, False, False]
    xs = [t["x"] for t in drawn["ticks"]]
    assert xs == sorted(xs) and 3 <= len(xs) <= 9 and drawn["ticks"][0]["label"] == "0"
    assert "fires" in drawn["bars"][1]["note"]


def test_a_wide_fan_out_is_capped() -> None:
    facts = [(0.0, ev.ACTIVITY_SCHEDULED, {"task_id": i, "name": "a"}) for i in range(1, 1001)]
    timeline = _timeline.build(_history(*facts), finished=False, now=T0 + timedelta(seconds=1))
    assert len(timeline.bars) == _timeline.MAX_BARS and timeline.left_out == 1000 - _timeline.MAX_BARS


def test_cursors_round_trip_and_bad_ones_are_refused() -> None:
    at = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert _views.decode_cursor(_views.encode_cursor(at, "a/b <c>")) == (at, "a/b <c>")
    for bad in ("x", "!!", "WzFd"):
        with pytest.raises(InvalidArgument):
            _views.decode_cursor(bad)
    assert _views._like("50%_a\\") == "%50\\%\\_a\\\\%"


def test_throughput_charts_stack_per_minute() -> None:
    minute = T0.replace(second=0)
    rows = [{"minute": minute + timedelta(minutes=i), "activity_completed": i, "activity_failed": 1,
             "orchestration_started": 2, "orchestration_completed": 1, "orchestration_failed": 0} for i in range(15)]
    activities, instances = _charts.charts(rows)
    assert activities["max"] == 20 and activities["total"] == sum(range(15)) + 15
    last = activities["columns"][-1]
    assert [s["n"] for s in last["segments"]] == [14, 1] and last["segments"][1]["y"] < last["segments"][0]["y"]
    assert len(instances["columns"]) == 30 and instances["total"] == 15  # started are not finished


def test_the_dashboard_is_optional_and_exports_create_app() -> None:
    import subprocess
    import sys

    import pgdurable_async.dashboard as dashboard

    assert dashboard.__all__ == ["create_app"]
    web = ("pgdurable_async.dashboard", "starlette", "uvicorn", "jinja2")
    probe = ("import sys, pgdurable_async, pgdurable_async._runtime, pgdurable_async._client; "
             f"print(sorted(m for m in {web!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # the library never loads the web stack
