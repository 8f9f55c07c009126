"""What a batch of turns writes (:class:`TurnWrites`) and the statements that write it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._base import events as ev
from .._base.serde import dumps
from .._store import Connection, turn_store
from .._store.records import (
    ChildWrite,
    HistoryWrite,
    InstanceRow,
    InstanceUpdate,
    MessageWrite,
    TimerWrite,
    ValueWrite,
    WorkWrite,
)


@dataclass
class TurnWrites:
    """Everything a batch of turns writes, gathered into one statement per table."""

    history: list[HistoryWrite] = field(default_factory=list)
    work: list[WorkWrite] = field(default_factory=list)
    timers: list[TimerWrite] = field(default_factory=list)
    children: list[ChildWrite] = field(default_factory=list)
    messages: list[MessageWrite] = field(default_factory=list)
    updates: list[InstanceUpdate] = field(default_factory=list)
    consumed: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    values: list[ValueWrite] = field(default_factory=list)
    cancels: list[tuple[str, str]] = field(default_factory=list)  # (parent id, cancel payload) for its children
    child_cancels: list[MessageWrite] = field(default_factory=list)  # children started in this turn, then cancelled


def to_parent(row: InstanceRow, kind: str, payload: dict[str, object]) -> MessageWrite:
    """The message that tells ``row``'s parent how its child ended."""
    assert row.parent_instance_id is not None
    return MessageWrite(row.parent_instance_id, row.parent_execution_id, kind, dumps(payload))


async def write(conn: Connection, w: TurnWrites) -> None:
    """Write out a batch's turns: one statement per table, in an order the foreign keys allow."""
    if w.history:
        await turn_store.append_history(conn, w.history)
    if w.work:
        await turn_store.enqueue_work(conn, w.work)
    if w.timers:
        await turn_store.create_timers(conn, w.timers)
    if w.cancels:  # before this turn's children exist: those get theirs only if started before the cancel
        await turn_store.cancel_children(conn, parent_ids=[c[0] for c in w.cancels],
                                         payloads=[c[1] for c in w.cancels])
    if w.children:
        created = await turn_store.create_children(conn, w.children)
        for child in w.children:
            if child.instance_id not in created:
                err = ev.error_info("InstanceAlreadyExists", f"instance {child.instance_id!r} already exists")
                w.messages.append(child_refused(child, err))
        w.messages.extend(m for m in w.child_cancels if m.instance_id in created)
    if w.values:
        await turn_store.set_values(conn, w.values)
    if w.finished:
        await turn_store.drop_pending_work(conn, instance_ids=w.finished)
    if w.messages:
        await turn_store.enqueue_messages(conn, w.messages)
    if w.updates:
        await turn_store.update_instances(conn, w.updates)
    if w.consumed:
        await turn_store.delete_messages(conn, ids=w.consumed)


def child_refused(child: ChildWrite, error: dict[str, object]) -> MessageWrite:
    """The message that fails the parent task of a child that could not be started."""
    payload = ev.child_failed(child.parent_task_id, child.instance_id, error)
    return MessageWrite(child.parent_instance_id, child.parent_execution_id, ev.SUB_ORCHESTRATION_FAILED,
                        dumps(payload))
