"""How the CLI draws its output: rich tables on a terminal, the same tables as plain text in a pipe.

On a terminal, rich colours statuses and fits tables to the window.  In a pipe or
a file there are no colours, no wrapping (a row stays one line, so ``grep`` and
``awk`` work on it) and no trailing blanks.  ``--json`` never comes through here.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .._base.types import HistoryEvent, InstanceState

CELL = 80  # table cells truncate JSON to this many characters
_PLAIN_WIDTH = 4096  # a pipe has no width: never wrap a row
STATUS_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "terminated": "magenta",
}
_FAILURE_KINDS = ("failed", "terminated", "cancel")


def console(file: TextIO | None = None) -> Console:
    """A console on ``file`` (stdout): a terminal's width and colours, or plain and unwrapped."""
    out = file if file is not None else sys.stdout
    if out.isatty():
        return Console(file=out, highlight=False)
    return Console(file=out, width=_PLAIN_WIDTH, no_color=True, highlight=False, emoji=False, color_system=None)


def emit(renderable: RenderableType, file: TextIO | None = None) -> None:
    """Print one renderable; in a pipe, each line without trailing blanks."""
    out = file if file is not None else sys.stdout
    if out.isatty():
        terminal = console(out)
        _fit_last_column(renderable, terminal.width)
        terminal.print(renderable)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=_PLAIN_WIDTH, no_color=True, highlight=False, emoji=False, color_system=None,
            soft_wrap=False).print(renderable)
    out.write("\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n")
    out.flush()


def new_table(*headers: str, title: str | None = None) -> Table:
    """A table with a bold header and one rule under it, no outer frame."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold", title=title,
                  title_justify="left", title_style="bold")
    for i, header in enumerate(headers):  # on a narrow terminal, the last column gives way (ellipsis)
        last = i == len(headers) - 1
        table.add_column(header, no_wrap=i > 0, overflow="ellipsis" if last else "fold")  # ids may fold
    return table


def _fit_last_column(renderable: RenderableType, width: int) -> None:
    """On a terminal the last column of each table gives way: cut short with an ellipsis."""
    tables = [renderable] if isinstance(renderable, Table) else list(getattr(renderable, "renderables", []))
    for table in tables:
        if isinstance(table, Table) and table.box is not None and table.columns:
            others = sum(max([len(str(c.header)), *(len(str(x)) for x in c._cells)]) for c in table.columns[1:-1])
            others += min(20, max([len(str(x)) for x in table.columns[0]._cells] or [0]))  # the first may fold
            table.columns[-1].max_width = max(12, width - others - 3 * len(table.columns))


def dumps(value: Any, *, indent: bool = False) -> str:
    """orjson text; datetimes come out as ISO-8601."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, option=option, default=str).decode()


def iso(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value is not None else "-"


def when(value: datetime | None, *, compact: bool) -> str:
    """ISO 8601 in a pipe; on a terminal ``YYYY-MM-DD HH:MM:SS.mmm`` in UTC, short enough for a table."""
    if value is None or not compact:
        return iso(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def on_terminal() -> bool:
    return sys.stdout.isatty()


def cell(value: Any, width: int = CELL) -> str:
    """A JSON value as one short line for a table."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def error_text(error: Any, width: int = CELL) -> str:
    """``Type: message`` of a stored error (one line), or ``-``."""
    if error is None:
        return "-"
    if isinstance(error, dict) and "message" in error:
        kind = error.get("type")
        return cell(f"{kind}: {error['message']}" if kind else str(error["message"]), width)
    return cell(error, width)


# -- the three tables ---------------------------------------------------------------------
def list_table(states: Sequence[InstanceState]) -> Table:
    """``list``: one row per instance, with its error (if it has one)."""
    table = new_table("INSTANCE ID", "NAME", "STATUS", "CREATED", "UPDATED", "ERROR")
    compact = on_terminal()
    for s in states:
        table.add_row(s.instance_id, s.name, status_text(s.status.value), when(s.created_at, compact=compact),
                      when(s.updated_at, compact=compact),
                      Text(error_text(s.error, 100), style="red" if s.error is not None else ""))
    return table


def history_table(events: Sequence[HistoryEvent]) -> Table:
    """``history``: one row per event, failures in red."""
    table = new_table("SEQ", "KIND", "RECORDED AT", "DATA")
    table.columns[0].justify = "right"
    compact = on_terminal()
    for e in events:
        style = "red" if any(word in e.kind for word in _FAILURE_KINDS) else ""
        table.add_row(str(e.seq), Text(e.kind, style=style), when(e.recorded_at, compact=compact), cell(e.data))
    return table


def state_table(state: InstanceState) -> Table:
    """``status``: one instance as ``key  value`` rows, what it waits on, and its error."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("instance_id", state.instance_id),
        ("name", state.name),
        ("status", status_text(state.status.value)),
        ("execution_id", str(state.execution_id)),
        ("parent", state.parent_instance_id or "-"),
        ("created_at", iso(state.created_at)),
        ("updated_at", iso(state.updated_at)),
        ("input", cell(state.input, 200)),
        ("output", cell(state.output, 200)),
        ("custom_status", cell(state.custom_status, 200)),
        ("error", Text(error_text(state.error, 200), style="red" if state.error is not None else "")),
    ]
    rows += [("waiting_on" if i == 0 else "", line) for i, line in enumerate(format_waits(state.waiting_on) or ["-"])]
    for key, value in rows:
        table.add_row(key, value)
    trace = state.error.get("traceback") if isinstance(state.error, dict) else None
    if trace:
        table.add_row("traceback", Text(str(trace).rstrip(), style="dim"))
    return table


def format_waits(waits: Sequence[dict[str, Any]]) -> list[str]:
    """One line per entry of ``InstanceState.waiting_on``: kind, name, since and until."""
    lines = []
    for wait in waits:
        name = cell(wait["name"], 60)
        text = name if wait["kind"] == "timer" else f"{wait['kind']} {name}"  # a timer's name says it
        if wait.get("instance_id"):
            text += f" ({cell(wait['instance_id'], 60)})"
        text += f" since {iso(wait.get('since'))}"
        if wait.get("until") is not None:
            text += f" until {iso(wait['until'])}"
        lines.append(text)
    return lines
