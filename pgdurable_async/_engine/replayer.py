"""Replay a saved history against today's code (a plain function: the engine is pure).

The histories are what ``python -m pgdurable_async history ID --json`` prints (a
list of events), an object ``{"instance_id", "execution_id", "events": [...]}``,
or a list of :class:`HistoryEvent`.  A disagreement raises the
:class:`NonDeterminismError` a runtime would fail the instance with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._base import events as ev
from .._base.errors import InvalidArgument, NonDeterminismError, UnknownNameError
from .._base.serde import decode
from .._base.types import HistoryEvent
from .execution import Event, Execution, OrchestrationFn

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The instance id replay uses when the history does not say (it seeds ctx.new_uuid / ctx.random).
STAND_IN_ID = "replay"


@dataclass(frozen=True)
class SavedHistory:
    """A parsed history: its events, and the instance id if the document named it."""

    events: list[HistoryEvent]
    instance_id: str | None = None


def parse_history(history: Any) -> SavedHistory:
    """Read a history given as JSON text or bytes, a list of events or dicts, or an object with ``events``."""
    if isinstance(history, (str, bytes, bytearray)):
        try:
            history = decode(bytes(history) if isinstance(history, bytearray) else history)
        except ValueError as exc:
            raise InvalidArgument(f"the history is not valid JSON: {exc}") from None
    instance_id = None
    if isinstance(history, Mapping):
        instance_id = history.get("instance_id")
        history = history.get("events")
    if not isinstance(history, list):
        raise InvalidArgument("a history is a list of events (the output of `history ID --json`)")
    events = [_event(item, n) for n, item in enumerate(history, start=1)]
    return SavedHistory(events, instance_id if isinstance(instance_id, str) else None)


def _event(item: Any, position: int) -> HistoryEvent:
    if isinstance(item, HistoryEvent):
        return item
    if not isinstance(item, Mapping) or not isinstance(item.get("kind"), str):
        raise InvalidArgument(f"history event #{position} has no kind")
    recorded = item.get("recorded_at")
    if isinstance(recorded, str):
        try:
            recorded = datetime.fromisoformat(recorded)
        except ValueError:
            raise InvalidArgument(f"history event #{position}: bad recorded_at {recorded!r}") from None
    data = item.get("data")
    return HistoryEvent(
        seq=int(item.get("seq", position)),
        kind=item["kind"],
        data=dict(data) if isinstance(data, Mapping) else {},
        recorded_at=recorded if isinstance(recorded, datetime) else None,
        execution_id=int(item.get("execution_id", 1)),
    )


def replay_history(
    orchestrations: Mapping[str, OrchestrationFn], history: Any, *, instance_id: str | None = None,
    fallback_id: str | None = None,
) -> int:
    """Replay every execution in ``history`` with the registered code; returns the events replayed.

    The instance id (it seeds ``ctx.new_uuid()`` / ``ctx.random()``) is ``instance_id``, else
    the one the history records (``orchestration_started``), else ``fallback_id``.  Raises
    :class:`NonDeterminismError` where today's code disagrees with the history,
    :class:`UnknownNameError` when its orchestration is not registered.
    """
    saved = parse_history(history)
    iid = instance_id or saved.instance_id
    executions: dict[int, list[HistoryEvent]] = {}
    for event in saved.events:
        executions.setdefault(event.execution_id, []).append(event)
    for execution_id, events in executions.items():
        events.sort(key=lambda e: e.seq)
        first = events[0]
        if first.kind != ev.ORCHESTRATION_STARTED:
            raise NonDeterminismError(f"execution {execution_id}: the history does not begin with "
                                      f"orchestration_started (it begins with {first.kind!r})")
        name = str(first.data.get("name", ""))
        fn = orchestrations.get(name)
        if fn is None:
            raise UnknownNameError(f"the history runs orchestration {name!r}, which the app does not register",
                                   kind="orchestration", name=name)
        recorded = first.data.get("instance_id")  # recorded by runtimes of this version on
        known = iid or (recorded if isinstance(recorded, str) else None)
        _replay_one(fn, events, known or fallback_id or STAND_IN_ID, execution_id, name, guessed=known is None)
    return len(saved.events)


def _replay_one(fn: OrchestrationFn, events: list[HistoryEvent], instance_id: str, execution_id: int,
                name: str, *, guessed: bool) -> None:
    execution = Execution(fn, instance_id=instance_id, execution_id=execution_id, name=name)
    try:
        execution.replay(Event(e.kind, e.data, e.recorded_at or _EPOCH) for e in events)
        fault = execution.fault
    finally:
        execution.close()
    if fault is not None:
        message = fault.message
        if guessed and not any(e.kind == ev.FORKED_FROM for e in events):
            message += (f" (replayed as instance {instance_id!r}, a guess: if the code passes ctx.new_uuid() or "
                        "ctx.random() to its commands, give the instance id)")
        raise NonDeterminismError(message, instance_id=instance_id)
