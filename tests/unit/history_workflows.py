"""Orchestrations whose recorded histories are committed in ``histories/*.json``.

``test_history_files.py`` replays each file against the code here: the current
versions must replay cleanly, the ``changed_*`` versions (code edited under a
running instance) must fail with ``NonDeterminismError``.

The files were written once by the simulator; regenerate them (only when a
history format change is intended) with::

    .venv/bin/python -m tests.unit.history_workflows
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pgdurable_async as pgd
from pgdurable_async._engine.execution import Event

from .sim import Raise, Sim, save_history

HISTORIES = Path(__file__).parent / "histories"


def _explode(x: Any) -> Any:
    raise RuntimeError(f"cannot process {x}")


ACTIVITIES: dict[str, Any] = {
    "square": lambda x: x * x,
    "notify": lambda msg: f"sent {msg!r}",
    "explode": _explode,
    "audit": lambda x: None,
}


# -- the current code ---------------------------------------------------------------------
async def fanout_with_limit(ctx: pgd.OrchestrationContext, n: int) -> int:
    ctx.set_custom_status("fanning out")
    squares = await ctx.all([ctx.call_activity("square", i) for i in range(n)], limit=3)
    ctx.set_custom_status({"done": len(squares)})
    return sum(squares)


async def timer_and_event(ctx: pgd.OrchestrationContext, _: Any) -> dict[str, Any]:
    await ctx.sleep(timedelta(minutes=10))
    approval = await ctx.wait_for_event("approval", timeout=timedelta(hours=1))
    try:
        await ctx.wait_for_event("escalation", timeout=timedelta(minutes=5))
        escalated = True
    except pgd.TimeoutError:
        escalated = False
    sent = await ctx.call_activity("notify", approval)
    return {"approval": approval, "escalated": escalated, "sent": sent}


async def child_square(ctx: pgd.OrchestrationContext, x: int) -> int:
    return int(await ctx.call_activity("square", x))


async def child_fails(ctx: pgd.OrchestrationContext, x: int) -> None:
    await ctx.call_activity("explode", x, retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0))


async def with_children(ctx: pgd.OrchestrationContext, x: int) -> list[Any]:
    squared = await ctx.call_orchestration("child_square", x)
    try:
        await ctx.call_orchestration("child_fails", x, instance_id=f"{ctx.instance_id}-failing")
        failure = None
    except pgd.SubOrchestrationError as exc:
        failure = exc.error["message"]
    return [squared, failure]


async def counter(ctx: pgd.OrchestrationContext, state: dict[str, int]) -> int:
    total = state["total"] + int(await ctx.call_activity("square", state["n"]))
    await ctx.wait_for_event("tick")
    if state["n"] < 3:
        ctx.continue_as_new({"n": state["n"] + 1, "total": total})
    return total


CHILDREN = {"child_square": child_square, "child_fails": child_fails}


# -- the same orchestrations after an incompatible edit ----------------------------------------
async def changed_fanout_renamed(ctx: pgd.OrchestrationContext, n: int) -> int:
    """The activity was renamed."""
    ctx.set_custom_status("fanning out")
    squares = await ctx.all([ctx.call_activity("square_v2", i) for i in range(n)], limit=3)
    return sum(squares)


async def changed_fanout_extra_command(ctx: pgd.OrchestrationContext, n: int) -> int:
    """A new command was inserted before the recorded ones."""
    await ctx.call_activity("audit", n)
    squares = await ctx.all([ctx.call_activity("square", i) for i in range(n)], limit=3)
    return sum(squares)


async def changed_children_dropped(ctx: pgd.OrchestrationContext, x: int) -> list[Any]:
    """The second child is no longer started: the history records a command the code no longer issues."""
    squared = await ctx.call_orchestration("child_square", x)
    return [squared, None]


async def changed_timer_removed(ctx: pgd.OrchestrationContext, _: Any) -> dict[str, Any]:
    """The initial sleep was removed: the approval wait now issues the first command (a timer, too)."""
    approval = await ctx.wait_for_event("approval", timeout=timedelta(hours=1))
    sent = await ctx.call_activity("notify", approval)
    return {"approval": approval, "escalated": False, "sent": sent}


# -- writing the files ----------------------------------------------------------------------------
def _scrub(value: Any) -> Any:
    """Tracebacks name absolute paths on the machine that wrote the file: keep them out."""
    if isinstance(value, dict):
        return {k: ("Traceback (scrubbed)" if k == "traceback" else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _save(file: str, sim: Sim, orchestration: str, run: int = -1, note: str = "") -> None:
    chosen = sim.runs[run]
    events = [Event(e.kind, _scrub(e.data), e.recorded_at) for e in chosen.history]
    save_history(HISTORIES / file, orchestration=orchestration, instance_id=sim.instance_id,
                 execution_id=chosen.execution_id, name=sim.name, events=events, note=note)


def main() -> None:
    HISTORIES.mkdir(exist_ok=True)
    fan = Sim(fanout_with_limit, 7, activities=ACTIVITIES, instance_id="fanout-7", name="fanout_with_limit",
              order="random", batch=3, seed=11).run()
    _save("fanout_with_limit.json", fan, "fanout_with_limit",
          note="7 activities, limit=3, completions delivered out of order and in batches")
    running = Sim(fanout_with_limit, 7, activities=ACTIVITIES, instance_id="fanout-7", name="fanout_with_limit",
                  order="random", batch=3, seed=11).run(until_turn=3)
    running.close()
    _save("fanout_with_limit_running.json", running, "fanout_with_limit", note="the same instance, mid-run")

    timer = Sim(timer_and_event, None, activities=ACTIVITIES, instance_id="approval-1", name="timer_and_event",
                raises=[Raise("approval", {"by": "alice"}, after_turn=2)]).run()
    _save("timer_and_event.json", timer, "timer_and_event",
          note="a sleep, an event that arrives before its timeout, a wait that times out")

    kids = Sim(with_children, 4, activities=ACTIVITIES, children=CHILDREN, instance_id="parent-4",
               name="with_children").run()
    _save("sub_orchestration.json", kids, "with_children",
          note="a child with a derived id that completes, a child with a chosen id that fails")

    chain = Sim(counter, {"n": 1, "total": 0}, activities=ACTIVITIES, instance_id="counter-1", name="counter",
                raises=[Raise("tick", i) for i in range(4)], batch=None).run()
    _save("continue_as_new.json", chain, "counter", run=0,
          note="execution 1: ends with continued_as_new carrying the unconsumed ticks")
    _save("continue_as_new_last.json", chain, "counter", run=-1, note="execution 3: the carried ticks, then the end")

    def unknown_kind(events: list[dict[str, Any]]) -> None:
        events[5]["kind"] = "activity_exploded"

    def missing_task_id(events: list[dict[str, Any]]) -> None:
        del events[3]["data"]["task_id"]

    _malformed("malformed_unknown_kind.json", unknown_kind, "hand-broken: event 6 has an unknown kind")
    _malformed("malformed_missing_task_id.json", missing_task_id, "hand-broken: an activity_scheduled lost its task_id")


def _malformed(file: str, mutate: Any, note: str) -> None:
    doc = json.loads((HISTORIES / "fanout_with_limit.json").read_text())
    mutate(doc["events"])
    doc["note"] = note
    (HISTORIES / file).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
