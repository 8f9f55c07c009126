"""The mixed workload the chaos harness runs in real worker processes.

Every orchestration's correct output is a pure function of its input
(:func:`expected_output`), so the checker needs no record of what happened.
The transactional activity ``record`` writes two effects in its completion's
transaction: one row into ``public.chaos_effects`` (no unique key, so a doubled
effect stays visible) and an increment of its key's counter in
``public.chaos_counters`` (an upsert: a doubled effect shows as ``n = 2``).

Events come from the driver, each with an idempotency key that is also in its
data (``{"key": ..., "n": ...}``), so the checker can tell every delivery apart
in history: a ``mixed`` instance waits for its ``inbox`` ``msg`` events, then
for ``close`` (raised only once every ``msg`` raise has returned, so a duplicate
would land while the instance is still live); every execution of a ``looper``
child waits for one ``tick`` (early ticks are carried over by continue-as-new).
"""

from __future__ import annotations

import os
from typing import Any

import anyio

import pgdurable_async as pgd

app = pgd.App()

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS public.chaos_effects (
    activity_id text NOT NULL,
    key         text NOT NULL,
    worker_pid  integer NOT NULL,
    attempt     integer NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS public.chaos_counters (
    key text PRIMARY KEY,
    n   integer NOT NULL
)
"""

FLAKY_RETRY = pgd.RetryPolicy(max_attempts=4, initial_interval=0.2, backoff=2.0, max_interval=2.0)
RECORD_RETRY = pgd.RetryPolicy(max_attempts=5, initial_interval=0.2, backoff=2.0, max_interval=2.0)
DOOMED_RETRY = pgd.RetryPolicy(max_attempts=2, initial_interval=0.1)


# -- activities ------------------------------------------------------------------------
@app.activity
async def square(ctx: pgd.ActivityContext, n: int) -> int:
    """The trivial fan-out step."""
    return n * n


@app.activity
async def inc(ctx: pgd.ActivityContext, step: dict[str, Any]) -> int:
    """One link of a sequential chain; pauses a little so a kill can land mid-activity."""
    await anyio.sleep(step["pause"])
    return int(step["value"]) + int(step["add"])


@app.activity(retry=FLAKY_RETRY)
async def flaky(ctx: pgd.ActivityContext, step: dict[str, Any]) -> int:
    """Fails its first ``fails`` attempts, then succeeds: exercises durable retries."""
    if ctx.attempt <= step["fails"]:
        raise RuntimeError(f"flaky attempt {ctx.attempt} of {ctx.activity_id}")
    return int(step["value"])


@app.activity(retry=DOOMED_RETRY)
async def doomed(ctx: pgd.ActivityContext, _: Any) -> None:
    """Always fails; the orchestration catches the final ``ActivityError``."""
    raise ValueError("doomed")


@app.transaction(retry=RECORD_RETRY)
async def record(ctx: pgd.TransactionContext, step: dict[str, Any]) -> str:
    """Applies one effect in the completion's transaction; may fail (and roll back) once."""
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO public.chaos_effects (activity_id, key, worker_pid, attempt) VALUES ($1, $2, $3, $4)",
        ctx.activity_id, step["key"], os.getpid(), ctx.attempt,
    )
    await ctx.conn.execute(
        "INSERT INTO public.chaos_counters AS c (key, n) VALUES ($1, 1)"
        " ON CONFLICT (key) DO UPDATE SET n = c.n + 1",
        step["key"],
    )
    if step.get("hold"):
        await ctx.conn.execute("SELECT pg_sleep($1)", float(step["hold"]))
    if step.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError(f"record {step['key']} fails its first attempt (rolled back)")
    return str(step["key"])


# -- orchestrations -------------------------------------------------------------------------
async def _chain(ctx: pgd.OrchestrationContext, n: int, pause: float) -> int:
    value = 0
    for i in range(n):
        value = await ctx.call_activity(inc, {"value": value, "add": i + 1, "pause": pause})
    return value


async def _records(ctx: pgd.OrchestrationContext, tag: str, n: int, hold: float = 0.02) -> list[str]:
    steps = [{"key": f"{tag}/rec-{i}", "fail_first": i % 3 == 0, "hold": hold} for i in range(n)]
    return list(await ctx.all([ctx.call_activity(record, s) for s in steps]))


async def _flaky(ctx: pgd.OrchestrationContext, fails: list[int]) -> list[int]:
    tasks = [ctx.call_activity(flaky, {"fails": k, "value": 7 * j}) for j, k in enumerate(fails)]
    return list(await ctx.all(tasks))


async def _timers(ctx: pgd.OrchestrationContext, sleeps: list[float]) -> dict[str, Any]:
    for seconds in sleeps:
        await ctx.sleep(seconds)
    short = ctx.sleep(0.3)
    first = await ctx.any([short, ctx.sleep(600)])  # the long timer is left pending: dropped at the end
    try:
        await ctx.wait_for_event("never", timeout=0.5)
        timeout = "no-timeout"
    except pgd.TimeoutError:
        timeout = "timed-out"
    return {"slept": len(sleeps), "race": "short" if first is short else "long", "timeout": timeout}


async def _events(ctx: pgd.OrchestrationContext, inbox: int) -> dict[str, Any]:
    msgs = [await ctx.wait_for_event("msg") for _ in range(inbox)]
    close = await ctx.wait_for_event("close")
    return {"msgs": sorted(m["n"] for m in msgs), "close": close["key"]}


async def _children(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> list[Any]:
    tasks = [ctx.call_orchestration(leaf, child, instance_id=child["tag"]) for child in spec["children"]]
    tasks.append(ctx.call_orchestration(looper, spec["looper"], instance_id=spec["looper"]["tag"]))
    return list(await ctx.all(tasks))


async def _doomed(ctx: pgd.OrchestrationContext, enabled: bool) -> str:
    if not enabled:
        return "skipped"
    try:
        await ctx.call_activity(doomed, None)
    except pgd.ActivityError as exc:
        return f"caught:{getattr(exc, 'error_type', '?')}"
    return "not-raised"


@app.orchestration
async def mixed(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """A fan-out, then chains, timers, events, children, records and retries side by side."""
    ctx.set_custom_status({"stage": "fanout"})
    squares = await ctx.all([ctx.call_activity(square, i) for i in range(spec["fanout"])], limit=spec["limit"])
    ctx.set_custom_status({"stage": "mixed"})
    chain, timers, events, children, records, flaky_values, doomed_result = await ctx.all([
        _chain(ctx, spec["chain"], spec["pause"]),
        _timers(ctx, spec["sleeps"]),
        _events(ctx, spec["inbox"]),
        _children(ctx, spec),
        _records(ctx, spec["tag"], spec["records"]),
        _flaky(ctx, spec["flaky"]),
        _doomed(ctx, spec["doomed"]),
    ])
    ctx.set_custom_status({"stage": "done"})
    return {
        "fanout": sum(squares), "chain": chain, "timers": timers, "events": events, "children": children,
        "records": records, "flaky": flaky_values, "doomed": doomed_result,
    }


@app.orchestration
async def leaf(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """A sub-orchestration: a short chain, a timer and a few records."""
    chain = await _chain(ctx, spec["chain"], 0.02)
    await ctx.sleep(spec["sleep"])
    records = await _records(ctx, spec["tag"], spec["records"])
    return {"chain": chain, "records": records}


@app.orchestration
async def looper(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """A sub-orchestration that continues as new ``left`` times: a record and a ``tick`` per execution."""
    await ctx.call_activity(record, {"key": f"{spec['tag']}/loop-{spec['left']}", "hold": 0.0})
    acc = await ctx.call_activity(inc, {"value": spec["acc"], "add": 1, "pause": 0.0})
    tick = await ctx.wait_for_event("tick")
    got = [*spec["got"], tick["n"]]
    if spec["left"] > 0:
        ctx.continue_as_new({**spec, "left": spec["left"] - 1, "acc": acc, "got": got})
    return {"acc": int(acc), "ticks": sorted(got)}


@app.orchestration
async def probe(ctx: pgd.OrchestrationContext, spec: dict[str, Any]) -> int:
    """Slow records that spread over every worker: shows each one works after a restart."""
    keys = await _records(ctx, spec["tag"], spec["records"], hold=spec["hold"])
    return len(keys)


# -- the checker's oracle ----------------------------------------------------------------------
def expected_output(name: str, spec: Any) -> Any:
    """The correct output of orchestration ``name`` for input ``spec`` (its current execution's)."""
    if name == "mixed":
        return {
            "fanout": sum(i * i for i in range(spec["fanout"])),
            "chain": _triangle(spec["chain"]),
            "timers": {"slept": len(spec["sleeps"]), "race": "short", "timeout": "timed-out"},
            "events": {"msgs": list(range(spec["inbox"])), "close": close_key(spec["tag"])},
            "children": [expected_output("leaf", c) for c in spec["children"]]
            + [{"acc": spec["looper"]["acc"] + spec["looper"]["left"] + 1,
                "ticks": list(range(spec["looper"]["left"] + 1))}],
            "records": _record_keys(spec["tag"], spec["records"]),
            "flaky": [7 * j for j in range(len(spec["flaky"]))],
            "doomed": "caught:ValueError" if spec["doomed"] else "skipped",
        }
    if name == "leaf":
        return {"chain": _triangle(spec["chain"]), "records": _record_keys(spec["tag"], spec["records"])}
    if name == "looper":  # the current execution's input: left == 0
        return {"acc": spec["acc"] + 1, "ticks": list(range(len(spec["got"]) + 1))}
    if name == "probe":
        return spec["records"]
    raise ValueError(f"no oracle for orchestration {name!r}")


def expected_children(spec: dict[str, Any]) -> dict[str, str]:
    """Instance id -> orchestration name of the sub-orchestrations a ``mixed`` instance starts."""
    return {**{c["tag"]: "leaf" for c in spec["children"]}, spec["looper"]["tag"]: "looper"}


def planned_events(spec: dict[str, Any]) -> dict[str, dict[str, tuple[str, Any]]]:
    """Instance id -> delivery key -> (event name, data): every event the driver raises for ``spec``.

    Each must be delivered exactly once.  The data carries the key (history does not).
    """
    tag, looper_tag = spec["tag"], spec["looper"]["tag"]
    inbox = {f"{tag}/msg-{i}": ("msg", message(f"{tag}/msg-{i}", i)) for i in range(spec["inbox"])}
    inbox[close_key(tag)] = ("close", message(close_key(tag), spec["inbox"]))
    ticks = {f"{looper_tag}/tick-{j}": ("tick", message(f"{looper_tag}/tick-{j}", j))
             for j in range(spec["looper"]["left"] + 1)}
    return {tag: inbox, looper_tag: ticks}


def message(key: str, n: int) -> dict[str, Any]:
    """The data of one raised event."""
    return {"key": key, "n": n}


def close_key(tag: str) -> str:
    return f"{tag}/close"


def _record_keys(tag: str, n: int) -> list[str]:
    return [f"{tag}/rec-{i}" for i in range(n)]


def _triangle(n: int) -> int:
    return n * (n + 1) // 2
