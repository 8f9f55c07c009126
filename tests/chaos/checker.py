"""The chaos run's invariants: a snapshot of the database, what the plan expects, one check per invariant.

Each ``check_*`` function takes the :class:`Snapshot` read after the run and the
:class:`Expected` state derived from the driver's plan (not from what the driver
saw happen), and returns one line per violation.  ``test_checker.py`` feeds them
synthetic snapshots: every check must be able to fail.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from tests.chaos import chaos_app

TERMINAL = ("completed", "failed", "cancelled", "terminated")
TASK_EVENTS = frozenset({
    "activity_scheduled", "activity_completed", "activity_failed", "timer_created", "timer_fired",
    "sub_orchestration_scheduled", "sub_orchestration_completed", "sub_orchestration_failed",
})
TERMINAL_EVENTS = frozenset({
    "orchestration_completed", "orchestration_failed", "orchestration_cancelled", "orchestration_terminated",
    "continued_as_new",
})
STRANDED_COUNT = """
SELECT (SELECT count(*) FROM pgdurable.work_queue) + (SELECT count(*) FROM pgdurable.timers)
     + (SELECT count(*) FROM pgdurable.orchestrator_queue) AS n
"""
Row = Mapping[str, Any]


@dataclass
class Snapshot:
    """Everything the invariants read, loaded once after the run."""

    instances: dict[str, Row]
    history: dict[tuple[str, int], list[Row]]
    effects: list[Row]  # public.chaos_effects rows
    leftovers: dict[str, list[tuple[str, str]]]  # table -> (instance_id, what)
    counters: dict[str, int] = field(default_factory=dict)  # public.chaos_counters: key -> n
    deliveries: set[tuple[str, str]] = field(default_factory=set)  # pgdurable.event_deliveries rows

    @classmethod
    async def load(cls, conn: asyncpg.Connection) -> Snapshot:
        """Read the snapshot through ``conn`` (with json/jsonb decoded)."""
        instances = {r["instance_id"]: r for r in await conn.fetch("SELECT * FROM pgdurable.instances")}
        history: dict[tuple[str, int], list[Row]] = defaultdict(list)
        for r in await conn.fetch("SELECT * FROM pgdurable.history ORDER BY instance_id, execution_id, seq"):
            history[(r["instance_id"], r["execution_id"])].append(r)
        effects = list(await conn.fetch("SELECT * FROM public.chaos_effects"))
        counters = {r["key"]: r["n"] for r in await conn.fetch("SELECT key, n FROM public.chaos_counters")}
        deliveries = {(r["instance_id"], r["delivery_key"])
                      for r in await conn.fetch("SELECT * FROM pgdurable.event_deliveries")}
        leftovers = {
            "work_queue": [(r["instance_id"], f"task {r['task_id']} {r['name']}") for r in
                           await conn.fetch("SELECT * FROM pgdurable.work_queue")],
            "timers": [(r["instance_id"], f"timer task {r['task_id']}") for r in
                       await conn.fetch("SELECT * FROM pgdurable.timers")],
            "orchestrator_queue": [(r["instance_id"], f"message {r['kind']}") for r in
                                   await conn.fetch("SELECT * FROM pgdurable.orchestrator_queue")],
        }
        return cls(instances, dict(history), effects, leftovers, counters, deliveries)

    def executions(self, instance_id: str) -> list[list[Row]]:
        """The histories of an instance's executions, oldest first (an absent one is empty)."""
        last = max((e for (i, e) in self.history if i == instance_id), default=0)
        return [self.history.get((instance_id, e), []) for e in range(1, last + 1)]


@dataclass
class Expected:
    """What the driver's plan says must exist after the run, whatever the faults did."""

    instances: dict[str, str] = field(default_factory=dict)  # instance id -> orchestration name
    inputs: dict[str, Any] = field(default_factory=dict)  # instance id -> its planned input (roots and probes)
    events: dict[str, dict[str, tuple[str, Any]]] = field(default_factory=dict)  # id -> key -> (name, data)

    def add_root(self, spec: dict[str, Any]) -> None:
        """A planned ``mixed`` instance: itself, its children and every event the driver raises for it."""
        self.instances[spec["tag"]] = "mixed"
        self.inputs[spec["tag"]] = spec
        self.instances.update(chaos_app.expected_children(spec))
        for instance_id, events in chaos_app.planned_events(spec).items():
            self.events.setdefault(instance_id, {}).update(events)

    def add_probe(self, spec: dict[str, Any]) -> None:
        self.instances[spec["tag"]] = "probe"
        self.inputs[spec["tag"]] = spec


def _canonical(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def check_final_states(snap: Snapshot, want: Expected) -> list[str]:
    """Every planned instance exists (started or not by the driver's reckoning), completed, with the
    orchestration, input and output the plan implies; no other instance exists."""
    out = []
    for instance_id in sorted(set(want.instances) - set(snap.instances)):
        out.append(f"{instance_id}: planned ({want.instances[instance_id]}) but missing")
    for instance_id in sorted(set(snap.instances) - set(want.instances)):
        out.append(f"{instance_id}: unexpected instance")
    for instance_id, row in sorted(snap.instances.items()):
        name = want.instances.get(instance_id)
        if name is not None and row["name"] != name:
            out.append(f"{instance_id}: orchestration {row['name']!r}, planned {name!r}")
            continue
        if instance_id in want.inputs and row["execution_id"] == 1 and row["input"] != _canonical(
                want.inputs[instance_id]):
            out.append(f"{instance_id}: input {row['input']!r} is not the planned one")
        if row["status"] != "completed":
            out.append(f"{instance_id}: status {row['status']} (error {row['error']})")
            continue
        expected = _canonical(chaos_app.expected_output(row["name"], row["input"]))
        if row["output"] != expected:
            out.append(f"{instance_id}: output {row['output']!r} != expected {expected!r}")
    return out


def check_no_duplicate_events(snap: Snapshot, want: Expected) -> list[str]:
    """A task event appears once per (instance, execution, kind, task_id); one terminal event, last."""
    out = []
    for (instance_id, execution_id), events in snap.history.items():
        seen: Counter[tuple[str, int]] = Counter(
            (e["event_type"], e["payload"]["task_id"]) for e in events if e["event_type"] in TASK_EVENTS)
        for (kind, task_id), n in seen.items():
            if n > 1:
                out.append(f"{instance_id}#{execution_id}: {kind} task {task_id} recorded {n} times")
        terminal = [e for e in events if e["event_type"] in TERMINAL_EVENTS]
        if len(terminal) != 1:
            out.append(f"{instance_id}#{execution_id}: {len(terminal)} terminal events")
        elif terminal[0] is not events[-1]:
            out.append(f"{instance_id}#{execution_id}: events after the terminal {terminal[0]['event_type']}")
    return out


def _event_key(event: Row) -> str | None:
    data = event["payload"].get("data")
    return data.get("key") if isinstance(data, dict) else None


def delivered_events(snap: Snapshot, instance_id: str) -> tuple[Counter[str], list[str]]:
    """How often each raised event (by key) reached ``instance_id`` from a client, and what went wrong.

    An ``event_received`` in execution k+1 that execution k's ``continued_as_new`` carried over (an
    event nobody had consumed) is the same delivery, not a new one; a carried event that is not in
    the next execution is lost.
    """
    fresh: Counter[str] = Counter()
    problems: list[str] = []
    carried: Counter[str] = Counter()
    for number, events in enumerate(snap.executions(instance_id), start=1):
        for e in events:
            if e["event_type"] != "event_received":
                continue
            key = _event_key(e)
            if key is None:
                problems.append(f"{instance_id}#{number}: event {e['payload'].get('name')!r} without a key")
            elif carried[key] > 0:
                carried[key] -= 1
            else:
                fresh[key] += 1
        problems += [f"{instance_id}#{number}: carried-over event {key} not delivered to execution {number}"
                     for key, n in sorted(carried.items()) if n > 0]
        carried = Counter()
        for e in events:
            if e["event_type"] == "continued_as_new":
                for item in e["payload"].get("carry_over") or []:
                    data = item.get("data")
                    carried[data.get("key") if isinstance(data, dict) else "?"] += 1
    return fresh, problems


def check_events_exactly_once(snap: Snapshot, want: Expected) -> list[str]:
    """Every event the plan raises (each with an idempotency key, retried on errors, sometimes re-sent
    on purpose) is in history exactly once, with its data; no other raised event is; and its key is
    recorded in ``event_deliveries``."""
    out = []
    for instance_id in sorted(set(want.events) | {i for (i, _) in snap.history}):
        planned = want.events.get(instance_id, {})
        fresh, problems = delivered_events(snap, instance_id)
        out += problems
        for key, n in sorted(fresh.items()):
            if key not in planned:
                out.append(f"{instance_id}: event {key} delivered but never raised")
            elif n > 1:
                out.append(f"{instance_id}: event {key} delivered {n} times")
        out += [f"{instance_id}: event {key} raised but never delivered" for key in sorted(set(planned) - set(fresh))]
        for events in snap.executions(instance_id):
            for e in events:
                key = _event_key(e)
                if e["event_type"] == "event_received" and key in planned:
                    name, data = planned[key]
                    if e["payload"].get("name") != name or e["payload"].get("data") != _canonical(data):
                        out.append(f"{instance_id}: event {key} arrived as {e['payload']!r}")
        out += [f"{instance_id}: event {key} has no event_deliveries row"
                for key in sorted(planned) if (instance_id, key) not in snap.deliveries]
    return out


def delivered_count(snap: Snapshot) -> int:
    """Distinct raised events found in history (for the summary line)."""
    return sum(len(delivered_events(snap, i)[0]) for i in {i for (i, _) in snap.history})


def check_seq_gap_free(snap: Snapshot, want: Expected) -> list[str]:
    """``seq`` runs 1..n in every execution; n is the current execution's ``history_len``."""
    out = []
    for (instance_id, execution_id), events in snap.history.items():
        seqs = [e["seq"] for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            out.append(f"{instance_id}#{execution_id}: seq is not 1..{len(seqs)}")
        row = snap.instances.get(instance_id)
        if row is not None and row["execution_id"] == execution_id and row["history_len"] != len(seqs):
            out.append(f"{instance_id}#{execution_id}: history_len {row['history_len']} but {len(seqs)} events")
    for instance_id, row in snap.instances.items():
        for execution_id in range(1, row["execution_id"] + 1):
            if (instance_id, execution_id) not in snap.history:
                out.append(f"{instance_id}#{execution_id}: no history")
    return out


def check_effects_exactly_once(snap: Snapshot, want: Expected) -> list[str]:
    """Each completed ``record`` (a transactional activity) left exactly one effect row and a counter
    of 1 under its own key, from an attempt that did not roll back; nothing else left any effect."""
    completed: dict[str, dict[str, Any]] = {}  # activity id -> the step it was scheduled with
    for (instance_id, execution_id), events in snap.history.items():
        records = {e["payload"]["task_id"]: e["payload"].get("input") or {} for e in events
                   if e["event_type"] == "activity_scheduled" and e["payload"]["name"] == "record"}
        for e in events:
            if e["event_type"] == "activity_completed" and e["payload"]["task_id"] in records:
                completed[f"{instance_id}:{execution_id}:{e['payload']['task_id']}"] = records[e["payload"]["task_id"]]
    applied = Counter(e["activity_id"] for e in snap.effects)
    out = [f"effect of {a} applied {n} times" for a, n in sorted(applied.items()) if n != 1]
    out += [f"effect of {a} applied but its completion is not in history"
            for a in sorted(set(applied) - set(completed))]
    out += [f"record {a} completed but its effect is missing" for a in sorted(set(completed) - set(applied))]
    for e in snap.effects:
        step = completed.get(e["activity_id"])
        if step is None:
            continue
        if "key" in step and e["key"] != step["key"]:
            out.append(f"effect of {e['activity_id']} has key {e['key']!r}, its step {step['key']!r}")
        if step.get("fail_first") and e["attempt"] == 1:
            out.append(f"effect of {e['activity_id']} from attempt 1, which raised: its rollback was lost")
    keys = Counter(step["key"] for step in completed.values() if "key" in step)
    out += [f"record key {k} completed {n} times" for k, n in sorted(keys.items()) if n != 1]
    out += [f"counter {k} is {snap.counters.get(k, 0)} after its one completed record"
            for k in sorted(keys) if snap.counters.get(k, 0) != 1]
    out += [f"counter {k} is {n} but no record with that key completed"
            for k, n in sorted(snap.counters.items()) if k not in keys]
    return out


def check_nothing_stranded(snap: Snapshot, want: Expected) -> list[str]:
    """No work item, timer or message is left for a finished instance."""
    out = []
    for table, rows in snap.leftovers.items():
        for instance_id, what in rows:
            row = snap.instances.get(instance_id)
            if row is None or row["status"] in TERMINAL:
                out.append(f"stranded in {table}: {instance_id} {what}")
    return out


CHECKS: tuple[Callable[[Snapshot, Expected], list[str]], ...] = (
    check_final_states, check_no_duplicate_events, check_events_exactly_once, check_seq_gap_free,
    check_effects_exactly_once, check_nothing_stranded,
)


def violations(snap: Snapshot, want: Expected) -> list[str]:
    """Every check's findings, in order."""
    return [line for check in CHECKS for line in check(snap, want)]
