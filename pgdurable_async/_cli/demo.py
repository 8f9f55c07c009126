"""The demo app behind ``python -m pgdurable_async demo``: a fan-out, a timer, a fan-in.

``run_demo`` runs it on an embedded :class:`Runtime` and prints live progress
(read from the instance's history and custom status; a rich progress bar on a
terminal), then the result, the elapsed time and the history's event counts.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TextIO

import anyio
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .._app import App
from .._base.definitions import ActivityContext
from .._client.client import Client
from .._engine.context import OrchestrationContext
from .._runtime.runtime import Runtime

app = App()

FANOUT_LIMIT = 256  # activities in flight at once (also the runtime's max_concurrency)
PROGRESS_INTERVAL = 0.5


@app.activity(name="pgdurable_demo.square")
async def square(ctx: ActivityContext, x: int) -> int:
    """A trivial activity: ``x * x``."""
    return x * x


@app.orchestration(name="pgdurable_demo")
async def demo(ctx: OrchestrationContext, params: dict[str, Any]) -> dict[str, Any]:
    """Fan out ``n`` squares (``limit`` at a time), sleep on a durable timer, sum them up."""
    n = int(params["n"])
    ctx.set_custom_status({"stage": "fan-out", "total": n})
    limit = int(params.get("limit", FANOUT_LIMIT))
    values = await ctx.all([ctx.call_activity(square, i) for i in range(n)], limit=limit)
    ctx.set_custom_status({"stage": "timer", "total": n})
    await ctx.sleep(timedelta(milliseconds=int(params.get("sleep_ms", 300))))
    ctx.set_custom_status({"stage": "done", "total": n})
    return {"activities": n, "sum_of_squares": sum(values)}


async def run_demo(dsn: str, *, schema: str = "pgdurable", fanout: int = 200, out: TextIO) -> dict[str, Any]:
    """Run one demo instance to completion on ``dsn``; returns its output.

    On a terminal the progress is a rich progress bar; elsewhere a line every
    ``PROGRESS_INTERVAL`` seconds.
    """
    instance_id = f"demo-{uuid.uuid4().hex[:12]}"
    say = _printer(out)
    async with Runtime(app, dsn, schema=schema, max_concurrency=FANOUT_LIMIT) as runtime:
        client = runtime.client
        started = anyio.current_time()
        await client.start(demo, {"n": fanout, "limit": FANOUT_LIMIT}, instance_id=instance_id)
        say(f"started {instance_id}: {fanout} activities, at most {FANOUT_LIMIT} at once")
        with _progress_view(out, fanout, started, say) as show:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_report_progress, client, instance_id, fanout, show)
                result: dict[str, Any] = await client.wait(instance_id)
                tg.cancel_scope.cancel()
            elapsed = anyio.current_time() - started
            show("done", fanout)
        counts = Counter(e.kind for e in await client.history(instance_id))
    say(f"result: {orjson.dumps(result).decode()}")
    say(f"elapsed: {elapsed:.2f} s ({fanout / elapsed:,.0f} activities/s including the timer)")
    say(f"history: {sum(counts.values())} events")
    width = max(len(kind) for kind in counts)
    for kind, count in counts.items():
        say(f"  {kind.ljust(width)}  {count:>7}")
    return result


Show = Callable[[str, int], None]


@contextlib.contextmanager
def _progress_view(out: TextIO, total: int, started: float, say: Callable[[str], None]) -> Iterator[Show]:
    """A ``show(stage, done)`` that draws a rich progress bar on a terminal, else prints a line."""
    if not out.isatty():
        yield lambda stage, done: say(_progress_line(anyio.current_time() - started, stage, done, total))
        return
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("activities completed"), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=out)) as progress:
        task = progress.add_task("fan-out", total=total)
        yield lambda stage, done: progress.update(task, description=stage, completed=done)


async def _report_progress(client: Client, instance_id: str, total: int, show: Show) -> None:
    """Every ``PROGRESS_INTERVAL`` seconds: stage and completed activities."""
    while True:
        await anyio.sleep(PROGRESS_INTERVAL)
        state = await client.status(instance_id)
        custom = state.custom_status if isinstance(state.custom_status, dict) else {}
        stage = str(custom.get("stage", state.status.value))
        if stage == "fan-out":
            done = sum(1 for e in await client.history(instance_id) if e.kind == "activity_completed")
        else:
            done = total if stage in ("timer", "done") else 0
        show(stage, done)


def _progress_line(elapsed: float, stage: str, done: int, total: int) -> str:
    width = len(str(total))
    bar = "#" * (20 * done // total) if total else ""
    return f"[{elapsed:6.1f} s] {stage:<8} [{bar:<20}] {done:>{width}}/{total} activities completed"


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return say
