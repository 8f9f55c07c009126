"""``waiting_on`` without a database: the engine's event waits, and the assembly from open commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pgdurable_async as pgd
from pgdurable_async._base import events as ev
from pgdurable_async._base.waits import waiting_on
from pgdurable_async._engine.execution import Event, Execution

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)


async def approval(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    await ctx.sleep(1)
    return await ctx.wait_for_event("approval", timeout=timedelta(hours=1))


async def race(ctx: pgd.OrchestrationContext, _: Any) -> str:
    winner = await ctx.any([ctx.wait_for_event("go"), ctx.sleep(2)])
    await ctx.wait_for_event("after")
    return "event" if winner.result() is not None else "timer"


def _run(fn: Any, turns: list[tuple[list[tuple[str, dict[str, Any]]], datetime]]) -> tuple[Execution, list[Event]]:
    execution = Execution(fn, instance_id="i", execution_id=1, name="o")
    history: list[Event] = []
    for messages, now in turns:
        history += execution.advance(messages, now)
    return execution, history


def _replayed(fn: Any, history: list[Event]) -> Execution:
    execution = Execution(fn, instance_id="i", execution_id=1, name="o")
    execution.replay(history)
    return execution


def test_a_blocked_wait_is_reported_with_since_until_and_its_timer() -> None:
    start = [(ev.ORCHESTRATION_STARTED, {"name": "o", "input": None})]
    execution, history = _run(approval, [(start, T0), ([(ev.TIMER_FIRED, {"task_id": 1})], T1)])
    waits = execution.event_waits()
    until = (T1 + timedelta(hours=1)).isoformat()
    assert waits == {"events": [{"name": "approval", "since": T1.isoformat(), "until": until, "timer": 2}],
                     "timers": [2]}
    assert _replayed(approval, history).event_waits() == waits  # a cold turn sees the same
    history += execution.advance([(ev.EVENT_RECEIVED, {"name": "approval", "data": 7})], T1)
    assert execution.event_waits() is None and execution.finished


async def two_steps(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    first = await ctx.wait_for_event("first", timeout=60)
    await ctx.sleep(3600)
    return first


def test_the_timeout_timer_of_an_answered_wait_stays_hidden_until_it_fires() -> None:
    start = [(ev.ORCHESTRATION_STARTED, {"name": "o", "input": None})]
    execution, history = _run(two_steps, [(start, T0), ([(ev.EVENT_RECEIVED, {"name": "first", "data": 1})], T1)])
    assert execution.event_waits() == {"events": [], "timers": [1]}  # timer 1 is the timeout; 2 is the sleep
    assert _replayed(two_steps, history).event_waits() == execution.event_waits()
    execution.advance([(ev.TIMER_FIRED, {"task_id": 1})], T1 + timedelta(minutes=1))
    assert execution.event_waits() is None


def test_a_wait_that_lost_a_race_is_no_longer_waited_on() -> None:
    start = [(ev.ORCHESTRATION_STARTED, {"name": "o", "input": None})]
    execution, history = _run(race, [(start, T0)])
    assert execution.event_waits() == {"events": [{"name": "go", "since": T0.isoformat()}], "timers": []}
    history += execution.advance([(ev.TIMER_FIRED, {"task_id": 1})], T1)
    assert execution.event_waits() == {"events": [{"name": "after", "since": T1.isoformat()}], "timers": []}
    assert _replayed(race, history).event_waits() == execution.event_waits()


def test_waiting_on_joins_open_commands_and_event_waits() -> None:
    later = T0 + timedelta(minutes=1)
    open_tasks = [
        {"kind": ev.ACTIVITY_SCHEDULED, "task_id": 1, "name": "embed", "since": T0.isoformat()},
        {"kind": ev.TIMER_CREATED, "task_id": 2, "fire_at": later.isoformat(), "since": T0.isoformat()},
        {"kind": ev.TIMER_CREATED, "task_id": 3, "fire_at": later.isoformat(), "since": T1.isoformat()},
        {"kind": ev.SUB_ORCHESTRATION_SCHEDULED, "task_id": 4, "name": "child", "instance_id": "c-1",
         "since": T1.isoformat()},
    ]
    events = {"events": [{"name": "approval", "since": T1.isoformat(), "until": later.isoformat(), "timer": 3}],
              "timers": [3]}
    assert waiting_on(open_tasks, events) == [
        {"kind": "activity", "name": "embed", "since": T0, "task_id": 1},
        {"kind": "timer", "name": "timer #2", "since": T0, "until": later, "task_id": 2},
        {"kind": "child", "name": "child", "since": T1, "task_id": 4, "instance_id": "c-1"},
        {"kind": "event", "name": "approval", "since": T1, "until": later, "timer_task_id": 3},  # timer #3 folded in
    ]
    assert waiting_on(None, None) == []
    assert waiting_on(open_tasks[1:2], {"events": [], "timers": [2]}) == []  # an answered wait's timeout
