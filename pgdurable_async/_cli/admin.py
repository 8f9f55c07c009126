"""The CLI's client commands (start, status, list, history, signals) and their output.

Tables (drawn by :mod:`.render`) by default; ``--json`` prints orjson (datetimes as
ISO-8601), unchanged for machines.  Signals to a finished instance are an error
that says what happened, as Temporal's CLI does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from .._base.errors import InvalidArgument
from .._base.types import TERMINAL_STATUSES, HistoryEvent, InstanceState
from .._client import Client
from .render import cell, dumps, emit, history_table, iso, list_table, state_table

CLIENT_RETRY_SECONDS = 3.0  # an unreachable database fails fast on the command line


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


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), ["-" * w for w in widths], *rows]:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


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
    if args.json:
        _print(dumps(state, indent=True))
    else:
        emit(state_table(state))
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        states = await client.list(status=args.status, name=args.name, limit=args.limit)
    if args.json:
        _print(dumps(states, indent=True))
        return 0
    emit(list_table(states))
    return 0


async def cmd_history(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        events: list[HistoryEvent] = await client.history(args.id)
    if args.json:
        _print(dumps(events, indent=True))
        return 0
    emit(history_table(events))
    return 0


class AlreadyFinished(InvalidArgument):
    """A signal to an instance that has finished: nothing was sent (exit code 1, like Temporal's CLI)."""


def _finished(state: InstanceState, what: str) -> AlreadyFinished | None:
    if state.status.value not in TERMINAL_STATUSES:
        return None
    return AlreadyFinished(f"instance {state.instance_id} already {state.status.value} at {iso(state.updated_at)}: "
                           f"{what}")


async def cmd_raise_event(args: argparse.Namespace) -> int:
    """Deliver an event; an instance that has finished gets none, and the command says so."""
    data = parse_json(args.data, "--data")
    async with client_for(args) as client:
        state = await client.status(args.id)
        refused = _finished(state, f"event {args.event!r} not delivered")
        if refused is not None:
            raise refused
        await client.raise_event(args.id, args.event, data, idempotency_key=args.key)
    _print(f"event {args.event!r} sent to {args.id} ({state.status.value})")
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    """Request a cooperative cancel; on a finished instance there is nothing to cancel."""
    async with client_for(args) as client:
        state = await client.status(args.id)
        refused = _finished(state, "nothing to cancel")
        if refused is not None:
            raise refused
        await client.cancel(args.id, args.reason)
    _print(f"cancellation requested for {args.id} (it was {state.status.value}; it stops at its next await)")
    return 0


async def cmd_terminate(args: argparse.Namespace) -> int:
    """Stop an instance now; on a finished instance there is nothing to stop."""
    async with client_for(args) as client:
        state = await client.status(args.id)
        refused = _finished(state, "nothing to terminate")
        if refused is not None:
            raise refused
        await client.terminate(args.id, args.reason)
    _print(f"terminated {args.id}")
    return 0


__all__ = ["cell", "client_for", "dumps", "iso", "parse_json", "table"]
