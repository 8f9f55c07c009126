"""``top``: a live view of the queues, the rates, and the work that runs and fails.

One frame is read in one go (a handful of cheap queries; the dashboard's own):
instances per status, each queue's depth, ready / running / delayed rows and the
age of its oldest ready row, events per second since the start of the previous
minute, the running instances with what each waits on, and the latest failures.
On a terminal it redraws every ``--interval`` seconds (rich ``Live``) until
Ctrl-C; ``--once`` prints one frame and exits (in a pipe, as plain text).
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._base.types import InstanceState, Status
from .._client import Client
from .._store import dashboard_store as store
from .admin import client_for
from .render import console, emit, error_text, format_waits, iso, new_table, status_text

RUNNING_ROWS = 10
FAILURE_ROWS = 5
_RATES = (
    ("activities completed", "activity_completed"),
    ("activities failed", "activity_failed"),
    ("instances started", "orchestration_started"),
    ("instances completed", "orchestration_completed"),
    ("instances failed", "orchestration_failed"),
)


@dataclass
class Frame:
    """What one redraw shows, read at ``now`` (the database's clock)."""

    now: datetime
    counts: dict[str, int]
    queues: list[store.QueueStats] | None  # None: this role may not read the queues
    rates: dict[str, float]  # event kind -> per second over ``window`` seconds
    window: float
    running: list[InstanceState]
    failures: list[store.Failure]


async def read_frame(client: Client) -> Frame:
    """Read one frame; the figures come from one connection, one query each."""
    async def read(conn: Any) -> dict[str, Any]:
        return {
            "now": await store.now(conn),
            "counts": await store.status_counts(conn),
            "queues": await store.queues(conn),
            "throughput": await store.throughput(conn, minutes=2),
            "failures": await store.recent_failures(conn, limit=FAILURE_ROWS),
        }

    data = await (await client.ready_db()).run(read, transaction=False)
    now: datetime = data["now"]
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=1)
    window = max((now - since).total_seconds(), 1.0)
    totals: dict[str, int] = {}
    for (_minute, kind), n in data["throughput"].items():
        totals[kind] = totals.get(kind, 0) + n
    running = await client.list(status=Status.RUNNING.value, limit=RUNNING_ROWS)
    return Frame(now=now, counts=data["counts"], queues=data["queues"],
                 rates={kind: totals.get(kind, 0) / window for _, kind in _RATES}, window=window,
                 running=running, failures=data["failures"])


def _age(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds > 0 else "0 s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(frame: Frame, *, dsn_label: str) -> RenderableType:
    """One frame: a header line, then the queue, rate, running and failure tables."""
    counts = Text(f"pgdurable top · {dsn_label} · {iso(frame.now)}\n", style="bold")
    for i, status in enumerate(Status):
        if i:
            counts.append("  ")
        counts.append(f"{status.value} ")
        counts.append(str(frame.counts.get(status.value, 0)), style=status_text(status.value).style)
    parts: list[RenderableType] = [counts, _queues(frame), _rates(frame), _running(frame), _failures(frame)]
    return Group(*parts)


def _queues(frame: Frame) -> RenderableType:
    if frame.queues is None:
        return Text("\nqueues: this role may not read them (connect as the owner or a worker role)", style="yellow")
    table = new_table("QUEUE", "DEPTH", "READY", "RUNNING", "DELAYED", "OLDEST READY", "NEXT DUE", title="\nqueues")
    for column in table.columns[1:]:
        column.justify = "right"
    for q in frame.queues:
        table.add_row(q.queue, str(q.depth), str(q.ready), str(q.running), str(q.delayed),
                      Text(_age(q.oldest_ready_age), style="yellow" if q.oldest_ready_age >= 5 else ""),
                      "-" if q.next_due_in is None else f"in {_age(q.next_due_in)}")
    return table


def _rates(frame: Frame) -> Table:
    table = new_table("EVENTS", "PER SECOND", title=f"\nrates (over the last {frame.window:.0f} s)")
    table.columns[1].justify = "right"
    for label, kind in _RATES:
        rate = frame.rates[kind]
        style = "red" if rate and "failed" in kind else ""
        table.add_row(label, Text(f"{rate:,.1f}", style=style))
    return table


def _running(frame: Frame) -> Table:
    title = f"\nrunning (newest {RUNNING_ROWS})" if len(frame.running) >= RUNNING_ROWS else "\nrunning"
    table = new_table("INSTANCE ID", "NAME", "AGE", "WAITING ON", title=title)
    for s in frame.running:
        waits = format_waits(s.waiting_on)
        shown = waits[0] + (f" (+{len(waits) - 1} more)" if len(waits) > 1 else "") if waits else "-"
        table.add_row(s.instance_id, s.name, _age((frame.now - s.created_at).total_seconds()), shown)
    if not frame.running:
        table.add_row("-", "", "", "")
    return table


def _failures(frame: Frame) -> Table:
    table = new_table("INSTANCE ID", "NAME", "FAILED", "ERROR", title="\nlatest failures")
    for f in frame.failures:
        table.add_row(f.instance_id, f.name, f"{_age((frame.now - f.updated_at).total_seconds())} ago",
                      Text(error_text(f.error, 100), style="red"))
    if not frame.failures:
        table.add_row("-", "", "", "")
    return table


def _label(dsn: str) -> str:
    """The DSN without its password, for the header."""
    parts = urlsplit(dsn)
    if parts.scheme and parts.hostname:
        return f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    return "database"


async def cmd_top(args: argparse.Namespace) -> int:
    """Show the live view until Ctrl-C (``--once``: one frame)."""
    label = _label(args.dsn)
    async with client_for(args) as client:
        if args.once:
            emit(render(await read_frame(client), dsn_label=label))
            return 0
        if not sys.stdout.isatty():  # a pipe gets one plain frame per interval
            while True:
                emit(render(await read_frame(client), dsn_label=label))
                sys.stdout.write("\n")
                await anyio.sleep(args.interval)
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_quit_on, signals, tg.cancel_scope)
                first = render(await read_frame(client), dsn_label=label)
                with Live(first, console=console(), auto_refresh=False, screen=False) as live:
                    while True:
                        await anyio.sleep(args.interval)
                        live.update(render(await read_frame(client), dsn_label=label), refresh=True)
    return 0


async def _quit_on(signals: Any, scope: anyio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
