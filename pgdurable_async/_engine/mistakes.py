"""Messages that name the fix for the usual mistakes in an orchestration.

* awaiting ``asyncio.sleep`` (or ``anyio.sleep``): use ``ctx.sleep``, a durable timer;
* calling an activity directly (``await embed(ctx, doc)``): it runs inline, with the
  orchestration's ctx, on every replay; use ``ctx.call_activity(embed, doc)``.  Found
  when it awaits I/O (a coroutine that was handed the orchestration's ctx awaited
  something that is not a ctx task) or reads an activity-only field of ctx;
* returning a task instead of its result (``return ctx.call_activity(...)``): did you
  forget await?

Pure: it reads the suspended coroutine chain (``cr_await``), never an event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_SLEEPS = ("asyncio", "anyio", "trio")
_DEPTH = 64
#: ActivityContext fields an OrchestrationContext lacks: reading one means an activity got the wrong ctx.
ACTIVITY_ONLY_FIELDS = frozenset({"attempt", "activity_id", "conn"})


def _chain(coro: Any) -> Iterator[tuple[str, str, Any]]:
    """(module, qualname, coroutine) of each coroutine ``coro`` awaits, outermost first."""
    current = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    for _ in range(_DEPTH):
        if current is None:
            return
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        module = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
        yield module, str(getattr(current, "__qualname__", type(current).__name__)), current
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)


def foreign_await(coro: Any, ctx: Any, yielded: Any) -> str:
    """Why the orchestration ``coro`` stopped on ``yielded`` (not a ctx task), and what to do instead."""
    chain = list(_chain(coro))
    rule = "; do I/O in an activity, and combine tasks with ctx.all / ctx.any (not asyncio.gather / wait)"
    for module, qualname, _ in chain:
        if qualname == "sleep" and module.split(".")[0] in _SLEEPS:
            return (f"an orchestration may only await ctx tasks, not {module.split('.')[0]}.sleep: use "
                    "`await ctx.sleep(timedelta(seconds=...))`, a durable timer (a plain sleep is not recorded: "
                    "it runs again on every replay and is lost on a restart)" + rule)
    for module, qualname, inner in chain:
        frame = getattr(inner, "cr_frame", None)
        handed_ctx = frame is not None and any(value is ctx for value in frame.f_locals.values())
        if handed_ctx and not module.startswith("pgdurable_async."):
            return (f"an orchestration may only await ctx tasks, but {qualname}(), called directly with the "
                    f"orchestration's ctx, awaited a {type(yielded).__name__}: if it is an activity, run it through "
                    f"`await ctx.call_activity({qualname.rsplit('.', 1)[-1]}, input)`, which records its result"
                    + rule)
    awaited = next((f"{m}.{q}" for m, q, _ in reversed(chain) if m), None)
    return (f"an orchestration may only await ctx tasks, not {type(yielded).__name__}"
            + (f" (from {awaited})" if awaited else "") + rule)


def find_task(value: Any, task_type: type, depth: int = 3) -> Any:
    """A ctx task (or coroutine) inside an orchestration's output, or None."""
    if isinstance(value, task_type) or type(value).__name__ == "coroutine":
        return value
    if depth > 0:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
        for item in items:
            found = find_task(item, task_type, depth - 1)
            if found is not None:
                return found
    return None


def unawaited_output(found: Any) -> str:
    """The message for an orchestration that returned ``found`` (a task or coroutine) un-awaited."""
    what = type(found).__name__
    name = getattr(found, "name", None) or getattr(found, "__qualname__", None)
    shown = f"{what} {name!r}" if isinstance(name, str) else what
    return (f"the orchestration returned a {shown} instead of its result: did you forget await? "
            "(`return await ctx.call_activity(...)`; for several, `return await ctx.all([...])`)")


def activity_field(name: str) -> str:
    """The message for reading an ActivityContext field on an OrchestrationContext."""
    return (f"OrchestrationContext has no attribute {name!r} (an ActivityContext field): an activity called "
            "directly gets the orchestration's ctx; run it through `await ctx.call_activity(fn, input)`")
