"""The benchmark: the engine beside two raw-SQL floors, measured in one run (``run_bench``).

For each fan-out size N (``sizes``; 1k, 10k and 100k by default), one after the other:

1. **engine** — one orchestration awaiting ``ctx.all`` over N trivial activities, from
   ``client.start`` to the completion NOTIFY;
2. **minimal floor** (``minimal_floor.py``) — the least SQL any durable engine runs per
   activity, as issue 11 defines it: one bulk insert, 4 sessions claiming 64 per statement,
   acks in one transaction, completion history in batches of 1,000;
3. **engine-shaped floor** (``engine_floor.py``) — the engine's own statements, batches and
   sessions under its current capacity rule, with no engine around them.

Each phase's cost per activity: this process's CPU (µs), PostgreSQL statement time from
``pg_stat_statements`` (when the server preloads it; the throwaway cluster does) and the CPU of
the database's backends (when the server is local).  Then W concurrent three-step workflows
(workflows/s, p50/p99 start→done) and the wake latency of an idle runtime (``client.start``
returning → the first activity body running), engine beside the engine-shaped floor.

The ratios within one run are what survive a noisy machine; the load average is recorded.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TextIO

import anyio
import asyncpg

from pgdurable_async import Runtime
from pgdurable_async._base.errors import ConfigurationError

from .common import START_CONCURRENCY, WAKE_SAMPLES, connect, scratch_database
from .costs import Meter, current_rss_mb, peak_rss_mb
from .engine_floor import floor_fanout, floor_wake, floor_workflows
from .engine_side import Probe, bench_app, engine_fanout, engine_wake, engine_workflows
from .extra_workers import extra_workers
from .minimal_floor import SESSIONS, run_minimal_floor

__all__ = ["run_bench", "DEFAULT_SIZES"]

DEFAULT_SIZES = (1_000, 10_000, 100_000)
SIDES = ("engine", "minimal_floor", "engine_floor")


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class _Progress:
    """A rich progress bar on stderr while a phase runs (or one plain line per phase)."""

    def __init__(self, enabled: bool, say: Callable[[str], None]) -> None:
        self.say = say
        self._bar: Any = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:  # rich is optional: plain lines then
                return
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                                 refresh_per_second=4)

    @contextlib.asynccontextmanager
    async def phase(self, label: str, total: int | None) -> AsyncIterator[Callable[[Callable[[], int]], None]]:
        """Yields ``track(count)``: the bar follows ``count()`` until the phase ends."""
        counter: list[Callable[[], int]] = []
        if self._bar is None:
            self.say(f"  {label} ...")
            yield counter.append
            return
        task = self._bar.add_task(label, total=total)
        self._bar.start()
        try:
            async with anyio.create_task_group() as tg:
                async def follow() -> None:
                    while True:
                        if counter:
                            self._bar.update(task, completed=counter[0]())
                        await anyio.sleep(0.25)

                tg.start_soon(follow)
                yield counter.append
                tg.cancel_scope.cancel()
        finally:
            self._bar.remove_task(task)
            self._bar.stop()


async def _metered(meter: Meter, items: int, run: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run a phase between two cost snapshots; its figures plus its costs per item."""
    before = await meter.snapshot()
    figures = await run()
    figures.update(Meter.costs(before, await meter.snapshot(), items))
    figures["load_average"] = _load()
    return figures


@contextlib.asynccontextmanager
async def _helpers(meter: Meter, dsn: str, processes: int, concurrency: int) -> AsyncIterator[None]:
    """``processes - 1`` extra worker processes for one phase, their CPU counted by ``meter``."""
    async with extra_workers(dsn, processes - 1, concurrency) as pids:
        meter.extra_pids = pids
        try:
            yield
        finally:
            meter.extra_pids = []


async def _size_round(
    n: int, runtime: Runtime, engine_dsn: str, floor_dsn: str, meters: tuple[Meter, Meter],
    floor_args: dict[str, Any], progress: _Progress, processes: int,
) -> dict[str, Any]:
    """Engine, minimal floor and engine-shaped floor for one fan-out size."""
    engine_meter, floor_meter = meters
    found: dict[str, Any] = {}
    rss_before = current_rss_mb()
    async with _helpers(engine_meter, engine_dsn, processes, floor_args["max_inflight"]), \
            progress.phase(f"engine fan-out of {n:,}", n) as track:
        found["engine"] = await _metered(engine_meter, n, lambda: engine_fanout(runtime, engine_dsn, n, track))
    found["engine"]["rss_before_mb"] = rss_before
    found["engine"]["peak_rss_mb"] = peak_rss_mb()

    conns = [await connect(floor_dsn) for _ in range(SESSIONS + 1)]
    try:
        async with progress.phase(f"minimal floor of {n:,}", n) as track:
            found["minimal_floor"] = await _metered(
                floor_meter, n, lambda: run_minimal_floor(conns, n, progress=_adder(track))
            )
    finally:
        for conn in conns:
            await conn.close()
    async with progress.phase(f"engine-shaped floor of {n:,}", n) as track:
        found["engine_floor"] = await floor_fanout(floor_dsn, n, floor_args, runtime.turn_concurrency, track,
                                                   floor_meter)
        found["engine_floor"]["load_average"] = _load()
    rate = {side: found[side]["fanout_activities_per_s"] for side in SIDES}
    found["ratio"] = {"engine/minimal_floor": rate["engine"] / rate["minimal_floor"],
                      "engine/engine_floor": rate["engine"] / rate["engine_floor"]}
    return found


def _adder(track: Callable[[Callable[[], int]], None]) -> Callable[[int], None]:
    """A progress callback that adds up what it is told, tracked by ``track``."""
    done = [0]
    track(lambda: done[0])

    def add(k: int) -> None:
        done[0] += k

    return add


# -- report --------------------------------------------------------------------------------

_SIZE_ROWS: list[tuple[str, str, str]] = [
    ("fanout_activities_per_s", "activities/s", "{:,.0f}"),
    ("fanout_seconds", "wall time (s)", "{:.2f}"),
    ("cpu_us_per_activity", "Python CPU per activity (us)", "{:,.1f}"),
    ("pg_statement_us_per_activity", "PG statement time per activity (us)", "{:,.1f}"),
    ("pg_backend_cpu_us_per_activity", "PG backend CPU per activity (us)", "{:,.1f}"),
    ("pg_statements_per_activity", "PG statements per activity", "{:.3f}"),
    ("fanout_turns", "turns", "{:,}"),
    ("peak_rss_mb", "peak RSS (MiB)", "{:,.0f}"),
]

_RUN_ROWS: list[tuple[str, str, str]] = [
    ("workflows_per_s", "3-step workflows (workflows/s)", "{:,.0f}"),
    ("workflow_latency_p50_ms", "workflow start->done p50 (ms)", "{:,.1f}"),
    ("workflow_latency_p99_ms", "workflow start->done p99 (ms)", "{:,.1f}"),
    ("cpu_us_per_workflow", "Python CPU per workflow (us)", "{:,.0f}"),
    ("pg_statement_us_per_workflow", "PG statement time per workflow (us)", "{:,.0f}"),
    ("pg_statements_per_workflow", "PG statements per workflow", "{:.1f}"),
    ("wake_latency_p50_ms", "wake start->activity p50 (ms)", "{:.2f}"),
    ("wake_latency_p99_ms", "wake start->activity p99 (ms)", "{:.2f}"),
]


def _grid(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cell(side: dict[str, Any], key: str, fmt: str) -> str:
    value = side.get(key)
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def _size_table(n: int, found: dict[str, Any]) -> str:
    lines: list[tuple[str, ...]] = [(f"fan-out {n:,}", "engine", "minimal floor", "engine-shaped floor")]
    for key, label, fmt in _SIZE_ROWS:
        lines.append((label, *(_cell(found[side], key, fmt) for side in SIDES)))
    ratio = found["ratio"]
    lines.append(("engine / floor", "", f"{100 * ratio['engine/minimal_floor']:.0f} %",
                  f"{100 * ratio['engine/engine_floor']:.0f} %"))
    return _grid(lines)


def _run_table(engine: dict[str, Any], floor: dict[str, Any]) -> str:
    lines: list[tuple[str, ...]] = [("workflows and wake-ups", "engine", "engine-shaped floor", "engine/floor")]
    for key, label, fmt in _RUN_ROWS:
        e, f = engine.get(key), floor.get(key)
        ratio = f"{100 * e / f:.0f} %" if isinstance(e, (int, float)) and isinstance(f, (int, float)) and f else "-"
        lines.append((label, _cell(engine, key, fmt), _cell(floor, key, fmt), ratio))
    return _grid(lines)


def _top_statements(found: dict[str, Any]) -> str:
    rows = found["engine"].get("pg_top_statements") or []
    return "\n".join(f"    {r['us_per_activity']:8.1f} us  {r['calls']:>7,} calls  {r['query'][:90]}" for r in rows)


def _per_workflow(figures: dict[str, Any]) -> dict[str, Any]:
    """A workflow phase's per-item costs, renamed from per activity to per workflow."""
    renamed = {}
    for key, value in figures.items():
        if key.endswith("_per_activity"):
            renamed[key.replace("_per_activity", "_per_workflow")] = value
        else:
            renamed[key] = value
    return renamed


# -- entry point --------------------------------------------------------------------------


async def run_bench(
    dsn: str, *, sizes: Sequence[int] = DEFAULT_SIZES, workflows: int = 1000, concurrency: int = 256,
    out: TextIO, progress: bool = False, processes: int = 1,
) -> dict[str, Any]:
    """Measure the engine beside the minimal and the engine-shaped floors; print tables to ``out``.

    Works in two scratch databases created on ``dsn``'s server (its role needs CREATEDB) and
    dropped afterwards.  Returns every figure: ``sizes`` (per fan-out size: ``engine``,
    ``minimal_floor``, ``engine_floor``, ``ratio``), ``engine`` and ``floor`` (workflows and
    wake latency), ``ratio``, ``scaling`` (the largest size's rate over 10k's), ``params``,
    ``machine`` and ``ok`` (every instance of every phase completed with the expected history).
    With ``processes`` > 1 the fan-out and workflow phases run ``processes - 1`` worker processes
    beside this one's runtime (their CPU counts in the engine's); the wake-up phase runs here alone.
    """
    sizes = sorted(set(sizes))
    if not sizes or min(sizes) < 1 or workflows < 1 or concurrency < 1 or processes < 1:
        raise ConfigurationError("sizes, workflows, concurrency and processes must be >= 1")

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    bar = _Progress(progress, say)
    probe = Probe()
    app = bench_app(probe)
    per_size: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    floor: dict[str, Any] = {}
    load_start = _load()
    async with scratch_database(dsn, "engine") as engine_dsn, scratch_database(dsn, "floor") as floor_dsn:
        engine_conn, floor_conn = await connect(engine_dsn), await connect(floor_dsn)
        try:
            server_version = await engine_conn.fetchval("SHOW server_version")
            meters = (await Meter.open(engine_conn), await Meter.open(floor_conn))
            say(f"pgdurable_async bench: sizes={','.join(map(str, sizes))} workflows={workflows} "
                f"concurrency={concurrency} processes={processes} (PostgreSQL {server_version}, {os.cpu_count()} CPUs, "
                f"load {' '.join(map(str, load_start))}"
                f"{'' if meters[0].statements_available else ', no pg_stat_statements'})")
            async with Runtime(app, engine_dsn, max_concurrency=concurrency) as runtime:
                floor_args = {
                    "orchestrations": sorted(app.orchestrations),
                    "activities": sorted(app.activities),
                    "turn_batch": runtime.turns.batch_size,
                    "claim_batch": min(concurrency, runtime.activities.claim_batch),
                    "max_inflight": concurrency,
                }
                turn_loops = runtime.turn_concurrency
                for n in sizes:
                    found = await _size_round(n, runtime, engine_dsn, floor_dsn, meters, floor_args, bar, processes)
                    per_size[str(n)] = found
                    say("")
                    say(_size_table(n, found))

                async with _helpers(meters[0], engine_dsn, processes, concurrency), \
                        bar.phase(f"engine {workflows:,} three-step workflows", None):
                    engine.update(_per_workflow(await _metered(
                        meters[0], workflows, lambda: engine_workflows(runtime, engine_dsn, workflows))))
                async with bar.phase(f"engine-shaped floor {workflows:,} three-step workflows", None):
                    floor.update(_per_workflow(await _metered(
                        meters[1], workflows, lambda: floor_workflows(floor_dsn, workflows, floor_args, turn_loops))))
                async with bar.phase(f"engine wake latency ({WAKE_SAMPLES} starts)", None):
                    engine.update(await engine_wake(runtime, engine_dsn, probe, WAKE_SAMPLES))
                async with bar.phase(f"engine-shaped floor wake latency ({WAKE_SAMPLES} starts)", None):
                    floor.update(await floor_wake(floor_dsn, WAKE_SAMPLES, floor_args))
                engine["activity_stats"] = dict(runtime.activities.stats)
        finally:
            await engine_conn.close()
            await floor_conn.close()

    rates = {int(n): f["engine"]["fanout_activities_per_s"] for n, f in per_size.items()}
    scaling: dict[str, float] = {}
    if 10_000 in rates and max(rates) > 10_000:
        scaling[f"engine {max(rates)}/10000 rate"] = rates[max(rates)] / rates[10_000]
    report: dict[str, Any] = {
        "params": {"sizes": sizes, "workflows": workflows, "concurrency": concurrency, "processes": processes,
                   "wake_samples": WAKE_SAMPLES, "start_concurrency": START_CONCURRENCY,
                   "minimal_floor_sessions": SESSIONS},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "postgres": server_version, "asyncpg": asyncpg.__version__,
                    "load_average_start": load_start, "load_average_end": _load(),
                    "pg_stat_statements": meters[0].statements_available},
        "sizes": per_size,
        "engine": engine,
        "floor": floor,
        "ratio": {key: engine[key] / floor[key] for key in ("workflows_per_s", "wake_latency_p50_ms",
                                                              "wake_latency_p99_ms") if floor.get(key)},
        "scaling": scaling,
    }
    report["ok"] = all(f[side]["fanout_ok"] for f in per_size.values() for side in SIDES) and all(
        side[k] for side in (engine, floor) for k in ("workflows_ok", "wake_ok"))
    say("")
    say(_run_table(engine, floor))
    largest = str(max(sizes))
    if per_size[largest]["engine"].get("pg_top_statements"):
        say("")
        say(f"engine's costliest statements at {int(largest):,} (PG time per activity):")
        say(_top_statements(per_size[largest]))
    for label, value in scaling.items():
        say(f"{label}: {100 * value:.0f} %")
    say("")
    say("all instances completed" if report["ok"] else "SOME INSTANCES DID NOT COMPLETE AS EXPECTED")
    say(f"load average at the end: {' '.join(map(str, report['machine']['load_average_end']))}")
    return report

