"""The engine's side of the lifecycle (no database): value_set, forked_from, open commands, the replayer."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

import pgdurable_async as pgd
from pgdurable_async._base import events as ev
from pgdurable_async._engine import parse_history, replay_history
from pgdurable_async._engine.execution import Event, Execution

from .sim import T0, Sim, assert_prefix_replays_match, assert_replays_cleanly


async def progress(ctx: pgd.OrchestrationContext, n: int) -> int:
    ctx.set_value("seen", [])
    total = 0
    for i in range(n):
        total += int(await ctx.call_activity("echo", i))
        ctx.set_value("seen", list(range(i + 1)))
    ctx.set_value("total", total)
    return total


def test_set_value_records_one_event_per_call_and_replays_without_new_ones() -> None:
    sim = Sim(progress, 3, activities={"echo": lambda x: x}).run()
    assert_replays_cleanly(sim)
    assert_prefix_replays_match(sim)
    sets = [e.data for e in sim.history if e.kind == ev.VALUE_SET]
    assert sets == [{"key": "seen", "value": []}, {"key": "seen", "value": [0]}, {"key": "seen", "value": [0, 1]},
                    {"key": "seen", "value": [0, 1, 2]}, {"key": "total", "value": 3}]
    replayed = Execution(progress, instance_id="sim-1", execution_id=1, name="progress")
    replayed.replay(sim.history)
    assert replayed.values == {"seen": [0, 1, 2], "total": 3}
    assert replayed.advance([], T0) == []


def test_set_value_checks_its_key_and_value() -> None:
    async def bad_key(ctx: pgd.OrchestrationContext, _: Any) -> None:
        ctx.set_value("", 1)

    async def bad_value(ctx: pgd.OrchestrationContext, _: Any) -> None:
        ctx.set_value("k", object())

    for fn, error in ((bad_key, "InvalidArgument"), (bad_value, "SerializationError")):
        sim = Sim(fn, None).run()
        assert sim.outcome.kind == ev.ORCHESTRATION_FAILED and sim.outcome.data["error"]["type"] == error


async def keyed(ctx: pgd.OrchestrationContext, _: Any) -> list[Any]:
    key = str(ctx.new_uuid())
    first = await ctx.call_activity("echo", key)
    await ctx.sleep(timedelta(seconds=5))
    kid = await ctx.call_orchestration("kid", ctx.random().randint(1, 10**9))
    return [first, kid, await ctx.call_activity("echo", "last")]


def _source() -> list[Event]:
    sim = Sim(keyed, None, instance_id="src", activities={"echo": lambda x: x}, children={"kid": lambda x: x})
    return sim.run().history


def _fork(prefix: list[Event], at_seq: int, seed: str = "src/1") -> list[Event]:
    mark = Event(ev.FORKED_FROM, {"instance_id": "src", "at_seq": at_seq, "seed": seed}, prefix[-1].recorded_at)
    return [*prefix[:at_seq], mark]


def test_a_fork_replays_with_its_sources_seed_and_child_ids() -> None:
    history = _source()
    at = next(i for i, e in enumerate(history, 1) if e.kind == ev.SUB_ORCHESTRATION_COMPLETED)
    fork = Execution(keyed, instance_id="fork", execution_id=1, name="keyed")
    fork.replay(_fork(history, at))
    assert fork.fault is None and fork.resumable
    assert [e.kind for e in fork.advance([], T0)] == [ev.ACTIVITY_SCHEDULED]  # runs on past the copy
    assert fork.open_commands() == []
    # Without the seed, the uuid in the first activity's input differs: the copy cannot replay.
    unseeded = Execution(keyed, instance_id="fork", execution_id=1, name="keyed")
    unseeded.replay(_fork(history, at, seed=""))
    assert isinstance(unseeded.fault, pgd.NonDeterminismError)


@pytest.mark.parametrize("kind", [ev.ACTIVITY_SCHEDULED, ev.TIMER_CREATED, ev.SUB_ORCHESTRATION_SCHEDULED])
def test_open_commands_are_what_the_copy_left_unfinished(kind: str) -> None:
    history = _source()
    at = next(i for i, e in enumerate(history, 1) if e.kind == kind)
    fork = Execution(keyed, instance_id="fork", execution_id=1, name="keyed")
    fork.replay(_fork(history, at))
    assert [(c.kind, c.data) for c in fork.open_commands()] == [(kind, history[at - 1].data)]
    assert fork.advance([], T0) == []  # nothing new: it waits for the re-issued command
    done = Execution(keyed, instance_id="src", execution_id=1, name="keyed")
    done.replay(history)
    assert done.fault is None and not done.resumable and done.open_commands() == []


def test_forked_from_is_accepted_anywhere_on_replay() -> None:
    history = _source()
    fork = Execution(keyed, instance_id="fork", execution_id=1, name="keyed")
    fork.replay([*_fork(history, 2), *history[2:]])
    assert fork.fault is None and fork.finished and not fork.resumable


# -- the replayer ------------------------------------------------------------------------------
async def keyed_swapped(ctx: pgd.OrchestrationContext, _: Any) -> list[Any]:
    await ctx.sleep(timedelta(seconds=5))  # moved before the first activity
    return [await ctx.call_activity("echo", str(ctx.new_uuid()))]


def _as_json(history: list[Event]) -> str:
    return json.dumps([{"seq": n, "kind": e.kind, "data": e.data, "recorded_at": e.recorded_at.isoformat(),
                        "execution_id": 1} for n, e in enumerate(history, 1)])


def test_replay_history_accepts_every_saved_form() -> None:
    text = _as_json(_source())
    registry = {"orch": keyed}
    assert replay_history(registry, text, instance_id="src") == len(_source())
    assert replay_history(registry, text.encode(), instance_id="src") > 0
    assert replay_history(registry, json.loads(text), instance_id="src") > 0
    assert replay_history(registry, {"instance_id": "src", "events": json.loads(text)}) > 0
    events = parse_history(text).events
    assert replay_history(registry, events, instance_id="src") == len(events)
    assert events[0].recorded_at is not None and events[0].recorded_at.tzinfo is not None


def test_replay_history_reports_disagreements() -> None:
    text = _as_json(_source())
    with pytest.raises(pgd.NonDeterminismError, match="timer_created"):
        replay_history({"orch": keyed_swapped}, text, instance_id="src")
    with pytest.raises(pgd.NonDeterminismError, match="give the instance id"):
        replay_history({"orch": keyed}, text)  # its ctx.new_uuid() depends on the instance id
    with pytest.raises(pgd.UnknownNameError, match="orch"):
        replay_history({"other": keyed}, text)
    with pytest.raises(pgd.InvalidArgument):
        replay_history({"orch": keyed}, "{not json")
    with pytest.raises(pgd.InvalidArgument):
        replay_history({"orch": keyed}, [{"no": "kind"}])
    with pytest.raises(pgd.NonDeterminismError, match="does not begin with orchestration_started"):
        replay_history({"orch": keyed}, json.loads(text)[1:], instance_id="src")


def test_a_fork_cut_before_the_end_ends_once() -> None:
    history = _source()
    assert history[-1].kind == ev.ORCHESTRATION_COMPLETED
    fork = Execution(keyed, instance_id="fork", execution_id=1, name="keyed")
    fork.replay(_fork(history, len(history) - 1))
    assert [e.kind for e in fork.advance([], T0)] == [ev.ORCHESTRATION_COMPLETED]
    assert fork.outcome is not None and fork.outcome.data == history[-1].data


async def chatty(ctx: pgd.OrchestrationContext, _: Any) -> str:
    first = await ctx.call_activity("echo", 1)
    ctx.set_value("after", first)
    ctx.set_custom_status("past one")
    path = ctx.version("second-step", default=1, latest=2)
    await ctx.call_activity("echo", path)
    return "done"


def test_what_the_code_does_past_a_forks_copy_is_recorded_after_the_marker() -> None:
    history = Sim(chatty, None, instance_id="src", activities={"echo": lambda x: x}).run().history
    at = next(i for i, e in enumerate(history, 1) if e.kind == ev.ACTIVITY_COMPLETED)
    fork = Execution(chatty, instance_id="fork", execution_id=1, name="chatty")
    fork.replay(_fork(history, at))
    new = fork.advance([], T0)
    assert [e.kind for e in new] == [ev.VALUE_SET, ev.CUSTOM_STATUS_SET, ev.VERSION_MARKER, ev.ACTIVITY_SCHEDULED]
    assert new[2].data == {"change_id": "second-step", "version": 2} and new[3].data["input"] == 2
    assert fork.values == {"after": 1} and fork.custom_status == "past one"


def test_a_recorded_start_seeds_the_uuid_stream() -> None:
    history = _source()  # the simulator records starts without ids, as older versions did
    start = history[0]
    named = [Event(start.kind, {**start.data, "instance_id": "src", "execution_id": 1}, start.recorded_at),
             *history[1:]]
    elsewhere = Execution(keyed, instance_id="some-other-id", execution_id=3, name="keyed")
    elsewhere.replay(named)  # a copy under another id replays: the start says whose stream it is
    assert elsewhere.fault is None and elsewhere.finished
    unnamed = Execution(keyed, instance_id="some-other-id", execution_id=3, name="keyed")
    unnamed.replay(history)
    assert isinstance(unnamed.fault, pgd.NonDeterminismError)
