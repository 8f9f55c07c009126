"""The invariant checker itself: silent on a sound run, loud on each kind of corruption.

A check that cannot fail is a defect, so each check is fed a synthetic snapshot
with one corruption and must report it.  The plan is checked too: a seed gives
the same plan every time (a run can be replayed).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos import chaos_app
from tests.chaos.checker import Expected, Snapshot, delivered_count, violations
from tests.chaos.harness import PRESETS, SEED_ENV, make_plan, pick_seed, refused_at_startup

ID = "probe-x"
LOOP = "loop-x"
MSG = f"{ID}/msg-0"
TICKS = [f"{LOOP}/tick-0", f"{LOOP}/tick-1"]


def _events(*kinds: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"seq": n, "event_type": k, "payload": p} for n, (k, p) in enumerate(kinds, start=1)]


def _received(name: str, key: str, n: int) -> tuple[str, dict[str, Any]]:
    return ("event_received", {"name": name, "data": chaos_app.message(key, n)})


def _sound() -> tuple[Snapshot, Expected]:
    """As a clean run leaves them: a ``probe`` with two records and one event, and a looper-like
    instance whose first execution got both ticks and carried the unconsumed one over."""
    steps = [{"key": f"{ID}/rec-{i}", "fail_first": i == 0, "hold": 0} for i in range(2)]
    probe = _events(
        ("orchestration_started", {"name": "probe", "input": {}}),
        ("activity_scheduled", {"task_id": 1, "name": "record", "input": steps[0]}),
        ("activity_scheduled", {"task_id": 2, "name": "record", "input": steps[1]}),
        _received("msg", MSG, 0),
        ("activity_completed", {"task_id": 1, "result": steps[0]["key"]}),
        ("activity_completed", {"task_id": 2, "result": steps[1]["key"]}),
        ("orchestration_completed", {"output": 2}),
    )
    carried = {"name": "tick", "data": chaos_app.message(TICKS[1], 1)}
    loop_1 = _events(
        ("orchestration_started", {"name": "looper", "input": {}}),
        _received("tick", TICKS[0], 0),
        _received("tick", TICKS[1], 1),
        ("continued_as_new", {"input": {}, "carry_over": [carried]}),
    )
    loop_2 = _events(
        ("orchestration_started", {"name": "looper", "input": {}}),
        ("event_received", carried),
        ("orchestration_completed", {"output": {}}),
    )
    probe_input = {"tag": ID, "records": 2, "hold": 0}
    loop_input = {"tag": LOOP, "left": 0, "acc": 5, "got": [0]}
    instances: dict[str, dict[str, Any]] = {
        ID: {"instance_id": ID, "name": "probe", "status": "completed", "input": probe_input, "output": 2,
             "error": None, "execution_id": 1, "history_len": len(probe)},
        LOOP: {"instance_id": LOOP, "name": "looper", "status": "completed", "input": loop_input,
               "output": {"acc": 6, "ticks": [0, 1]}, "error": None, "execution_id": 2, "history_len": len(loop_2)},
    }
    effects = [{"activity_id": f"{ID}:1:{t}", "key": steps[t - 1]["key"], "attempt": 2 - (t - 1), "worker_pid": 1}
               for t in (1, 2)]
    snap = Snapshot(
        instances, {(ID, 1): probe, (LOOP, 1): loop_1, (LOOP, 2): loop_2}, effects,
        {"work_queue": [], "timers": [], "orchestrator_queue": []},
        counters={s["key"]: 1 for s in steps},
        deliveries={(ID, MSG), *((LOOP, t) for t in TICKS)},
    )
    want = Expected(
        instances={ID: "probe", LOOP: "looper"}, inputs={ID: probe_input},
        events={ID: {MSG: ("msg", chaos_app.message(MSG, 0))},
                LOOP: {t: ("tick", chaos_app.message(t, n)) for n, t in enumerate(TICKS)}},
    )
    return snap, want


def test_sound_snapshot_has_no_violations() -> None:
    snap, want = _sound()
    assert violations(snap, want) == []
    assert delivered_count(snap) == 3  # the carried-over tick is one delivery, not two


def _renumber(events: list[dict[str, Any]]) -> None:
    for n, e in enumerate(events, start=1):
        e["seq"] = n


def _add(s: Snapshot, instance: str, execution: int, at: int, event: tuple[str, dict[str, Any]]) -> None:
    events = s.history[(instance, execution)]
    events.insert(at, {"seq": 0, "event_type": event[0], "payload": event[1]})
    _renumber(events)
    if s.instances[instance]["execution_id"] == execution:
        s.instances[instance]["history_len"] = len(events)


def _remove(s: Snapshot, instance: str, execution: int, kind: str) -> None:
    events = s.history[(instance, execution)]
    events.remove(next(e for e in events if e["event_type"] == kind))
    _renumber(events)
    if s.instances[instance]["execution_id"] == execution:
        s.instances[instance]["history_len"] = len(events)


# -- corruptions: (snapshot, plan) -> None ---------------------------------------------------------------------
Corruption = Callable[[Snapshot, Expected], None]


def _duplicate_completion(s: Snapshot, w: Expected) -> None:
    _add(s, ID, 1, 5, ("activity_completed", {"task_id": 1, "result": "x"}))


def _seq_gap(s: Snapshot, w: Expected) -> None:
    s.history[(ID, 1)][-1]["seq"] = 9


def _double_effect(s: Snapshot, w: Expected) -> None:
    s.effects.append(copy.copy(s.effects[0]))


def _lost_effect(s: Snapshot, w: Expected) -> None:
    s.effects.pop()


def _double_counter(s: Snapshot, w: Expected) -> None:  # the upsert ran twice: a doubled effect
    s.counters[f"{ID}/rec-1"] = 2


def _lost_counter(s: Snapshot, w: Expected) -> None:
    del s.counters[f"{ID}/rec-0"]


def _stray_counter(s: Snapshot, w: Expected) -> None:
    s.counters["nobody/rec-9"] = 1


def _effect_of_rolled_back_attempt(s: Snapshot, w: Expected) -> None:
    s.effects[0]["attempt"] = 1  # attempt 1 of a fail_first step raised: its effect must be gone


def _effect_under_wrong_key(s: Snapshot, w: Expected) -> None:
    s.effects[1]["key"] = f"{ID}/rec-0"


def _stranded_timer(s: Snapshot, w: Expected) -> None:
    s.leftovers["timers"].append((ID, "timer task 3"))


def _wrong_output(s: Snapshot, w: Expected) -> None:
    s.instances[ID]["output"] = 3


def _two_terminals(s: Snapshot, w: Expected) -> None:
    _add(s, ID, 1, len(s.history[(ID, 1)]), ("orchestration_failed", {}))


def _duplicate_event(s: Snapshot, w: Expected) -> None:  # the same raise delivered twice
    _add(s, ID, 1, 4, _received("msg", MSG, 0))


def _missing_event(s: Snapshot, w: Expected) -> None:  # a raise that returned but left nothing
    _remove(s, ID, 1, "event_received")


def _duplicate_after_carry_over(s: Snapshot, w: Expected) -> None:  # carried, and also delivered again
    _add(s, LOOP, 2, 2, _received("tick", TICKS[1], 1))


def _lost_carry_over(s: Snapshot, w: Expected) -> None:  # continue-as-new dropped an unconsumed event
    _remove(s, LOOP, 2, "event_received")


def _carried_twice(s: Snapshot, w: Expected) -> None:  # delivered to execution 1, then again to 2
    s.history[(LOOP, 1)][-1]["payload"]["carry_over"] = []


def _event_never_raised(s: Snapshot, w: Expected) -> None:
    _add(s, ID, 1, 4, _received("msg", f"{ID}/msg-7", 7))


def _event_without_key(s: Snapshot, w: Expected) -> None:
    _add(s, ID, 1, 4, ("event_received", {"name": "msg", "data": "no key"}))


def _event_with_other_data(s: Snapshot, w: Expected) -> None:
    s.history[(ID, 1)][3]["payload"]["data"] = chaos_app.message(MSG, 5)


def _no_delivery_row(s: Snapshot, w: Expected) -> None:
    s.deliveries.discard((ID, MSG))


def _missing_planned_instance(s: Snapshot, w: Expected) -> None:  # started in the plan, nowhere in the database
    w.instances["mixed-1-0007"] = "mixed"


def _missing_instance(s: Snapshot, w: Expected) -> None:  # it existed once, and its row is gone
    del s.instances[LOOP]
    del s.history[(LOOP, 1)], s.history[(LOOP, 2)]


def _unexpected_instance(s: Snapshot, w: Expected) -> None:
    del w.instances[ID], w.inputs[ID]


def _other_input(s: Snapshot, w: Expected) -> None:  # a start "retried" under the wrong id or input
    s.instances[ID]["input"] = {**s.instances[ID]["input"], "hold": 1}


def _other_orchestration(s: Snapshot, w: Expected) -> None:
    w.instances[LOOP] = "leaf"


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (_duplicate_completion, "recorded 2 times"),
        (_seq_gap, "seq is not"),
        (_double_effect, "applied 2 times"),
        (_lost_effect, "effect is missing"),
        (_double_counter, f"counter {ID}/rec-1 is 2"),
        (_lost_counter, f"counter {ID}/rec-0 is 0"),
        (_stray_counter, "no record with that key completed"),
        (_effect_of_rolled_back_attempt, "its rollback was lost"),
        (_effect_under_wrong_key, "has key"),
        (_stranded_timer, "stranded in timers"),
        (_wrong_output, "!= expected"),
        (_two_terminals, "2 terminal events"),
        (_duplicate_event, f"event {MSG} delivered 2 times"),
        (_missing_event, f"event {MSG} raised but never delivered"),
        (_duplicate_after_carry_over, f"event {TICKS[1]} delivered 2 times"),
        (_lost_carry_over, f"carried-over event {TICKS[1]} not delivered"),
        (_carried_twice, f"event {TICKS[1]} delivered 2 times"),
        (_event_never_raised, "delivered but never raised"),
        (_event_without_key, "without a key"),
        (_event_with_other_data, f"event {MSG} arrived as"),
        (_no_delivery_row, "no event_deliveries row"),
        (_missing_planned_instance, "mixed-1-0007: planned (mixed) but missing"),
        (_missing_instance, f"{LOOP}: planned (looper) but missing"),
        (_unexpected_instance, "unexpected instance"),
        (_other_input, "is not the planned one"),
        (_other_orchestration, "planned 'leaf'"),
    ],
)
def test_each_corruption_is_reported(corrupt: Corruption, needle: str) -> None:
    snap, want = _sound()
    corrupt(snap, want)
    found = violations(snap, want)
    assert any(needle in v for v in found), found


def test_missing_instance_also_loses_its_events() -> None:
    snap, want = _sound()
    _missing_instance(snap, want)
    found = violations(snap, want)
    assert sum(f"event {t} raised but never delivered" in v for t in TICKS for v in found) == 2, found


# -- the plan ----------------------------------------------------------------------------------------------
def test_plan_is_a_function_of_the_seed() -> None:
    cfg = PRESETS["short"]
    assert make_plan(cfg, 7) == make_plan(cfg, 7)
    assert make_plan(cfg, 7) != make_plan(cfg, 8)
    roots, faults = make_plan(cfg, 7)
    assert len(roots) == cfg.instances and all(r.tag.startswith("mixed-7-") for r in roots)
    kinds = [f.kind for f in faults]
    assert (kinds.count("kill"), kinds.count("pg_crash"), kinds.count("pg_restart"), kinds.count("listen_kill")) == (
        cfg.kills, cfg.pg_crashes, cfg.pg_restarts, cfg.listen_kills)


def test_plan_expects_every_instance_and_event_it_raises() -> None:
    roots, _ = make_plan(dataclasses.replace(PRESETS["short"], instances=3), 11)
    want = Expected()
    for root in roots:
        want.add_root(root.spec)
    for root in roots:
        assert want.instances[root.tag] == "mixed" and want.inputs[root.tag] == root.spec
        assert set(chaos_app.expected_children(root.spec)) <= set(want.instances)
        raised = {d.key: (d.instance_id, d.name, d.data) for d in [*root.msgs, root.close, *root.ticks]}
        planned = {key: (instance_id, *event) for instance_id, events in want.events.items()
                   for key, event in events.items() if key.startswith(f"{root.tag}/")}
        assert raised == planned
        assert len(root.msgs) == root.spec["inbox"] and len(root.ticks) == root.spec["looper"]["left"] + 1


def test_seed_is_random_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SEED_ENV, raising=False)
    assert len({pick_seed() for _ in range(5)}) > 1
    assert pick_seed(42) == 42
    monkeypatch.setenv(SEED_ENV, "99")
    assert pick_seed() == 99 and pick_seed(42) == 42


def test_only_a_worker_refused_at_startup_during_an_outage_is_excused() -> None:
    refused = "2026-12-01 INFO starting\nerror: cannot reach PostgreSQL: [Errno 111] Connect call failed\n"
    outage = [(10.0, 12.0)]
    assert refused_at_startup(refused, 1, spawned=9.0, outages=outage)
    assert refused_at_startup(refused, 1, spawned=11.0, outages=[(10.0, None)])  # still down
    assert not refused_at_startup(refused, 1, spawned=13.0, outages=outage)  # spawned after it: no excuse
    assert not refused_at_startup(refused, 1, spawned=9.0, outages=[])
    ready = "worker vm:1:ab ready: 5 orchestrations\n" + refused  # it had started: it must ride faults out
    assert not refused_at_startup(ready, 1, spawned=9.0, outages=outage)
    assert not refused_at_startup("Traceback ...\nKeyError: 'x'\n", 1, spawned=9.0, outages=outage)
    assert not refused_at_startup(refused, -9, spawned=9.0, outages=outage)
