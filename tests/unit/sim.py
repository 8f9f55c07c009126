"""A deterministic stand-in for the database and the workers, for one instance.

:class:`Sim` drives the pure replay engine the way a runtime does: it feeds
``orchestration_started``, runs every ``activity_scheduled`` through a plain
Python function (a raise is a failure, retried per the recorded policy), fires
timers (moving its clock to their ``fire_at``), delivers raised events and
cancel requests, runs child orchestrations (a nested :class:`Sim` when the
child is an ``async def``), and follows ``continue_as_new``.  Which pending
messages go into the next turn, and how many, is configurable: ``fifo`` (by due
time: a timer's ``fire_at``, else when the message was produced; the realistic
order), ``lifo`` (the reverse) or ``random`` (seeded), up to ``batch`` messages
per ``advance``.

Every turn is kept (messages in, time, events out), so the tests can replay any
prefix and check the engine produces exactly the same events again.  With
``cached=False`` each turn is run the stateless way: a fresh ``Execution``
replays the history so far, then advances.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgdurable_async._base import events as ev
from pgdurable_async._base.definitions import DEFAULT_RETRY
from pgdurable_async._base.events import error_payload
from pgdurable_async._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, normalize
from pgdurable_async._base.types import RetryPolicy
from pgdurable_async._engine.execution import Event, Execution, OrchestrationFn

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TICK = timedelta(seconds=1)
Message = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Turn:
    """One ``advance`` call: the messages fed in, the time, and the events it returned."""

    messages: list[Message]
    now: datetime
    events: list[Event]


@dataclass(frozen=True)
class Raise:
    """An event raised from outside, available once ``after_turn`` turns have run."""

    name: str
    data: Any = None
    after_turn: int = 0


@dataclass(frozen=True)
class Cancel:
    """A cancel request, available once ``after_turn`` turns have run."""

    reason: Any = None
    after_turn: int = 0


@dataclass
class _Pending:
    seq: int
    kind: str
    data: dict[str, Any]
    after_turn: int = 0
    fire_at: datetime | None = None
    due: datetime = T0  # when it would arrive: a timer's fire_at, else when it was produced


@dataclass
class ExecutionRun:
    """The turns of one execution (one generation of the instance)."""

    execution_id: int
    input: Any
    turns: list[Turn] = field(default_factory=list)

    @property
    def history(self) -> list[Event]:
        return [e for t in self.turns for e in t.events]


class StuckError(AssertionError):
    """The orchestration waits for something the simulation will never deliver."""


class Sim:
    """Plays database and workers for one instance; see the module docstring."""

    def __init__(
        self,
        fn: OrchestrationFn,
        input: Any = None,
        *,
        activities: dict[str, Callable[[Any], Any]] | None = None,
        children: dict[str, Callable[..., Any]] | None = None,
        raises: Iterable[Raise] = (),
        cancel: Cancel | None = None,
        order: str = "fifo",
        seed: int = 0,
        batch: int | None = 1,
        cached: bool = True,
        instance_id: str = "sim-1",
        name: str = "orch",
        start: datetime = T0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        follow_continue_as_new: bool = True,
        max_turns: int = 10_000,
    ) -> None:
        if order not in ("fifo", "lifo", "random"):
            raise ValueError(f"unknown order {order!r}")
        self.fn = fn
        self.activities = activities or {}
        self.children = children or {}
        self.order = order
        self.rng = random.Random(seed)
        self.batch = batch
        self.cached = cached
        self.instance_id = instance_id
        self.name = name
        self.clock = start
        self.max_payload_bytes = max_payload_bytes
        self.follow_continue_as_new = follow_continue_as_new
        self.max_turns = max_turns
        self.runs: list[ExecutionRun] = []
        self.execution: Execution | None = None
        self.activity_calls: list[tuple[str, Any]] = []
        self._seq = 0
        self._turns_done = 0
        self._pending: list[_Pending] = []
        self._outside: list[_Pending] = []  # raised events and cancels: they outlive an execution
        self._input = normalize(input)
        for r in raises:
            self._outside.append(self._make(ev.EVENT_RECEIVED, {"name": r.name, "data": r.data}, r.after_turn))
        if cancel is not None:
            self._outside.append(self._make(ev.CANCEL_REQUESTED, {"reason": cancel.reason}, cancel.after_turn))

    # -- results -------------------------------------------------------------
    @property
    def current(self) -> ExecutionRun:
        return self.runs[-1]

    @property
    def history(self) -> list[Event]:
        """The full history of the last execution."""
        return self.current.history

    @property
    def turns(self) -> list[Turn]:
        return self.current.turns

    @property
    def outcome(self) -> Event:
        last = self.history[-1]
        assert last.kind in ev.TERMINAL_KINDS, f"not finished: last event is {last.kind}"
        return last

    @property
    def output(self) -> Any:
        assert self.outcome.kind == ev.ORCHESTRATION_COMPLETED, self.outcome
        return self.outcome.data["output"]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.history]

    # -- driving ---------------------------------------------------------------
    def new_execution(self, execution_id: int) -> Execution:
        return Execution(
            self.fn,
            instance_id=self.instance_id,
            execution_id=execution_id,
            name=self.name,
            max_payload_bytes=self.max_payload_bytes,
        )

    def run(self, *, until_turn: int | None = None) -> Sim:
        """Run turns until the instance ends (or ``until_turn`` turns have run)."""
        if not self.runs:
            self._begin(1, self._input, [])
        while until_turn is None or self._turns_done < until_turn:
            if self._ended():
                if not self._continue():
                    break
                continue
            if self._turns_done >= self.max_turns:
                raise StuckError(f"still running after {self.max_turns} turns")
            picked = self._pick()
            if not picked:
                raise StuckError(f"nothing left to deliver; history ends with {self.kinds()[-3:]}")
            self.step([(p.kind, p.data) for p in picked], fire_at=[p.fire_at for p in picked if p.fire_at])
        return self

    def step(self, messages: Sequence[Message], *, fire_at: Sequence[datetime] = ()) -> list[Event]:
        """One turn with exactly these messages."""
        self.clock = max([self.clock + TICK, *fire_at])
        run = self.current
        if self.cached:
            assert self.execution is not None
            events = self.execution.advance(list(messages), self.clock)
        else:
            fresh = self.new_execution(run.execution_id)
            fresh.replay(run.history)
            events = fresh.advance(list(messages), self.clock)
            fresh.close()  # the stateless way: this Execution is dropped after its turn
            self.execution = fresh
        run.turns.append(Turn(list(messages), self.clock, events))
        self._turns_done += 1
        for event in events:
            self._react(event)
        return events

    def close(self) -> None:
        """Release the current execution's coroutines (a run stopped before the end)."""
        if self.execution is not None:
            self.execution.close()

    def _ended(self) -> bool:
        return bool(self.history) and self.history[-1].kind in ev.TERMINAL_KINDS

    def _begin(self, execution_id: int, input: Any, carried: list[dict[str, Any]]) -> None:
        self.close()
        self.runs.append(ExecutionRun(execution_id, input))
        self.execution = self.new_execution(execution_id)
        self._pending = [self._make(ev.ORCHESTRATION_STARTED, {"name": self.name, "input": input})]
        self._pending += [self._make(ev.EVENT_RECEIVED, dict(c)) for c in carried]

    def _continue(self) -> bool:
        last = self.outcome
        if last.kind != ev.CONTINUED_AS_NEW or not self.follow_continue_as_new:
            return False
        self._begin(self.current.execution_id + 1, last.data.get("input"), list(last.data.get("carry_over") or []))
        return True

    def _make(self, kind: str, data: dict[str, Any], after_turn: int = 0, fire_at: datetime | None = None) -> _Pending:
        self._seq += 1
        return _Pending(self._seq, kind, data, after_turn, fire_at, fire_at or self.clock)

    def _pick(self) -> list[_Pending]:
        pool = self._pending + self._outside
        if not pool:
            return []
        ready = [p for p in pool if p.after_turn <= self._turns_done]
        if not ready:  # nothing else can happen: time passes until the next outside input
            first = min(p.after_turn for p in pool)
            ready = [p for p in pool if p.after_turn == first]
        ready.sort(key=lambda p: (p.due, p.seq))
        start = next((p for p in ready if p.kind == ev.ORCHESTRATION_STARTED), None)
        rest = [p for p in ready if p is not start]
        size = len(ready) if self.batch is None else min(self.batch, len(ready))
        if self.order == "random":
            size = self.rng.randint(1, size)
        picked = [start, *self._choose(rest, size - 1)] if start is not None else self._choose(rest, size)
        for p in picked:
            (self._pending if p in self._pending else self._outside).remove(p)
        return picked

    def _choose(self, items: list[_Pending], n: int) -> list[_Pending]:
        if n <= 0:
            return []
        if self.order == "fifo":
            return items[:n]
        if self.order == "lifo":
            return items[::-1][:n]
        return self.rng.sample(items, n)

    # -- the "workers" -----------------------------------------------------------
    def _react(self, event: Event) -> None:
        data = event.data
        if event.kind == ev.ACTIVITY_SCHEDULED:
            self._pending.append(self._make(*self._run_activity(data)))
        elif event.kind == ev.TIMER_CREATED:
            fire_at = datetime.fromisoformat(data["fire_at"])
            self._pending.append(self._make(ev.TIMER_FIRED, {"task_id": data["task_id"]}, fire_at=fire_at))
        elif event.kind == ev.SUB_ORCHESTRATION_SCHEDULED:
            self._pending.append(self._make(*self._run_child(data)))
        elif event.kind in ev.TERMINAL_KINDS:
            self._pending = []  # the runtime drops the work and timers of a finished execution

    def _run_activity(self, data: dict[str, Any]) -> Message:
        task_id, name = data["task_id"], data["name"]
        fn = self.activities.get(name)
        if fn is None:
            err = {"type": "UnknownNameError", "message": f"no activity named {name!r} is registered", "traceback": ""}
            return ev.ACTIVITY_FAILED, {"task_id": task_id, "error": err, "attempts": 0}
        retry = data.get("retry")
        policy = DEFAULT_RETRY if retry is None else RetryPolicy(**{**retry, "non_retryable": tuple(
            retry.get("non_retryable") or ())})
        attempt = 0
        while True:
            attempt += 1
            self.activity_calls.append((name, data.get("input")))
            try:
                result = fn(data.get("input"))
            except Exception as exc:  # noqa: BLE001 - an activity failure is data
                if policy.should_retry(attempt, type(exc).__name__):
                    continue
                return ev.ACTIVITY_FAILED, {"task_id": task_id, "error": error_payload(exc), "attempts": attempt}
            return ev.ACTIVITY_COMPLETED, {"task_id": task_id, "result": normalize(result)}

    def _run_child(self, data: dict[str, Any]) -> Message:
        task_id, name, child_id = data["task_id"], data["name"], data["instance_id"]
        base = {"task_id": task_id, "instance_id": child_id}
        fn = self.children.get(name)
        if fn is None:
            err = {"type": "UnknownNameError", "message": f"no orchestration named {name!r} is registered"}
            return ev.SUB_ORCHESTRATION_FAILED, {**base, "error": err}
        if inspect.iscoroutinefunction(fn):
            child = Sim(fn, data.get("input"), activities=self.activities, children=self.children,
                        instance_id=child_id, name=name, start=self.clock, cached=self.cached).run()
            end = child.outcome
            if end.kind == ev.ORCHESTRATION_COMPLETED:
                return ev.SUB_ORCHESTRATION_COMPLETED, {**base, "result": end.data["output"]}
            error = end.data.get("error") or {"type": "Cancelled", "message": "cancelled"}
            return ev.SUB_ORCHESTRATION_FAILED, {**base, "error": error}
        try:
            result = fn(data.get("input"))
        except Exception as exc:  # noqa: BLE001
            return ev.SUB_ORCHESTRATION_FAILED, {**base, "error": error_payload(exc)}
        return ev.SUB_ORCHESTRATION_COMPLETED, {**base, "result": normalize(result)}


# -- replay checks shared by the tests ------------------------------------------------
def fresh_replay(sim: Sim, history: Sequence[Event], execution_id: int | None = None) -> Execution:
    """A new Execution of ``sim``'s orchestration that has replayed ``history``."""
    execution = sim.new_execution(execution_id or sim.current.execution_id)
    execution.replay(history)
    return execution


def assert_replays_cleanly(sim: Sim) -> None:
    """Replaying each execution's full history reproduces its state and adds nothing."""
    for run in sim.runs:
        history = run.history
        execution = fresh_replay(sim, history, run.execution_id)
        try:
            assert execution.advance([], history[-1].recorded_at) == []
            assert execution.history_len == len(history)
            if history[-1].kind in ev.TERMINAL_KINDS:
                assert execution.outcome == history[-1]
            else:
                assert not execution.finished
            custom = [e.data["value"] for e in history if e.kind == ev.CUSTOM_STATUS_SET]
            assert execution.custom_status == (custom[-1] if custom else None)
        finally:
            execution.close()


def assert_prefix_replays_match(sim: Sim) -> None:
    """After any turn (a crash point), replay + advancing the rest yields the same events."""
    for run in sim.runs:
        for cut in range(len(run.turns) + 1):
            prefix = [e for t in run.turns[:cut] for e in t.events]
            execution = fresh_replay(sim, prefix, run.execution_id)
            try:
                for turn in run.turns[cut:]:
                    assert execution.advance(turn.messages, turn.now) == turn.events, (
                        f"execution {run.execution_id}: replay of {cut} turns then advancing diverged"
                    )
            finally:
                execution.close()


def split_at_messages(history: Sequence[Event]) -> list[tuple[Message, datetime, list[Event]]]:
    """Cut a history before each message event: (the message, its time, the events it led to).

    Advancing one message at a time reproduces a batched turn exactly: the engine
    applies a batch message by message, all at the turn's time.
    """
    pieces: list[tuple[Message, datetime, list[Event]]] = []
    for event in history:
        if event.kind in ev.MESSAGE_KINDS or not pieces:
            pieces.append(((event.kind, event.data), event.recorded_at, [event]))
        else:
            pieces[-1][2].append(event)
    return pieces


def assert_history_reproduces(make: Callable[[], Execution], history: Sequence[Event]) -> None:
    """``history`` replays cleanly, and from any message boundary advancing the rest rebuilds it.

    ``make`` returns a fresh Execution of the orchestration that wrote ``history``.
    """
    full = make()
    full.replay(history)
    try:
        assert full.advance([], history[-1].recorded_at) == [], "replaying the full history added events"
        assert full.history_len == len(history)
        if history[-1].kind in ev.TERMINAL_KINDS:
            assert full.outcome == history[-1]
        else:
            assert not full.finished
    finally:
        full.close()
    pieces = split_at_messages(history)
    for cut in range(len(pieces) + 1):
        execution = make()
        execution.replay([e for piece in pieces[:cut] for e in piece[2]])
        try:
            for message, now, produced in pieces[cut:]:
                assert execution.advance([message], now) == produced, f"diverged after {cut} messages"
        finally:
            execution.close()


# -- saved histories -----------------------------------------------------------------
def event_to_json(seq: int, event: Event) -> dict[str, Any]:
    return {"seq": seq, "kind": event.kind, "data": event.data, "recorded_at": event.recorded_at.isoformat()}


def save_history(path: Path, *, orchestration: str, instance_id: str, execution_id: int, name: str,
                 events: Sequence[Event], note: str = "") -> None:
    doc = {
        "orchestration": orchestration,
        "name": name,
        "instance_id": instance_id,
        "execution_id": execution_id,
        "note": note,
        "events": [event_to_json(i, e) for i, e in enumerate(events, start=1)],
    }
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_history(path: Path) -> tuple[dict[str, Any], list[Event]]:
    """The file's metadata and its events (``seq`` must count 1, 2, 3, ...)."""
    doc = json.loads(path.read_text())
    events = []
    for i, raw in enumerate(doc["events"], start=1):
        assert raw["seq"] == i, f"{path.name}: event {i} has seq {raw['seq']}"
        events.append(Event(raw["kind"], raw["data"], datetime.fromisoformat(raw["recorded_at"])))
    return doc, events
