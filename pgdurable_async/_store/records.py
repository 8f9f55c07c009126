"""What the store hands out and takes in: plain records, never driver rows.

Read records (``InstanceRow``, ``Message``, ``WorkItem``) are built from query
results in the store; write records (``*Write``) are what a turn or an ack batch
gathers and the store writes as one multi-row statement each.  JSON fields of
write records are already encoded (``str``), so the hot path encodes once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from .._base.types import RetryPolicy

#: The clock offset of a runtime whose time is not skipped: its clock is the database's now().
NO_OFFSET = timedelta(0)


# -- read -----------------------------------------------------------------------------
class InstanceRow(NamedTuple):
    """An instance as a turn sees it (locked for the turn's transaction)."""

    instance_id: str
    name: str
    status: str
    execution_id: int
    history_len: int
    parent_instance_id: str | None
    parent_execution_id: int | None
    parent_task_id: int | None
    db_now: datetime  # the transaction's now(): the time this turn records


class Message(NamedTuple):
    """One row of ``orchestrator_queue``: a fact waiting for its instance's next turn."""

    id: int
    instance_id: str
    execution_id: int | None  # None: whatever execution is current
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A claimed activity work item, leased by this worker until acked or released."""

    id: int
    instance_id: str
    execution_id: int
    task_id: int
    name: str
    input: Any
    retry: RetryPolicy | None
    attempt: int
    lease_token: uuid.UUID
    queue: str | None = None  # claimed under this queue's limits

    @property
    def activity_id(self) -> str:
        return f"{self.instance_id}:{self.execution_id}:{self.task_id}"


# -- write ----------------------------------------------------------------------------
class HistoryWrite(NamedTuple):
    instance_id: str
    execution_id: int
    seq: int
    kind: str
    payload: str
    recorded_at: datetime


class WorkWrite(NamedTuple):
    instance_id: str
    execution_id: int
    task_id: int
    orchestration: str
    name: str
    input: str
    retry: str | None
    queue: str | None = None
    local: bool = True  # the enqueuing app registers the activity (else its queue comes from the registry)
    key: str | None = None
    priority: int = 0

    @property
    def plain(self) -> bool:
        """No queue, key or priority to write, and the queue is known (the fan-out fast path)."""
        return self.queue is None and self.local and self.key is None and not self.priority


class TimerWrite(NamedTuple):
    instance_id: str
    execution_id: int
    task_id: int
    orchestration: str
    fire_at: datetime


class ChildWrite(NamedTuple):
    """A child instance to create, and the parent task that waits for it."""

    instance_id: str
    name: str
    input: str
    parent_instance_id: str
    parent_execution_id: int
    parent_task_id: int


class MessageWrite(NamedTuple):
    """A message to an instance named by id (its orchestration name is looked up)."""

    instance_id: str
    execution_id: int | None
    kind: str
    payload: str


class ValueWrite(NamedTuple):
    """A durable value a turn recorded (``value_set``)."""

    instance_id: str
    key: str
    value: str
    execution_id: int
    seq: int


class InstanceUpdate(NamedTuple):
    """The instance row after a turn.  ``input`` is set when a new execution starts;
    ``event_waits`` (JSON) is ``Execution.event_waits()``: what history cannot say it waits on."""

    instance_id: str
    status: str
    output: str | None
    error: str | None
    custom_status_set: bool
    custom_status: str | None
    execution_id: int
    history_len: int
    input: str | None
    event_waits: str | None = None


class QueueWake(NamedTuple):
    """What a claim of limited queues says beyond its items: when they may give more."""

    short: bool  # fewer items than asked
    wake_in: float | None  # seconds, by the clock (None: when an item of theirs finishes)


class DueSchedule(NamedTuple):
    """A due schedule, locked for one firing transaction."""

    schedule_id: str
    orchestration: str
    input_json: str
    cron: str | None
    every: timedelta | None
    timezone: str
    overlap: str
    catchup: str
    next_fire_at: datetime
    previous_running: bool
    db_now: datetime


class Outcome(NamedTuple):
    """What an activity attempt produced: an ack (result or final failure) or a retry."""

    item: WorkItem
    kind: str  # activity_completed | activity_failed | retry
    payload: str = ""
    delay: float = 0.0


def columns(rows: list[Any], width: int) -> list[list[Any]]:
    """Rows as column lists, for ``unnest($1::t[], $2::t[], ...)``."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
