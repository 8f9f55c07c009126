"""The invariant checker itself: silent on a sound run, loud on each kind of corruption."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.harness import (
    Snapshot,
    check_effects_exactly_once,
    check_final_states,
    check_no_duplicate_events,
    check_nothing_stranded,
    check_seq_gap_free,
)

CHECKS = (check_final_states, check_no_duplicate_events, check_seq_gap_free, check_effects_exactly_once,
          check_nothing_stranded)
ID = "probe-x"


def _sound() -> Snapshot:
    """A finished ``probe`` instance with two records, as a clean run leaves it."""
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("orchestration_started", {"name": "probe", "input": {}}),
        ("activity_scheduled", {"task_id": 1, "name": "record", "input": {}}),
        ("activity_scheduled", {"task_id": 2, "name": "record", "input": {}}),
        ("activity_completed", {"task_id": 1, "result": "a"}),
        ("activity_completed", {"task_id": 2, "result": "b"}),
        ("orchestration_completed", {"output": 2}),
    ]
    events = [{"seq": n, "event_type": k, "payload": p} for n, (k, p) in enumerate(kinds, start=1)]
    instance = {"instance_id": ID, "name": "probe", "status": "completed", "input": {"tag": ID, "records": 2},
                "output": 2, "error": None, "execution_id": 1, "history_len": len(events)}
    effects = [{"activity_id": f"{ID}:1:{t}", "worker_pid": 1} for t in (1, 2)]
    leftovers: dict[str, list[tuple[str, str]]] = {"work_queue": [], "timers": [], "orchestrator_queue": []}
    return Snapshot({ID: instance}, {(ID, 1): events}, effects, leftovers)


def _violations(snap: Snapshot) -> list[str]:
    return [v for check in CHECKS for v in check(snap, {ID})]


def test_sound_snapshot_has_no_violations() -> None:
    assert _violations(_sound()) == []


def _duplicate_completion(s: Snapshot) -> None:
    events = s.history[(ID, 1)]
    events.insert(4, {**events[3], "seq": 5})
    for n, e in enumerate(events, start=1):
        e["seq"] = n
    s.instances[ID]["history_len"] = len(events)


def _seq_gap(s: Snapshot) -> None:
    s.history[(ID, 1)][-1]["seq"] = 9


def _double_effect(s: Snapshot) -> None:
    s.effects.append(copy.copy(s.effects[0]))


def _lost_effect(s: Snapshot) -> None:
    s.effects.pop()


def _stranded_timer(s: Snapshot) -> None:
    s.leftovers["timers"].append((ID, "timer task 3"))


def _wrong_output(s: Snapshot) -> None:
    s.instances[ID]["output"] = 3


def _two_terminals(s: Snapshot) -> None:
    events = s.history[(ID, 1)]
    events.append({"seq": len(events) + 1, "event_type": "orchestration_failed", "payload": {}})
    s.instances[ID]["history_len"] = len(events)


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (_duplicate_completion, "recorded 2 times"),
        (_seq_gap, "seq is not"),
        (_double_effect, "applied 2 times"),
        (_lost_effect, "effect is missing"),
        (_stranded_timer, "stranded in timers"),
        (_wrong_output, "!= expected"),
        (_two_terminals, "2 terminal events"),
    ],
)
def test_each_corruption_is_reported(corrupt: Callable[[Snapshot], None], needle: str) -> None:
    snap = _sound()
    corrupt(snap)
    found = _violations(snap)
    assert any(needle in v for v in found), found
