"""The orchestration API (DESIGN section 2) through the pure replay engine, no database.

Every scenario runs through :func:`simulate`, which also checks replay
equivalence: the full history replays into a fresh ``Execution`` with no new
events; replaying any turn prefix and advancing the remaining messages gives the
same events (the crash path); and the stateless run (fresh replay every turn)
writes the same history as the cached run (one ``Execution`` advanced turn by turn).
"""

from __future__ import annotations

import asyncio
import builtins
import gc
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

import pgdurable_async as pgd
from pgdurable_async._base import events as ev
from pgdurable_async._engine.execution import Event, Execution
from pgdurable_async._engine.tasks import FiberTask

from .sim import (
    T0,
    Cancel,
    Raise,
    Sim,
    assert_prefix_replays_match,
    assert_replays_cleanly,
    fresh_replay,
)

app = pgd.App()


@app.activity(name="double")
async def double_activity(ctx: pgd.ActivityContext, x: int) -> int:  # registered only for its name
    return 2 * x


@app.orchestration(name="child_orch")
async def child_orch(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity("double", x)) + 1


class Boom(Exception):
    pass


def _fail(x: Any) -> Any:
    raise Boom(f"boom {x}")


ACTIVITIES: dict[str, Any] = {
    "double": lambda x: 2 * x,
    "echo": lambda x: x,
    "fail": _fail,
    "big": lambda n: "x" * n,
}


def simulate(fn: Any, input: Any = None, **kw: Any) -> Sim:
    """Run ``fn`` to its end in the simulator, then check every replay path."""
    kw.setdefault("activities", ACTIVITIES)
    sim = Sim(fn, input, **kw).run()
    assert_replays_cleanly(sim)
    assert_prefix_replays_match(sim)
    stateless = Sim(fn, input, cached=False, **kw).run()
    assert [r.history for r in stateless.runs] == [r.history for r in sim.runs]
    return sim


def of_kind(sim: Sim, kind: str) -> list[Event]:
    return [e for e in sim.history if e.kind == kind]


def max_in_flight(history: list[Event]) -> int:
    running: set[int] = set()
    peak = 0
    for e in history:
        if e.kind == ev.ACTIVITY_SCHEDULED:
            running.add(e.data["task_id"])
        elif e.kind in (ev.ACTIVITY_COMPLETED, ev.ACTIVITY_FAILED):
            running.discard(e.data["task_id"])
        peak = max(peak, len(running))
    return peak


ORDERS = [("fifo", 1, 0), ("lifo", 1, 0), ("lifo", 3, 0), ("fifo", None, 0), ("random", 4, 1), ("random", 2, 7)]


# -- call_activity -----------------------------------------------------------------
def test_call_activity_records_command_and_result() -> None:
    async def orch(ctx: pgd.OrchestrationContext, x: int) -> list[int]:
        a = await ctx.call_activity("double", x)
        b = await ctx.call_activity(double_activity, a)  # by function: its registered name
        return [a, b]

    sim = simulate(orch, 3)
    assert sim.output == [6, 12]
    assert sim.kinds() == [
        ev.ORCHESTRATION_STARTED,
        ev.ACTIVITY_SCHEDULED,
        ev.ACTIVITY_COMPLETED,
        ev.ACTIVITY_SCHEDULED,
        ev.ACTIVITY_COMPLETED,
        ev.ORCHESTRATION_COMPLETED,
    ]
    scheduled = of_kind(sim, ev.ACTIVITY_SCHEDULED)
    assert [e.data for e in scheduled] == [
        {"task_id": 1, "name": "double", "input": 3},
        {"task_id": 2, "name": "double", "input": 6},
    ]


def test_call_activity_records_retry_policy_and_normalizes_input() -> None:
    policy = pgd.RetryPolicy(max_attempts=4, initial_interval=0.1, non_retryable=("Boom",))

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return await ctx.call_activity("echo", (1, {2: "two"}), retry=policy)

    sim = simulate(orch)
    (scheduled,) = of_kind(sim, ev.ACTIVITY_SCHEDULED)
    assert scheduled.data["input"] == [1, {"2": "two"}]  # as it reads back from the database
    assert scheduled.data["retry"] == {
        "max_attempts": 4,
        "initial_interval": 0.1,
        "backoff": 2.0,
        "max_interval": 60.0,
        "non_retryable": ["Boom"],
    }
    assert sim.output == [1, {"2": "two"}]


def test_unregistered_function_is_rejected_at_the_call_site() -> None:
    async def not_registered(ctx: Any, x: Any) -> None: ...

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            ctx.call_activity(not_registered)
        except pgd.UnknownNameError as exc:
            return exc.name
        return "no error"

    assert simulate(orch).output.endswith("not_registered")


def test_tasks_are_lazy_until_awaited() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        ctx.call_activity("double", 1)  # never awaited: never scheduled
        later = ctx.call_activity("double", 2)
        ctx.set_custom_status("made")
        return int(await later)

    sim = simulate(orch)
    assert [e.data["input"] for e in of_kind(sim, ev.ACTIVITY_SCHEDULED)] == [2]
    assert sim.output == 4


# -- call_orchestration ----------------------------------------------------------------
def test_call_orchestration_uses_a_deterministic_child_id_and_returns_its_output() -> None:
    async def orch(ctx: pgd.OrchestrationContext, x: int) -> list[int]:
        a = await ctx.call_orchestration("child_orch", x)
        b = await ctx.call_orchestration(child_orch, x + 1, instance_id="chosen-child")
        return [a, b]

    sim = simulate(orch, 5, children={"child_orch": child_orch}, instance_id="parent-1")
    assert sim.output == [11, 13]
    scheduled = [e.data for e in of_kind(sim, ev.SUB_ORCHESTRATION_SCHEDULED)]
    assert scheduled == [
        {"task_id": 1, "name": "child_orch", "instance_id": "parent-1:1:1", "input": 5},
        {"task_id": 2, "name": "child_orch", "instance_id": "chosen-child", "input": 6},
    ]
    completed = of_kind(sim, ev.SUB_ORCHESTRATION_COMPLETED)
    assert [e.data["instance_id"] for e in completed] == ["parent-1:1:1", "chosen-child"]


def test_failed_child_raises_suborchestration_error() -> None:
    async def failing_child(ctx: pgd.OrchestrationContext, x: int) -> None:
        await ctx.call_activity("fail", x)

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> dict[str, Any]:
        try:
            await ctx.call_orchestration("failing_child", 7)
        except pgd.SubOrchestrationError as exc:
            return {"id": exc.instance_id, "type": exc.error["type"], "root": isinstance(exc, pgd.PgDurableError)}
        return {}

    sim = simulate(orch, children={"failing_child": failing_child})
    assert sim.output == {"id": "sim-1:1:1", "type": "ActivityError", "root": True}
    (failed,) = of_kind(sim, ev.SUB_ORCHESTRATION_FAILED)
    assert "boom 7" in failed.data["error"]["message"]


def test_uncaught_child_failure_fails_the_parent() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.call_orchestration("missing_child")

    sim = simulate(orch)
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    assert sim.outcome.data["error"]["type"] == "SubOrchestrationError"


# -- sleep ---------------------------------------------------------------------------------
def test_sleep_creates_a_durable_timer() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[str]:
        before = ctx.now()
        await ctx.sleep(timedelta(minutes=5))
        await ctx.sleep(2.5)
        return [before.isoformat(), ctx.now().isoformat()]

    sim = simulate(orch)
    timers = of_kind(sim, ev.TIMER_CREATED)
    start = sim.history[0].recorded_at
    assert datetime.fromisoformat(timers[0].data["fire_at"]) == start + timedelta(minutes=5)
    second_created = timers[1].recorded_at
    assert datetime.fromisoformat(timers[1].data["fire_at"]) == second_created + timedelta(seconds=2.5)
    before, after = (datetime.fromisoformat(t) for t in sim.output)
    assert before == start
    assert after >= start + timedelta(minutes=5, seconds=2.5)
    assert [e.data["task_id"] for e in of_kind(sim, ev.TIMER_FIRED)] == [1, 2]


def test_sleep_rejects_a_non_duration() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            ctx.sleep("5s")  # type: ignore[arg-type]
        except TypeError:
            return "TypeError"
        return "accepted"

    assert simulate(orch).output == "TypeError"


# -- wait_for_event --------------------------------------------------------------------------
def test_wait_for_event_without_timeout() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        await ctx.call_activity("double", 1)
        return await ctx.wait_for_event("approval")

    sim = simulate(orch, raises=[Raise("approval", {"ok": True}, after_turn=5)])
    assert sim.output == {"ok": True}
    assert of_kind(sim, ev.TIMER_CREATED) == []


def test_wait_for_event_with_timeout_gets_the_event() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return await ctx.wait_for_event("approval", timeout=timedelta(hours=1))

    sim = simulate(orch, raises=[Raise("approval", "yes", after_turn=1)])
    assert sim.output == "yes"
    assert len(of_kind(sim, ev.TIMER_CREATED)) == 1  # the timeout timer, now moot


def test_wait_for_event_timeout_raises_pgd_timeout_error_at_the_await() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> dict[str, Any]:
        try:
            await ctx.wait_for_event("approval", timeout=30)
        except pgd.TimeoutError as exc:
            return {
                "event": exc.event,
                "builtin": isinstance(exc, builtins.TimeoutError),
                "root": isinstance(exc, pgd.PgDurableError),
                "at": ctx.now().isoformat(),
            }
        return {}

    sim = simulate(orch)
    out = sim.output
    assert out["event"] == "approval" and out["builtin"] and out["root"]
    (timer,) = of_kind(sim, ev.TIMER_CREATED)
    assert datetime.fromisoformat(out["at"]) >= datetime.fromisoformat(timer.data["fire_at"])


def test_event_arriving_after_the_timeout_is_buffered_for_the_next_wait() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        try:
            await ctx.wait_for_event("x", timeout=10)
        except pgd.TimeoutError:
            pass
        return await ctx.wait_for_event("x")

    sim = simulate(orch, raises=[Raise("x", "late", after_turn=3)])
    assert sim.output == "late"


def test_uncaught_timeout_fails_the_orchestration() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return await ctx.wait_for_event("never", timeout=timedelta(seconds=1))

    sim = simulate(orch)
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    assert sim.outcome.data["error"]["type"] == "TimeoutError"


@pytest.mark.parametrize("batch", [1, None])
def test_events_raised_before_anyone_waits_are_buffered_in_order(batch: int | None) -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        await ctx.sleep(60)
        first = await ctx.wait_for_event("x", timeout=5)  # buffered: no timeout timer is even created
        second = await ctx.wait_for_event("x")
        return [first, second]

    sim = simulate(orch, raises=[Raise("x", 1), Raise("x", 2)], batch=batch)
    assert sim.output == [1, 2]
    assert len(of_kind(sim, ev.TIMER_CREATED)) == 1
    assert [e.data for e in of_kind(sim, ev.EVENT_RECEIVED)] == [{"name": "x", "data": 1}, {"name": "x", "data": 2}]


def test_events_with_other_names_do_not_wake_a_waiter() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        value = await ctx.wait_for_event("b")
        return [value, await ctx.wait_for_event("a")]

    sim = simulate(orch, raises=[Raise("a", "A", after_turn=1), Raise("b", "B", after_turn=3)])
    assert sim.output == ["B", "A"]


# -- all ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("order", "batch", "seed"), ORDERS)
def test_all_returns_results_in_task_order(order: str, batch: int | None, seed: int) -> None:
    async def orch(ctx: pgd.OrchestrationContext, n: int) -> list[int]:
        return await ctx.all([ctx.call_activity("double", i) for i in range(n)])

    sim = simulate(orch, 6, order=order, batch=batch, seed=seed)
    assert sim.output == [0, 2, 4, 6, 8, 10]
    completed = [e.data["task_id"] for e in of_kind(sim, ev.ACTIVITY_COMPLETED)]
    if order == "lifo":
        assert completed != sorted(completed)  # results came back out of order


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
@pytest.mark.parametrize(("order", "batch", "seed"), ORDERS)
def test_all_limit_bounds_the_activities_in_flight(limit: int, order: str, batch: int | None, seed: int) -> None:
    async def orch(ctx: pgd.OrchestrationContext, n: int) -> list[int]:
        return await ctx.all([ctx.call_activity("double", i) for i in range(n)], limit=limit)

    sim = simulate(orch, 9, order=order, batch=batch, seed=seed)
    assert sim.output == [2 * i for i in range(9)]
    assert max_in_flight(sim.history) == limit
    # the first turn schedules exactly `limit` activities
    assert [e.kind for e in sim.turns[0].events].count(ev.ACTIVITY_SCHEDULED) == limit


def test_all_with_limit_one_is_sequential() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[int]:
        return await ctx.all([ctx.call_activity("double", i) for i in range(4)], limit=1)

    sim = simulate(orch, batch=None)
    kinds = [e.kind for e in sim.history if e.kind.startswith("activity_")]
    assert kinds == [ev.ACTIVITY_SCHEDULED, ev.ACTIVITY_COMPLETED] * 4


def test_all_rejects_a_limit_below_one_and_handles_empty() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        try:
            ctx.all([], limit=0)
        except ValueError:
            pass
        else:
            return ["accepted"]
        return await ctx.all([])

    assert simulate(orch).output == []


def test_all_fails_on_the_first_failure_and_starts_nothing_after_it() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> dict[str, Any]:
        tasks = [ctx.call_activity("double", 1), ctx.call_activity("fail", 2), ctx.call_activity("double", 3)]
        try:
            await ctx.all(tasks, limit=2)
        except pgd.ActivityError as exc:
            return {"message": exc.error_message, "first_done": tasks[0].done()}
        return {}

    sim = simulate(orch, order="lifo")  # the failure (scheduled last) is delivered first
    assert sim.output == {"message": "boom 2", "first_done": False}
    assert [e.data["input"] for e in of_kind(sim, ev.ACTIVITY_SCHEDULED)] == [1, 2]
    sim = simulate(orch, order="fifo")  # the first success frees a slot before the failure arrives
    assert sim.output == {"message": "boom 2", "first_done": True}
    assert [e.data["input"] for e in of_kind(sim, ev.ACTIVITY_SCHEDULED)] == [1, 2, 3]


def test_all_over_tasks_that_already_finished() -> None:
    # regression: AllTask indexed past its children when a child was done at start
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        a, b = ctx.call_activity("double", 1), ctx.call_activity("double", 2)
        await a
        await b
        both = await ctx.all([a, b])
        late = ctx.call_activity("double", 3)
        mixed = await ctx.all([a, late, b], limit=2)
        return [both, mixed, await ctx.all([a, a])]

    assert simulate(orch).output == [[2, 4], [2, 6, 4], [2, 2]]


def test_all_over_many_buffered_events_does_not_recurse() -> None:
    n = 3000  # each child is already done when started: this used to nest one call per child

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        await ctx.sleep(1)
        values = await ctx.all([ctx.wait_for_event("e") for _ in range(n)], limit=2)
        return sum(values)

    sim = Sim(orch, activities=ACTIVITIES, raises=[Raise("e", 1)] * n, batch=None).run()
    assert sim.output == n


def test_all_with_plain_coroutines() -> None:
    async def step(ctx: pgd.OrchestrationContext, x: int) -> int:
        doubled = await ctx.call_activity("double", x)
        await ctx.sleep(1)
        return int(doubled) + 1

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[int]:
        return await ctx.all([step(ctx, i) for i in range(5)], limit=2)

    for order, batch, seed in ORDERS:
        sim = simulate(orch, order=order, batch=batch, seed=seed)
        assert sim.output == [1, 3, 5, 7, 9]
        assert max_in_flight(sim.history) <= 2


def test_all_fail_fast_with_coroutines_leaves_no_unawaited_coroutine(recwarn: pytest.WarningsRecorder) -> None:
    # regression: coroutines never started by a fail-fast `all(limit=...)` warned "never awaited"
    async def step(ctx: pgd.OrchestrationContext, x: int) -> int:
        return int(await ctx.call_activity("fail" if x == 0 else "double", x))

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            await ctx.all([step(ctx, i) for i in range(4)], limit=1)
        except pgd.ActivityError:
            return "failed fast"
        return "no"

    sim = simulate(orch)
    assert sim.output == "failed fast"
    del sim
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_coroutine_task_never_started_is_closed_quietly(recwarn: pytest.WarningsRecorder) -> None:
    # a graph fan-out's coroutines that no path ever started (seen in a full test run) warned
    # "coroutine ... was never awaited" when the collector found them
    async def helper() -> int:
        return 1

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.wait_for_event("go")

    execution = Execution(orch, instance_id="i", execution_id=1, name="o")
    never_started = FiberTask(execution, helper())
    del never_started
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    execution.close()


def test_all_mixes_timers_events_and_activities() -> None:
    async def go_or_timeout(ctx: pgd.OrchestrationContext) -> str:
        try:
            return str(await ctx.wait_for_event("go", timeout=100))
        except pgd.TimeoutError:
            return "timed out"

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        return await ctx.all(
            [ctx.call_activity("double", 4), ctx.sleep(10), go_or_timeout(ctx), ctx.wait_for_event("x")]
        )

    outputs = set()
    for order, batch, seed in ORDERS:
        sim = simulate(orch, raises=[Raise("go", "went", after_turn=2), Raise("x", "ex")], order=order, batch=batch,
                       seed=seed)
        assert sim.output[:2] == [8, None] and sim.output[3] == "ex"
        outputs.add(sim.output[2])
    assert outputs == {"went", "timed out"}  # both interleavings occur among these orders


# -- any ---------------------------------------------------------------------------------------
def test_any_returns_the_first_finished_task() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        slow = ctx.sleep(timedelta(hours=1))
        fast = ctx.call_activity("double", 21)
        winner = await ctx.any([slow, fast])
        return [winner is fast, winner.result()]

    assert simulate(orch, order="fifo").output == [True, 42]  # the activity result is due first
    assert simulate(orch, order="lifo").output == [False, None]  # adversarial: the timer fires first


def test_any_winner_depends_on_delivery_order() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        timer = ctx.sleep(3)
        act = ctx.call_activity("double", 1)
        winner = await ctx.any([act, timer])
        return "timer" if winner is timer else "activity"

    assert simulate(orch, order="fifo").output == "activity"
    assert simulate(orch, order="lifo").output == "timer"


def test_any_winner_result_raises_its_error() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> dict[str, Any]:
        failing = ctx.call_activity("fail", 9)
        winner = await ctx.any([failing, ctx.wait_for_event("never")])  # any itself does not raise
        assert winner is failing
        assert isinstance(winner.exception(), pgd.ActivityError)
        try:
            winner.result()
        except pgd.ActivityError as exc:
            return {"type": exc.error_type, "message": exc.error_message}
        return {}

    assert simulate(orch).output == {"type": "Boom", "message": "boom 9"}


def test_any_mixes_events_timers_and_coroutines() -> None:
    async def helper(ctx: pgd.OrchestrationContext) -> str:
        await ctx.sleep(100)
        return "helper"

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        first = await ctx.any([helper(ctx), ctx.wait_for_event("go"), ctx.sleep(1000)])
        second = await ctx.any([ctx.wait_for_event("go2"), ctx.sleep(5)])
        return [first.result(), second.result()]

    sim = simulate(orch, raises=[Raise("go", "event", after_turn=1)])
    assert sim.output == ["event", None]


def test_any_needs_at_least_one_task() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            await ctx.any([])
        except ValueError:
            return "ValueError"
        return "accepted"

    assert simulate(orch).output == "ValueError"


def test_unfinished_task_result_raises() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        task = ctx.call_activity("double", 1)
        try:
            task.result()
        except pgd.PgDurableError as exc:
            return str(exc)
        return "had a result"

    assert simulate(orch).output == "task is not finished yet"


# -- continue_as_new -----------------------------------------------------------------------------
def test_continue_as_new_carries_input_and_unconsumed_events() -> None:
    async def orch(ctx: pgd.OrchestrationContext, n: int) -> Any:
        got = await ctx.wait_for_event("tick")
        total = int(await ctx.call_activity("double", n))
        if ctx.execution_id < 3:
            ctx.continue_as_new(n + 1)
        return [ctx.execution_id, n, total, got]

    raises = [Raise("tick", i) for i in range(5)]
    sim = simulate(orch, 1, raises=raises, batch=None)
    assert [r.execution_id for r in sim.runs] == [1, 2, 3]
    first_end = sim.runs[0].history[-1]
    assert first_end.kind == ev.CONTINUED_AS_NEW
    assert first_end.data == {"input": 2, "carry_over": [{"name": "tick", "data": i} for i in range(1, 5)]}
    second = sim.runs[1].history
    assert second[0].data["input"] == 2
    assert [e.data for e in second if e.kind == ev.EVENT_RECEIVED][:4] == [{"name": "tick", "data": i} for i in
                                                                          range(1, 5)]
    assert sim.output == [3, 3, 6, 2]


def test_continue_as_new_input_must_serialize() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            ctx.continue_as_new({1, 2})
        except pgd.SerializationError:
            return "SerializationError"
        return "accepted"

    assert simulate(orch).output == "SerializationError"


# -- deterministic helpers -------------------------------------------------------------------------
def test_now_uuid_random_are_identical_across_replay() -> None:
    seen: list[list[Any]] = []

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> list[Any]:
        first = [ctx.now().isoformat(), str(ctx.new_uuid()), float(ctx.random()), ctx.random().randint(1, 1000)]
        await ctx.call_activity("echo", first)  # recorded as the activity's input: replay compares it
        await ctx.sleep(30)
        second = [ctx.now().isoformat(), str(ctx.new_uuid()), float(ctx.random())]
        seen.append(first + second)
        await ctx.call_activity("echo", second)
        return first + second

    sim = simulate(orch)
    out = sim.output
    assert len(seen) > 3 and all(s == out for s in seen)  # every (re)play computed the same values
    assert out[0] == sim.history[0].recorded_at.isoformat()
    assert uuid.UUID(out[1]).version == 5 and out[1] != out[5]
    assert 0 <= out[2] < 1 and out[2] != out[6]
    other = Sim(orch, activities=ACTIVITIES, instance_id="another-instance").run().output
    assert other[1] != out[1] and other[2] != out[2]


def test_is_replaying() -> None:
    flags: list[bool] = []

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.call_activity("double", 1)
        flags.append(ctx.is_replaying)

    sim = Sim(orch, activities=ACTIVITIES).run()
    assert flags == [False]
    fresh_replay(sim, sim.history)
    assert flags == [False, True]


# -- custom status ------------------------------------------------------------------------------------
def test_set_custom_status_records_an_event_and_the_state() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        ctx.set_custom_status({"stage": "one"})
        await ctx.call_activity("double", 1)
        ctx.set_custom_status({"stage": "two", "tuple": (1, 2)})
        try:
            ctx.set_custom_status(object())
        except pgd.SerializationError:
            pass

    sim = simulate(orch)
    assert [e.data for e in of_kind(sim, ev.CUSTOM_STATUS_SET)] == [
        {"value": {"stage": "one"}},
        {"value": {"stage": "two", "tuple": [1, 2]}},
    ]
    assert sim.execution is not None
    assert sim.execution.custom_status == {"stage": "two", "tuple": [1, 2]}


def test_custom_status_changed_flag() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        ctx.set_custom_status("a")
        await ctx.wait_for_event("go")

    execution = Execution(orch, instance_id="i", execution_id=1, name="o")
    execution.advance([(ev.ORCHESTRATION_STARTED, {"input": None})], T0)
    assert execution.custom_status == "a" and execution.custom_status_changed
    execution.close()


# -- version ----------------------------------------------------------------------------------------------
async def versioned_old(ctx: pgd.OrchestrationContext, _: None) -> str:
    await ctx.call_activity("double", 1)
    await ctx.wait_for_event("go")
    return "old"


async def versioned_new(ctx: pgd.OrchestrationContext, _: None) -> str:
    v = ctx.version("add-echo", default=1, latest=2)
    assert ctx.version("add-echo", default=1, latest=2) == v  # stable within an execution
    await ctx.call_activity("double", 1)
    await ctx.wait_for_event("go")
    if v >= 2:
        await ctx.call_activity("echo", "new step")
        return "new"
    return "old"


def test_version_on_a_new_instance_is_latest_with_a_marker() -> None:
    sim = simulate(versioned_new, raises=[Raise("go")])
    assert sim.output == "new"
    assert of_kind(sim, ev.VERSION_MARKER) == [Event(ev.VERSION_MARKER, {"change_id": "add-echo", "version": 2}, T0 +
                                                     timedelta(seconds=1))]


def test_version_replaying_history_without_the_marker_takes_the_default() -> None:
    old = Sim(versioned_old, activities=ACTIVITIES, raises=[Raise("go", after_turn=5)]).run(until_turn=2)
    assert old.kinds()[-1] == ev.ACTIVITY_COMPLETED  # running, waiting for "go"
    old.close()
    upgraded = Execution(versioned_new, instance_id="sim-1", execution_id=1, name="orch")
    upgraded.replay(old.history)
    assert upgraded.advance([], old.clock) == []  # no marker, no new command: replays cleanly
    rest = upgraded.advance([(ev.EVENT_RECEIVED, {"name": "go", "data": None})], old.clock + timedelta(seconds=1))
    assert [e.kind for e in rest] == [ev.EVENT_RECEIVED, ev.ORCHESTRATION_COMPLETED]
    assert rest[-1].data == {"output": "old"}


# -- cancellation --------------------------------------------------------------------------------------------
def test_cancel_uncaught_ends_cancelled() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        try:
            await ctx.wait_for_event("never")
        except Exception:  # noqa: BLE001 - Cancelled must not be swallowed by this
            await ctx.call_activity("double", -1)

    sim = simulate(orch, cancel=Cancel("user asked", after_turn=1))
    assert sim.outcome == Event(ev.ORCHESTRATION_CANCELLED, {"reason": "user asked"}, sim.history[-1].recorded_at)
    assert of_kind(sim, ev.ACTIVITY_SCHEDULED) == []


def test_cancel_is_raised_at_the_current_await_and_cleanup_can_run() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            await ctx.all([ctx.call_activity("double", 1), ctx.sleep(timedelta(days=1))])
        except pgd.Cancelled as exc:
            assert isinstance(exc, pgd.PgDurableError) and exc.instance_id == "sim-1"
            await ctx.call_activity("echo", f"cleanup: {exc.reason}")
            raise
        return "finished"

    sim = simulate(orch, cancel=Cancel("stop", after_turn=2))
    assert sim.outcome.kind == ev.ORCHESTRATION_CANCELLED
    assert [e.data["input"] for e in of_kind(sim, ev.ACTIVITY_SCHEDULED)] == [1, "cleanup: stop"]


def test_cancel_caught_lets_the_orchestration_complete() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            await ctx.sleep(timedelta(days=1))
        except pgd.Cancelled:
            return "compensated"
        return "slept"

    sim = simulate(orch, cancel=Cancel(after_turn=1))
    assert sim.output == "compensated"


def test_cancel_with_a_finally_block() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        try:
            await ctx.wait_for_event("never")
        finally:
            await ctx.call_activity("echo", "cleanup")

    sim = simulate(orch, cancel=Cancel(after_turn=1))
    assert sim.outcome.kind == ev.ORCHESTRATION_CANCELLED
    assert [e.data["input"] for e in of_kind(sim, ev.ACTIVITY_SCHEDULED)] == ["cleanup"]


def test_cancel_after_the_end_is_ignored() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        return 1

    execution = Execution(orch, instance_id="i", execution_id=1, name="o")
    events = execution.advance([(ev.ORCHESTRATION_STARTED, {"input": None}), (ev.CANCEL_REQUESTED, {})], T0)
    assert [e.kind for e in events] == [ev.ORCHESTRATION_STARTED, ev.ORCHESTRATION_COMPLETED]


# -- failures ----------------------------------------------------------------------------------------------
def test_activity_failure_surfaces_as_activity_error() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> dict[str, Any]:
        try:
            await ctx.call_activity("fail", 5, retry=pgd.RetryPolicy(max_attempts=3, initial_interval=0))
        except pgd.ActivityError as exc:
            return {
                "name": exc.activity_name,
                "type": exc.error_type,
                "message": exc.error_message,
                "traceback": exc.traceback,
                "attempts": exc.attempts,
            }
        return {}

    sim = simulate(orch)
    out = sim.output
    assert out["name"] == "fail" and out["type"] == "Boom" and out["message"] == "boom 5" and out["attempts"] == 3
    assert "Traceback" in out["traceback"] and "_fail" in out["traceback"]
    assert sim.activity_calls == [("fail", 5)] * 3


def test_uncaught_activity_failure_fails_the_orchestration() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.call_activity("fail", 1, retry=pgd.RetryPolicy(max_attempts=1))

    sim = simulate(orch)
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    error = sim.outcome.data["error"]
    assert error["type"] == "ActivityError" and "boom 1" in error["message"]


def test_unhandled_exception_fails_with_type_message_traceback() -> None:
    async def orch(ctx: pgd.OrchestrationContext, x: int) -> None:
        await ctx.call_activity("double", x)
        raise KeyError(f"missing {x}")

    sim = simulate(orch, 4)
    error = sim.outcome.data["error"]
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    assert error["type"] == "KeyError" and error["message"] == "'missing 4'"
    assert "Traceback" in error["traceback"] and "in orch" in error["traceback"]


@pytest.mark.parametrize("awaitable", ["asyncio.sleep", "future"])
def test_awaiting_a_foreign_awaitable_is_nondeterminism(awaitable: str) -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.call_activity("double", 1)
        if awaitable == "future":
            loop = asyncio.new_event_loop()
            try:
                await loop.create_future()
            finally:
                loop.close()
        else:
            await asyncio.sleep(0)

    sim = simulate(orch)
    error = sim.outcome.data["error"]
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    assert error["type"] == "NonDeterminismError" and "only await ctx tasks" in error["message"]
    assert "ctx.all / ctx.any (not asyncio.gather / wait)" in error["message"]  # the usual slip, named


def test_nothing_is_scheduled_after_nondeterminism_is_caught() -> None:
    # regression: code that swallowed the NonDeterminismError could still schedule work
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            await asyncio.sleep(0)
        except pgd.NonDeterminismError:
            ctx.set_custom_status("ignored it")
            await ctx.call_activity("double", 1)
        return "done"

    sim = simulate(orch)
    assert sim.kinds() == [ev.ORCHESTRATION_STARTED, ev.ORCHESTRATION_FAILED]
    assert sim.outcome.data["error"]["type"] == "NonDeterminismError"
    assert sim.execution is not None and sim.execution.custom_status is None


def test_unserializable_activity_input() -> None:
    async def caught(ctx: pgd.OrchestrationContext, _: None) -> str:
        try:
            ctx.call_activity("echo", {"when": object()})
        except pgd.SerializationError as exc:
            return str(exc)
        return "accepted"

    async def uncaught(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.call_activity("echo", b"\x00bytes")

    message = simulate(caught).output
    assert "input of activity 'echo'" in message and "not JSON-serializable" in message
    sim = simulate(uncaught)
    assert sim.kinds() == [ev.ORCHESTRATION_STARTED, ev.ORCHESTRATION_FAILED]
    assert sim.outcome.data["error"]["type"] == "SerializationError"


def test_output_over_the_payload_limit_fails() -> None:
    async def orch(ctx: pgd.OrchestrationContext, n: int) -> str:
        return str(await ctx.call_activity("big", n))

    assert simulate(orch, 100, max_payload_bytes=1000).output == "x" * 100
    sim = simulate(orch, 5000, max_payload_bytes=1000)
    error = sim.outcome.data["error"]
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED and error["type"] == "SerializationError"
    assert "orchestration output" in error["message"] and "5002 bytes" in error["message"]


def test_unserializable_output_fails() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return {1, 2, 3}

    sim = simulate(orch)
    assert sim.outcome.data["error"]["type"] == "SerializationError"


# -- replay: disagreement with the recorded history --------------------------------------------------------
async def two_steps(ctx: pgd.OrchestrationContext, _: None) -> str:
    await ctx.call_activity("double", 1)
    await ctx.call_activity("double", 2)
    return "two"


async def one_step(ctx: pgd.OrchestrationContext, _: None) -> str:
    await ctx.call_activity("double", 1)
    return "one"


def _replay_with(fn: Any, history: list[Event]) -> tuple[Execution, list[Event]]:
    execution = Execution(fn, instance_id="sim-1", execution_id=1, name="orch")
    execution.replay(history)
    return execution, execution.advance([], history[-1].recorded_at)


@pytest.mark.parametrize("finished", [False, True])
def test_code_that_now_ends_early_is_nondeterminism(finished: bool) -> None:
    # regression: the early ending won over the unissued command and the instance completed silently
    sim = Sim(two_steps, activities=ACTIVITIES).run(until_turn=None if finished else 2)
    sim.close()
    execution, new = _replay_with(one_step, sim.history)
    assert execution.outcome is not None and execution.outcome.kind == ev.ORCHESTRATION_FAILED
    assert new == ([] if finished else [execution.outcome])  # nothing is appended after a recorded ending
    assert "no longer issues" in execution.outcome.data["error"]["message"]


def test_nondeterminism_inside_try_finally_does_not_escape_the_engine() -> None:
    # regression: closing the coroutine ran a `finally: await ...`, and "coroutine ignored
    # GeneratorExit" escaped from replay()
    async def v1(ctx: pgd.OrchestrationContext, _: None) -> None:
        try:
            await ctx.call_activity("double", 1)
            await ctx.call_activity("double", 2)
        finally:
            await ctx.call_activity("echo", "cleanup")

    async def v2(ctx: pgd.OrchestrationContext, _: None) -> None:
        try:
            await ctx.call_activity("double", 1)
            await ctx.call_activity("renamed", 2)
        finally:
            await ctx.call_activity("echo", "cleanup")

    sim = Sim(v1, activities=ACTIVITIES).run(until_turn=2)
    sim.close()
    execution, new = _replay_with(v2, sim.history)
    assert [e.kind for e in new] == [ev.ORCHESTRATION_FAILED]
    assert new[0].data["error"]["type"] == "NonDeterminismError"


def test_close_releases_an_unfinished_execution() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        try:
            await ctx.all([ctx.wait_for_event("never"), ctx.sleep(1)])
        finally:
            await ctx.call_activity("echo", "cleanup")

    execution = Execution(orch, instance_id="i", execution_id=1, name="o")
    execution.advance([(ev.ORCHESTRATION_STARTED, {"input": None})], T0)
    execution.close()  # does not raise; the finally block cannot schedule anything
    assert execution.advance([], T0) == []


def test_message_for_an_unknown_task_fails_cleanly() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await ctx.wait_for_event("x")

    execution = Execution(orch, instance_id="i", execution_id=1, name="o")
    execution.advance([(ev.ORCHESTRATION_STARTED, {"input": None})], T0)
    events = execution.advance([(ev.ACTIVITY_COMPLETED, {"task_id": 99, "result": 1})], T0)
    assert [e.kind for e in events] == [ev.ACTIVITY_COMPLETED, ev.ORCHESTRATION_FAILED]
    assert "task #99, which was never scheduled" in events[-1].data["error"]["message"]


def test_messages_after_the_end_are_not_applied() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        return 1

    sim = Sim(orch).run()
    execution = fresh_replay(sim, sim.history)
    assert execution.advance([(ev.EVENT_RECEIVED, {"name": "x", "data": 1})], T0) == []
    assert execution.history_len == len(sim.history)


def test_cache_path_equals_fresh_replay_at_every_turn() -> None:
    async def orch(ctx: pgd.OrchestrationContext, n: int) -> Any:
        ctx.set_custom_status("start")
        values = await ctx.all([ctx.call_activity("double", i) for i in range(n)], limit=3)
        winner = await ctx.any([ctx.wait_for_event("go"), ctx.sleep(50)])
        ctx.set_custom_status({"values": values})
        return [values, winner.result(), str(ctx.new_uuid())]

    for order, batch, seed in ORDERS:
        cached = Sim(orch, 7, activities=ACTIVITIES, raises=[Raise("go", 1, after_turn=4)], order=order,
                     batch=batch, seed=seed).run()
        history: list[Event] = []
        for turn in cached.turns:  # a fresh replay before every turn, as after a cache miss
            fresh = fresh_replay(cached, history)
            assert fresh.history_len == len(history)
            assert fresh.advance(turn.messages, turn.now) == turn.events
            history += turn.events
            fresh.close()
        assert history == cached.history
        assert cached.execution is not None and fresh.custom_status == cached.execution.custom_status
        assert fresh.custom_status == {"values": [2 * i for i in range(7)]}


# -- regressions: random values encode; a wait that lost a race lets go of its event -----------------------
def test_random_value_can_be_passed_on() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return await ctx.call_activity("echo", ctx.random())

    sim = Sim(orch, activities=ACTIVITIES).run()
    assert sim.outcome.kind == ev.ORCHESTRATION_COMPLETED, sim.outcome.data


def test_wait_that_lost_a_race_does_not_take_the_next_event() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        reminders = 0
        while True:  # the "approval with reminders" pattern
            approval = ctx.wait_for_event("approval")
            winner = await ctx.any([approval, ctx.sleep(timedelta(hours=1))])
            if winner is approval:
                return [approval.result(), reminders]
            reminders += 1
            if reminders > 3:
                return ["gave up", reminders]

    sim = Sim(orch, activities=ACTIVITIES, raises=[Raise("approval", "ok", after_turn=3)]).run()
    assert sim.output == ["ok", 2]
