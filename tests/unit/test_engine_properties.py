"""Property tests of the replay engine: random orchestration programs, random delivery orders.

A *program* is a JSON list of steps (an activity call, a sleep, a wait for an
event with or without a timeout, ``all``/``any`` over a small group of those,
a custom status, a version check, deterministic randomness).  One generic
orchestration, :func:`interpret`, runs any program; the program is its input, so
it is recorded in ``orchestration_started``.  The simulator delivers results in
a random order (fifo, lifo or seeded random; one or several messages per turn).

(a) Replay reproduces: the full history replays with no new events and the same
    outcome; after any turn or any single message (a crash point) replaying the
    prefix and advancing the rest yields exactly the recorded events; the
    stateless run (fresh replay every turn) writes the same history.

(b) Mutations of a finished history that MUST be detected (the replay ends in
    ``orchestration_failed`` with ``NonDeterminismError``, and nothing escapes):
      - the name of one ``activity_scheduled`` changed;
      - the input of one ``activity_scheduled`` changed;
      - one command event (``activity_scheduled`` / ``timer_created``) dropped;
      - two command events that lie in different turns (a message event between
        them) swapped in place, each keeping its own task id;
      - the payloads of two command events that differ in kind, name or input
        swapped, each position keeping its task id (timers count as equal to each
        other: a timer's ``fire_at`` is deliberately not compared);
      - a ``version_marker`` dropped (the code then takes the old path, which here
        always issues different commands).
    Not claimed, because it is not a disagreement: reordering the command events
    of one turn (they form a set; checked below to replay cleanly), reordering
    completions, or changing results, timer deadlines or event payloads.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pgdurable_async as pgd
from pgdurable_async._base import events as ev
from pgdurable_async._engine.execution import Event, Execution
from pgdurable_async._engine.tasks import Task

from .sim import Raise, Sim, assert_history_reproduces, assert_prefix_replays_match, assert_replays_cleanly


def _fail(x: Any) -> Any:
    raise ValueError(f"failed on {x}")


ACTIVITIES: dict[str, Any] = {"double": lambda x: 2 * x, "echo": lambda x: x, "fail": _fail}
NO_RETRY = pgd.RetryPolicy(max_attempts=1)
EXPECTED_ERRORS = (pgd.ActivityError, pgd.TimeoutError)


def _leaf(ctx: pgd.OrchestrationContext, leaf: list[Any]) -> Task[Any]:
    kind = leaf[0]
    if kind == "act":
        return ctx.call_activity(leaf[1], leaf[2], retry=NO_RETRY)
    if kind == "sleep":
        return ctx.sleep(leaf[1])
    assert kind == "wait"
    return ctx.wait_for_event(leaf[1], timeout=leaf[2])


async def interpret(ctx: pgd.OrchestrationContext, program: list[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for step in program:
        kind = step[0]
        if kind == "status":
            ctx.set_custom_status(step[1])
        elif kind == "version":
            version = ctx.version(step[1], default=1, latest=2)
            out.append(version)
            if version == 2:  # the new code path issues a command the old one did not
                out.append(await ctx.call_activity("echo", step[1]))
        elif kind == "random":
            out.append([str(ctx.new_uuid()), float(ctx.random()), ctx.now().isoformat()])
        elif kind == "all":
            try:
                out.append(await ctx.all([_leaf(ctx, leaf) for leaf in step[1]], limit=step[2]))
            except EXPECTED_ERRORS as exc:
                out.append(type(exc).__name__)
        elif kind == "any":
            tasks = [_leaf(ctx, leaf) for leaf in step[1]]
            winner = await ctx.any(tasks)
            try:
                value = winner.result()
            except EXPECTED_ERRORS as exc:
                value = type(exc).__name__
            out.append([next(i for i, t in enumerate(tasks) if t is winner), value])
        else:
            try:
                out.append(await _leaf(ctx, step))
            except EXPECTED_ERRORS as exc:
                out.append(type(exc).__name__)
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    names = itertools.count()
    raises: list[Raise] = []

    def leaf() -> list[Any]:
        kind = draw(st.sampled_from(["act", "act", "sleep", "wait"]))
        if kind == "act":
            return ["act", draw(st.sampled_from(["double", "echo", "fail"])), draw(st.integers(0, 9))]
        if kind == "sleep":
            return ["sleep", draw(st.integers(1, 60))]
        name = f"e{next(names)}"  # one name per wait: a wait that lost an `any` cannot steal another's event
        timeout = draw(st.one_of(st.none(), st.integers(1, 60)))
        if timeout is None or draw(st.booleans()):
            raises.append(Raise(name, draw(st.integers(0, 99)), after_turn=draw(st.integers(0, 8))))
        return ["wait", name, timeout]

    program: list[list[Any]] = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["leaf", "leaf", "all", "any", "status", "version", "random"]))
        if kind == "leaf":
            program.append(leaf())
        elif kind in ("all", "any"):
            group = [leaf() for _ in range(draw(st.integers(1, 5)))]
            program.append(["all", group, draw(st.one_of(st.none(), st.integers(1, 3)))] if kind == "all"
                           else ["any", group])
        elif kind == "status":
            program.append(["status", {"step": len(program)}])
        elif kind == "version":
            program.append(["version", f"change-{len(program)}"])
        else:
            program.append(["random"])
    return {
        "program": program,
        "raises": raises,
        "order": draw(st.sampled_from(["fifo", "lifo", "random"])),
        "batch": draw(st.sampled_from([1, 2, 3, None])),
        "seed": draw(st.integers(0, 2**16)),
    }


def run_scenario(scenario: dict[str, Any], *, cached: bool = True) -> Sim:
    return Sim(
        interpret,
        scenario["program"],
        activities=ACTIVITIES,
        raises=scenario["raises"],
        order=scenario["order"],
        batch=scenario["batch"],
        seed=scenario["seed"],
        cached=cached,
        name="interpret",
    ).run()


def replay(sim: Sim, history: list[Event]) -> Execution:
    execution = sim.new_execution(1)
    execution.replay(history)  # never raises, whatever the history
    return execution


FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- (a) replay reproduces ---------------------------------------------------------------------
@FAST
@given(scenarios())
def test_replay_reproduces_every_run(scenario: dict[str, Any]) -> None:
    sim = run_scenario(scenario)
    assert sim.outcome.kind == ev.ORCHESTRATION_COMPLETED, sim.outcome
    assert len(sim.output) >= sum(1 for s in scenario["program"] if s[0] != "status")
    assert_replays_cleanly(sim)
    assert_prefix_replays_match(sim)
    assert_history_reproduces(lambda: sim.new_execution(1), sim.history)
    stateless = run_scenario(scenario, cached=False)
    assert stateless.history == sim.history


def _may_fail(leaf: list[Any]) -> bool:
    return leaf[:2] == ["act", "fail"] or (leaf[0] == "wait" and leaf[2] is not None)


@FAST
@given(scenarios())
def test_all_limit_is_honoured(scenario: dict[str, Any]) -> None:
    program = scenario["program"]
    if any(s[0] == "any" for s in program):
        return  # a task that lost an `any` keeps running into later steps
    if any(s[0] == "all" and any(_may_fail(leaf) for leaf in s[1]) for s in program):
        return  # so does the rest of an `all` that raised its first failure
    sim = run_scenario(scenario)
    limits = [len(s[1]) if s[2] is None else s[2] for s in program if s[0] == "all"]
    bound = max(limits + [1])  # steps run one after another: at most one group is in flight
    running: set[int] = set()
    for e in sim.history:
        if e.kind == ev.ACTIVITY_SCHEDULED:
            running.add(e.data["task_id"])
        elif e.kind in (ev.ACTIVITY_COMPLETED, ev.ACTIVITY_FAILED):
            running.discard(e.data["task_id"])
        assert len(running) <= bound


# -- (b) mutations --------------------------------------------------------------------------------
def _commands(history: list[Event]) -> list[int]:
    return [i for i, e in enumerate(history) if e.kind in ev.COMMAND_KINDS]


def _key(event: Event) -> tuple[Any, ...]:
    if event.kind == ev.TIMER_CREATED:
        return (event.kind,)
    return (event.kind, event.data.get("name"), repr(event.data.get("input")))


def _mutations(history: list[Event]) -> list[str]:
    commands = _commands(history)
    found = []
    if any(history[i].kind == ev.ACTIVITY_SCHEDULED for i in commands):
        found += ["rename", "change_input"]
    if commands:
        found.append("drop")
    if _cross_turn_pairs(history):
        found.append("swap_across_turns")
    if _differing_pairs(history):
        found.append("swap_payloads")
    if any(e.kind == ev.VERSION_MARKER for e in history):
        found.append("drop_version_marker")
    return found


def _cross_turn_pairs(history: list[Event]) -> list[tuple[int, int]]:
    commands = _commands(history)
    return [
        (i, j)
        for i, j in itertools.combinations(commands, 2)
        if any(history[k].kind in ev.MESSAGE_KINDS for k in range(i + 1, j))
    ]


def _differing_pairs(history: list[Event]) -> list[tuple[int, int]]:
    return [(i, j) for i, j in itertools.combinations(_commands(history), 2) if _key(history[i]) != _key(history[j])]


def _with(event: Event, **data: Any) -> Event:
    return Event(event.kind, {**event.data, **data}, event.recorded_at)


def mutate(history: list[Event], mutation: str, data: st.DataObject) -> list[Event]:
    h = list(history)
    if mutation in ("rename", "change_input"):
        i = data.draw(st.sampled_from([i for i in _commands(h) if h[i].kind == ev.ACTIVITY_SCHEDULED]))
        if mutation == "rename":
            h[i] = _with(h[i], name=h[i].data["name"] + "_renamed")
        else:
            h[i] = _with(h[i], input={"changed": h[i].data["input"]})
    elif mutation == "drop":
        del h[data.draw(st.sampled_from(_commands(h)))]
    elif mutation == "swap_across_turns":
        i, j = data.draw(st.sampled_from(_cross_turn_pairs(h)))
        h[i], h[j] = h[j], h[i]
    elif mutation == "swap_payloads":
        i, j = data.draw(st.sampled_from(_differing_pairs(h)))
        a, b = h[i], h[j]
        h[i] = Event(b.kind, {**b.data, "task_id": a.data["task_id"]}, a.recorded_at)
        h[j] = Event(a.kind, {**a.data, "task_id": b.data["task_id"]}, b.recorded_at)
    else:
        markers = [i for i, e in enumerate(h) if e.kind == ev.VERSION_MARKER]
        del h[data.draw(st.sampled_from(markers))]
    return h


MUTATIONS = ["rename", "change_input", "drop", "swap_across_turns", "swap_payloads", "drop_version_marker"]
TAIL = [["act", "echo", 0], ["sleep", 5], ["version", "tail"]]  # makes every mutation applicable


@pytest.mark.parametrize("mutation", MUTATIONS)
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), data=st.data())
def test_mutated_history_is_nondeterminism(mutation: str, scenario: dict[str, Any], data: st.DataObject) -> None:
    scenario = {**scenario, "program": scenario["program"] + TAIL}
    sim = run_scenario(scenario)
    history = sim.history
    assert mutation in _mutations(history)
    mutated = mutate(history, mutation, data)
    execution = replay(sim, mutated)
    assert execution.outcome is not None, f"{mutation}: not detected"
    error = execution.outcome.data.get("error") or {}
    assert execution.outcome.kind == ev.ORCHESTRATION_FAILED and error.get("type") == "NonDeterminismError", (
        f"{mutation}: replay ended with {execution.outcome}"
    )
    assert execution.advance([], mutated[-1].recorded_at) == []  # an ended history gets nothing appended
    # the same mutation in a running instance's history (cut before its end) fails it with a new event
    running = mutated[:-1]
    if running[-1].kind not in ev.TERMINAL_KINDS:
        cut = replay(sim, running)
        new = cut.advance([], running[-1].recorded_at)
        assert cut.outcome is not None and new[-1] == cut.outcome
        assert cut.outcome.data["error"]["type"] == "NonDeterminismError", mutation


@FAST
@given(scenarios(), st.data())
def test_reordering_commands_within_a_turn_is_not_a_disagreement(scenario: dict[str, Any], data: st.DataObject) -> None:
    sim = run_scenario(scenario)
    history = sim.history
    same_turn = [
        (i, j)
        for i, j in itertools.combinations(_commands(history), 2)
        if not any(history[k].kind in ev.MESSAGE_KINDS for k in range(i + 1, j + 1))
    ]
    if not same_turn:
        return
    event("reordered within a turn")
    i, j = data.draw(st.sampled_from(same_turn))
    h = list(history)
    h[i], h[j] = h[j], h[i]
    execution = replay(sim, h)
    assert execution.advance([], h[-1].recorded_at) == []
    assert execution.outcome == history[-1]
