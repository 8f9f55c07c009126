"""The CLI's client commands (start, status, list, history, signals) and their output.

Human-readable tables by default; ``--json`` prints orjson (datetimes as ISO-8601).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from .._base.errors import InvalidArgument
from .._base.types import HistoryEvent, InstanceState
from .._client import Client
from .._client.graphs import render_instance
from .worker import load_app

CLIENT_RETRY_SECONDS = 3.0  # an unreachable database fails fast on the command line
_CELL = 80  # human output truncates JSON cells to this many characters


@contextlib.asynccontextmanager
async def client_for(args: argparse.Namespace) -> AsyncIterator[Client]:
    """A :class:`Client` on ``args.dsn`` that gives up on an unreachable database quickly."""
    client = Client(args.dsn, schema=args.schema)
    client.db.retry_for = CLIENT_RETRY_SECONDS
    async with client:
        yield client


def parse_json(text: str | None, option: str) -> Any:
    """Decode a JSON command-line argument (``None`` when absent)."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{option} is not valid JSON ({exc}): {text!r}") from None


def dumps(value: Any, *, indent: bool = False) -> str:
    """orjson text; datetimes come out as ISO-8601."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, option=option, default=str).decode()


def iso(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value is not None else "-"


def cell(value: Any, width: int = _CELL) -> str:
    """A JSON value as one short line for a table."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), ["-" * w for w in widths], *rows]:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and "message" in error:
        kind = error.get("type")
        return f"{kind}: {error['message']}" if kind else str(error["message"])
    return cell(error)


def format_state(state: InstanceState) -> str:
    """One instance as ``key  value`` lines (plus the error's traceback, if any)."""
    rows = [
        ("instance_id", state.instance_id),
        ("name", state.name),
        ("status", state.status.value),
        ("execution_id", str(state.execution_id)),
        ("parent", state.parent_instance_id or "-"),
        ("created_at", iso(state.created_at)),
        ("updated_at", iso(state.updated_at)),
        ("input", cell(state.input, 200)),
        ("output", cell(state.output, 200)),
        ("custom_status", cell(state.custom_status, 200)),
        ("error", _error_text(state.error) if state.error is not None else "-"),
    ]
    waits = format_waits(state.waiting_on)
    rows += [("waiting_on" if i == 0 else "", line) for i, line in enumerate(waits or ["-"])]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    trace = state.error.get("traceback") if isinstance(state.error, dict) else None
    if trace:
        text += "\n" + "\n".join("    " + line for line in str(trace).rstrip().splitlines())
    return text


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


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- commands -------------------------------------------------------------------------
async def cmd_start(args: argparse.Namespace) -> int:
    """Start an instance; with ``--wait`` also print its output."""
    value = parse_json(args.input, "--input")
    async with client_for(args) as client:
        handle = await client.start(args.name, value, instance_id=args.id)
        _print(handle.instance_id)
        if args.wait or args.timeout is not None:
            _print(dumps(await handle.result(timeout=args.timeout)))
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        state = await client.status(args.id)
    _print(dumps(state, indent=True) if args.json else format_state(state))
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        states = await client.list(status=args.status, name=args.name, limit=args.limit)
    if args.json:
        _print(dumps(states, indent=True))
        return 0
    rows = [[s.instance_id, s.name, s.status.value, iso(s.created_at), iso(s.updated_at)] for s in states]
    _print(table(["INSTANCE ID", "NAME", "STATUS", "CREATED", "UPDATED"], rows))
    return 0


async def cmd_history(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        events: list[HistoryEvent] = await client.history(args.id)
    if args.json:
        _print(dumps(events, indent=True))
        return 0
    rows = [[str(e.seq), e.kind, iso(e.recorded_at), cell(e.data)] for e in events]
    _print(table(["SEQ", "KIND", "RECORDED AT", "DATA"], rows))
    return 0


async def cmd_raise_event(args: argparse.Namespace) -> int:
    data = parse_json(args.data, "--data")
    async with client_for(args) as client:
        await client.raise_event(args.id, args.event, data, idempotency_key=args.key)
    _print(f"event {args.event!r} sent to {args.id}")
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.cancel(args.id, args.reason)
    _print(f"cancellation requested for {args.id}")
    return 0


async def cmd_terminate(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.terminate(args.id, args.reason)
    _print(f"terminated {args.id}")
    return 0


async def cmd_graph(args: argparse.Namespace) -> int:
    """Print a graph workflow instance as Mermaid, each node with its state."""
    app = load_app(args.app) if args.app else None
    async with client_for(args) as client:
        _print(await render_instance(client, args.id, app))
    return 0
