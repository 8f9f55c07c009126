"""Saved histories (``histories/*.json``) replayed against the code in ``history_workflows``.

The current code must replay every file cleanly (and rebuild it from any crash
point); code edited incompatibly must fail with ``NonDeterminismError``; a
malformed file must fail the execution with a clear message, never raise out of
the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pgdurable_async._base import events as ev
from pgdurable_async._engine.execution import Event, Execution

from . import history_workflows as hw
from .sim import assert_history_reproduces, load_history

HISTORIES = Path(__file__).parent / "histories"


def _execution(doc: dict[str, Any], fn: Any) -> Execution:
    return Execution(fn, instance_id=doc["instance_id"], execution_id=doc["execution_id"], name=doc["name"])


def _replay(file: str, fn: Any) -> tuple[Execution, list[Event], list[Event]]:
    doc, events = load_history(HISTORIES / file)
    execution = _execution(doc, fn)
    execution.replay(events)
    return execution, events, execution.advance([], events[-1].recorded_at)


CLEAN = [
    ("fanout_with_limit.json", hw.fanout_with_limit),
    ("fanout_with_limit_running.json", hw.fanout_with_limit),
    ("timer_and_event.json", hw.timer_and_event),
    ("sub_orchestration.json", hw.with_children),
    ("continue_as_new.json", hw.counter),
    ("continue_as_new_last.json", hw.counter),
]


def test_every_saved_history_is_covered() -> None:
    covered = {f for f, _ in CLEAN} | {f for f, _, _ in CHANGED} | {f for f, _ in MALFORMED} | set(GRAPHS)
    assert covered >= {p.name for p in HISTORIES.glob("*.json")}


@pytest.mark.parametrize(("file", "fn"), CLEAN, ids=[f for f, _ in CLEAN])
def test_saved_history_replays_cleanly(file: str, fn: Any) -> None:
    doc, events = load_history(HISTORIES / file)
    assert doc["orchestration"] == fn.__name__
    assert_history_reproduces(lambda: _execution(doc, fn), events)


def test_saved_fanout_history_facts() -> None:
    execution, events, new = _replay("fanout_with_limit.json", hw.fanout_with_limit)
    assert new == []
    assert execution.outcome is not None and execution.outcome.data == {"output": sum(i * i for i in range(7))}
    assert execution.custom_status == {"done": 7}
    in_flight: set[int] = set()
    for e in events:  # the recorded history itself honours limit=3
        if e.kind == ev.ACTIVITY_SCHEDULED:
            in_flight.add(e.data["task_id"])
        elif e.kind == ev.ACTIVITY_COMPLETED:
            in_flight.remove(e.data["task_id"])
        assert len(in_flight) <= 3


def test_saved_running_history_resumes() -> None:
    execution, events, new = _replay("fanout_with_limit_running.json", hw.fanout_with_limit)
    assert new == [] and not execution.finished
    pending = {e.data["task_id"] for e in events if e.kind == ev.ACTIVITY_SCHEDULED} - {
        e.data["task_id"] for e in events if e.kind == ev.ACTIVITY_COMPLETED
    }
    now = events[-1].recorded_at
    out: list[Event] = []
    for task_id in sorted(pending):
        out += execution.advance([(ev.ACTIVITY_COMPLETED, {"task_id": task_id, "result": (task_id - 1) ** 2})], now)
    assert out[-1] == Event(ev.ORCHESTRATION_COMPLETED, {"output": 91}, now)


def test_saved_continue_as_new_carries_events() -> None:
    execution, events, new = _replay("continue_as_new.json", hw.counter)
    assert new == [] and execution.outcome == events[-1]
    assert events[-1].data == {
        "input": {"n": 2, "total": 1},
        "carry_over": [{"name": "tick", "data": i} for i in range(1, 4)],
    }


# -- code that changed under running instances ----------------------------------------------------
ISSUED = "but the code issued activity_scheduled"
CHANGED = [
    ("fanout_with_limit.json", hw.changed_fanout_renamed, f"'square' {ISSUED} 'square_v2'"),
    ("fanout_with_limit_running.json", hw.changed_fanout_renamed, "square_v2"),
    ("fanout_with_limit.json", hw.changed_fanout_extra_command, f"'square' {ISSUED} 'audit'"),
    ("sub_orchestration.json", hw.changed_children_dropped, "sub_orchestration_scheduled #2 ('child_fails')"),
    ("timer_and_event.json", hw.changed_timer_removed, "history records timer_created #2"),
]


@pytest.mark.parametrize(("file", "fn", "detail"), CHANGED, ids=[f"{f}-{fn.__name__}" for f, fn, _ in CHANGED])
def test_changed_code_fails_with_nondeterminism(file: str, fn: Any, detail: str) -> None:
    execution, events, new = _replay(file, fn)
    outcome = execution.outcome
    assert outcome is not None and outcome.kind == ev.ORCHESTRATION_FAILED
    error = outcome.data["error"]
    assert error["type"] == "NonDeterminismError"
    assert detail in error["message"]
    if events[-1].kind in ev.TERMINAL_KINDS:
        assert new == []  # an ended history gets nothing appended: the verdict is in `outcome`
    else:
        assert new == [outcome]  # a running instance is failed with the reason


def test_changed_code_is_detected_at_every_crash_point() -> None:
    doc, events = load_history(HISTORIES / "fanout_with_limit.json")
    for cut in range(2, len(events) + 1):
        execution = _execution(doc, hw.changed_fanout_renamed)
        execution.replay(events[:cut])
        assert execution.outcome is not None, cut
        assert execution.outcome.data["error"]["type"] == "NonDeterminismError"


# -- malformed files ---------------------------------------------------------------------------------
def _write_malformed(tmp: Path, name: str, mutate: Any) -> Path:
    doc = json.loads((HISTORIES / "fanout_with_limit.json").read_text())
    mutate(doc["events"])
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


MALFORMED = [
    ("malformed_unknown_kind.json", "unknown event kind 'activity_exploded'"),
    ("malformed_missing_task_id.json", "malformed history: activity_scheduled without a task_id"),
]


@pytest.mark.parametrize(("file", "detail"), MALFORMED, ids=[f for f, _ in MALFORMED])
def test_malformed_history_fails_cleanly(file: str, detail: str) -> None:
    execution, events, new = _replay(file, hw.fanout_with_limit)  # must not raise
    assert execution.outcome is not None and execution.outcome.kind == ev.ORCHESTRATION_FAILED
    error = execution.outcome.data["error"]
    assert error["type"] == "NonDeterminismError"
    assert detail in error["message"]


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (lambda es: es[5]["data"].pop("task_id"), "malformed history event 'activity_completed': it has no task_id"),
        (lambda es: es[5]["data"].update(task_id=42), "task #42, which was never scheduled"),
        (lambda es: es[1].update(kind="version_marker", data={"change_id": "x", "version": "two"}),
         "malformed history event 'version_marker'"),
        (lambda es: es[2]["data"].update(task_id="1"), "activity_scheduled without a task_id"),
        (lambda es: es.insert(3, {"seq": 0, "kind": "activity_failed", "data": {"task_id": 1, "attempts": "x"},
                                  "recorded_at": es[3]["recorded_at"]}), "malformed history event 'activity_failed'"),
    ],
    ids=["completion-without-task-id", "completion-of-unknown-task", "bad-version-marker", "string-task-id",
         "bad-attempts"],
)
def test_more_malformed_histories_fail_cleanly(tmp_path: Path, mutate: Any, detail: str) -> None:
    def renumber(events: list[dict[str, Any]]) -> None:
        mutate(events)
        for i, e in enumerate(events, start=1):
            e["seq"] = i

    path = _write_malformed(tmp_path, "bad.json", renumber)
    doc, events = load_history(path)
    execution = _execution(doc, hw.fanout_with_limit)
    execution.replay(events)  # must not raise
    assert execution.outcome is not None and execution.outcome.kind == ev.ORCHESTRATION_FAILED
    assert detail in execution.outcome.data["error"]["message"]


# -- a graph history recorded before node facts existed (schema 9 code) ---------------------------
GRAPHS = ["graph_before_facts.json"]


def _commands(events: list[Event]) -> list[tuple[str, Any, Any]]:
    """What the code decided (commands and the ending), without node facts or incoming messages."""
    return [(e.kind, e.data.get("task_id"), e.data.get("name")) for e in events
            if e.kind not in ev.MESSAGE_KINDS and e.kind not in ev.NOTE_KINDS]


def test_graph_history_from_before_node_facts_replays() -> None:
    """Today's interpreter replays it (semantics 1: the race's loser ran on), from every crash point.

    Resumed there, it records node facts from then on, and decides exactly what the old code did.
    """
    from pgdurable_async._graph.builtins import graph_orchestration

    doc, events = load_history(HISTORIES / "graph_before_facts.json")
    whole = _execution(doc, graph_orchestration)
    whole.replay(events)
    assert whole.outcome is not None and whole.outcome.kind == ev.ORCHESTRATION_COMPLETED
    assert whole.advance([], events[-1].recorded_at) == []
    for cut in [k for k in range(1, len(events)) if events[k].kind in ev.MESSAGE_KINDS]:  # between turns
        execution = _execution(doc, graph_orchestration)
        execution.replay(events[:cut])
        new: list[Event] = []
        for event in events[cut:]:
            if event.kind in ev.MESSAGE_KINDS:
                new += execution.advance([(event.kind, event.data)], event.recorded_at)
        recorded_tail = [e for e in events[cut:] if e.kind not in ev.MESSAGE_KINDS]
        assert _commands(new) == _commands(recorded_tail), cut
        assert all(e.kind != ev.VERSION_MARKER for e in new), cut  # it stays on the old semantics
        execution.close()
