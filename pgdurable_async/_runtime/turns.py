"""Orchestration turns: claim instances, replay, append events, emit work — one transaction.

Several instances share a transaction (a batch), and every write is one
multi-row statement for the whole batch.  Replay state is kept in an LRU cache
and reused when the stored history length matches, so a turn that adds k events
costs O(k), not O(history).

Lifecycle facts ride on the same transaction: a recorded ``cancel_requested``
queues a cancel for each unfinished child (which cascades in its own turn), a
``value_set`` upserts the instance's durable value, and a fork's first turn (its
``resume`` message) re-issues the work items, timers and children its copied
history left open.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

import anyio

from .._app import App
from .._base import events as ev
from .._base.errors import DatabaseError
from .._base.names import is_reserved
from .._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, dumps
from .._base.types import TERMINAL_STATUSES
from .._engine import Event, Execution
from .._store import Connection, Database, notify_store, turn_store
from .._store.records import (
    ChildWrite,
    HistoryWrite,
    InstanceRow,
    InstanceUpdate,
    Message,
    MessageWrite,
    TimerWrite,
    ValueWrite,
    WorkWrite,
)
from .clock import Clock
from .observer import Observer
from .turn_writes import TurnWrites, child_refused, to_parent, write

log = logging.getLogger("pgdurable_async.turns")

_QUARANTINE_SECONDS = 60
_REMOTE = "\x00remote"  # an activity this app does not register: its queue comes from the registry


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, DatabaseError) and bool(getattr(exc, "transient", False))


_FINAL_STATUS = {
    ev.ORCHESTRATION_COMPLETED: "completed",
    ev.ORCHESTRATION_FAILED: "failed",
    ev.ORCHESTRATION_CANCELLED: "cancelled",
}


class Batch(NamedTuple):
    """What one :meth:`TurnProcessor.run_batch` did."""

    advanced: int  # instances advanced (0: nothing claimed)
    held: bool  # nothing claimed, yet messages wait: another turn holds their instances


class TurnProcessor:
    """Runs batches of orchestration turns for the orchestrations an app registers."""

    def __init__(
        self,
        db: Database,
        app: App,
        *,
        batch_size: int = 32,
        cache_size: int = 10_000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Clock | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.db = db
        self.app = app
        self.clock = clock or Clock()
        self.observer = observer or Observer(db)
        self.names = sorted(app.orchestrations)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.max_payload_bytes = max_payload_bytes
        self._cache: OrderedDict[str, Execution] = OrderedDict()
        self._known: dict[str, set[str]] = {"activity": set(app.activities), "orchestration": set(app.orchestrations)}
        self._queue_of = {n: d.queue for n, d in app.activities.items()}  # registered here: its queue (or None)
        # "held": claims that locked nothing while messages waited (another turn holds them).
        self.stats = {"turns": 0, "replays": 0, "cache_hits": 0, "held": 0}
        self._quarantine: dict[str, float] = {}  # instance id -> monotonic time it may be retried
        #: Set by the runtime: turn batches NOTIFY after their commit, through it (notify_store).
        self.notify: Callable[[str], None] | None = None
        self._busy: dict[str, anyio.Event] = {}  # instance id -> set once its turn has cached or dropped it

    async def run_batch(self) -> Batch:
        """Claim and run one batch of turns: how many instances advanced, and whether none could
        be claimed while messages waited (another worker's turn holds them, and may die holding
        them: no NOTIFY says so, so the caller looks again soon).

        If the batch cannot be written, its instances are retried one by one, so
        one bad instance fails alone instead of stalling the others.
        """
        if not self.names:
            return Batch(0, False)
        try:
            advanced = await self._committed(None)
        except Exception as exc:  # noqa: BLE001 - isolate whatever broke the batch
            if _transient(exc):
                raise
            log.warning("a turn batch failed (%s); retrying its instances one by one", exc)
            return Batch(await self._one_by_one(), False)
        if advanced:
            return Batch(advanced, False)
        held = await self.db.run(functools.partial(turn_store.messages_waiting, names=self.names,
                                                   excluded=self._excluded()), transaction=False)
        self.stats["held"] += held
        return Batch(0, held)

    async def _committed(self, only: str | None) -> int:
        """Run one batch transaction; cache its executions only once it has committed."""
        runs: dict[str, Execution] = {}
        began = time.time_ns()
        channels: set[str] = set()
        try:
            count = await self.db.run(functools.partial(self._batch, only=only, runs=runs, channels=channels))
        except BaseException:
            self._discard(runs)
            raise
        self._remember(runs)
        if self.notify is not None:
            for channel in sorted(channels):
                self.notify(channel)
        await self.observer.turns_committed(runs, began)
        return count

    async def _one_by_one(self) -> int:
        ids = await self.db.run(self._claimable, transaction=False)
        done = 0
        for instance_id in ids:
            try:
                done += await self._committed(instance_id)
                continue
            except Exception as exc:  # noqa: BLE001
                if _transient(exc):
                    raise
                failure: Exception = exc
            try:
                await self.db.run(functools.partial(self._fail_instance, instance_id=instance_id, exc=failure))
                self.observer.turn_failed(instance_id, failure)
            except Exception as exc:  # noqa: BLE001
                if _transient(exc):
                    raise
                log.error("instance %r can be neither advanced nor failed (%s); set aside for %d s",
                          instance_id, exc, _QUARANTINE_SECONDS)
                self._quarantine[instance_id] = time.monotonic() + _QUARANTINE_SECONDS
            done += 1
        return done

    def _excluded(self) -> list[str]:
        now = time.monotonic()
        for instance_id in [i for i, until in self._quarantine.items() if until <= now]:
            del self._quarantine[instance_id]
        return list(self._quarantine)

    async def _claim(self, conn: Connection) -> list[InstanceRow]:
        """Lock a batch of instances that have messages (skipping quarantined ones)."""
        return await turn_store.claim_instances(
            conn, names=self.names, limit=self.batch_size, scan=self.batch_size * 4, excluded=self._excluded(),
            offset=self.clock.offset,
        )

    async def _claimable(self, conn: Connection) -> list[str]:
        return [r.instance_id for r in await self._claim(conn)]

    async def _fail_instance(self, conn: Connection, instance_id: str, exc: Exception) -> None:
        row = await turn_store.lock_instance(conn, instance_id=instance_id, offset=self.clock.offset)
        if row is None or row.status in TERMINAL_STATUSES:
            return
        self._forget(instance_id)
        w = TurnWrites()
        error = ev.error_info("TurnError", f"a turn could not be written: {exc}")
        seq = await turn_store.last_seq(conn, instance_id=instance_id, execution_id=row.execution_id) + 1
        w.history.append(HistoryWrite(instance_id, row.execution_id, seq, ev.ORCHESTRATION_FAILED,
                                      dumps({"error": error}), row.db_now))
        w.updates.append(InstanceUpdate(instance_id, "failed", None, dumps(error), False, None, row.execution_id,
                                        seq, None))
        w.finished.append(instance_id)
        # By id: a message whose payload cannot be decoded (nested deeper than the JSON decoder
        # goes, a number beyond a double) is what may have failed the turn.
        w.consumed.extend(await turn_store.message_ids(conn, instance_ids=[instance_id]))
        if row.parent_instance_id:
            w.messages.append(to_parent(row, ev.SUB_ORCHESTRATION_FAILED,
                                         ev.child_failed(row.parent_task_id, instance_id, error)))
        await write(conn, w)

    # -- one batch -------------------------------------------------------------
    async def _batch(self, conn: Connection, only: str | None, runs: dict[str, Execution], channels: set[str]) -> int:
        self._discard(runs)  # left by an attempt whose commit failed (db.run retries)
        channels.clear()
        if only is None:
            rows = await self._claim(conn)
        else:
            rows = [r for r in [await turn_store.lock_instance(conn, instance_id=only, offset=self.clock.offset)]
                    if r is not None]
        if not rows:
            return 0
        inbox: dict[str, list[Message]] = defaultdict(list)
        for msg in await turn_store.fetch_messages(conn, instance_ids=[r.instance_id for r in rows]):
            inbox[msg.instance_id].append(msg)

        now = rows[0].db_now  # the database's clock: history times, ctx.now() and timers agree with fire_timers
        w = TurnWrites()
        live: list[tuple[InstanceRow, list[Message], bool]] = []
        for row in rows:
            msgs = inbox.get(row.instance_id, [])
            w.consumed.extend(m.id for m in msgs)
            current = [m for m in msgs if m.execution_id in (None, row.execution_id)]
            current.sort(key=lambda m: m.kind != ev.ORCHESTRATION_STARTED)  # a start goes first (stable)
            resume = any(m.kind == ev.RESUME for m in current)  # a message, never an event
            current = [m for m in current if m.kind != ev.RESUME]
            # df.cancel marks an instance cancelled before its execution has ended: that one still runs
            if (row.status in TERMINAL_STATUSES and row.status != "cancelled") or not (current or resume):
                continue
            live.append((row, current, resume))
        await self._load(conn, [row for row, _, _ in live], runs)

        for row, current, resume in live:
            execution = runs[row.instance_id]
            if row.status == "cancelled" and execution.finished and execution.history_len == row.history_len:
                continue  # marked cancelled, and its history had already ended: nothing to add
            if resume and execution.resumable:  # only a fork's first turn: nothing is issued twice
                for command in execution.open_commands():
                    self._command(row, command.kind, command.data, w, reissue=True)
            new_events = execution.advance([_fact(row, m) for m in current], now)
            self._plan(row, execution, row.history_len, new_events, w)
        await self._check_names(conn, w)
        self.observer.turns_planned((row for row, _, _ in live), w.updates)
        messages = bool(w.messages or w.children or w.cancels or w.child_cancels)
        if self.notify is not None and (w.work or messages):  # these inserts NOTIFY after the commit
            await notify_store.defer(conn)
            channels.update(self.db.channel(c) for c, due in (("work", w.work), ("orch", messages)) if due)
        await write(conn, w)
        self.stats["turns"] += len(live)
        return len(rows)

    async def _load(self, conn: Connection, rows: list[InstanceRow], runs: dict[str, Execution]) -> None:
        """Executions for ``rows``: from the cache when current, else by replaying history."""
        cold: list[InstanceRow] = []
        for row in rows:
            # Another of our turns committed this instance but has not put its execution back
            # yet (we could lock the row, so its transaction is over): wait for it, not replay.
            while (busy := self._busy.get(row.instance_id)) is not None:
                await busy.wait()
            # Taken out of the cache for the turn: put back only after the commit.
            cached = self._cache.pop(row.instance_id, None)
            if (
                cached is not None
                and cached.execution_id == row.execution_id
                and cached.history_len == row.history_len
                and not cached.finished
            ):
                runs[row.instance_id] = cached
                self.stats["cache_hits"] += 1
            else:
                if cached is not None:
                    cached.close()  # stale: another worker advanced it
                runs[row.instance_id] = self._new_execution(row)
                if row.history_len > 0:
                    cold.append(row)
            self._busy[row.instance_id] = anyio.Event()  # released with runs (_remember / _discard)
        if not cold:
            return
        histories = await turn_store.fetch_histories(conn, executions=[(r.instance_id, r.execution_id) for r in cold])
        for row in cold:
            events = histories.get(row.instance_id, [])
            runs[row.instance_id].replay(Event(e.kind, e.data, e.recorded_at) for e in events if e.recorded_at)
            self.stats["replays"] += 1
            self.observer.replayed()

    def _new_execution(self, row: InstanceRow) -> Execution:
        definition = self.app.orchestrations[row.name]
        return Execution(
            definition.fn,  # type: ignore[arg-type]
            instance_id=row.instance_id,
            execution_id=row.execution_id,
            name=row.name,
            max_payload_bytes=self.max_payload_bytes,
        )

    def _remember(self, runs: dict[str, Execution]) -> None:
        for instance_id, execution in runs.items():
            self._release(instance_id)
            if execution.finished:
                self._forget(instance_id)
                execution.close()
            else:
                self._cache[instance_id] = execution
                self._cache.move_to_end(instance_id)
        while len(self._cache) > self.cache_size:
            _, evicted = self._cache.popitem(last=False)
            evicted.close()

    def _discard(self, runs: dict[str, Execution]) -> None:
        """Close executions whose turn did not commit (their state ran ahead of the database)."""
        for instance_id, execution in runs.items():
            self._release(instance_id)
            execution.close()
        runs.clear()

    def _release(self, instance_id: str) -> None:
        """This turn is done with the instance: a turn of ours waiting for it goes on."""
        busy = self._busy.pop(instance_id, None)
        if busy is not None:
            busy.set()

    def _forget(self, instance_id: str) -> None:
        """Drop a cached execution (closing its coroutines)."""
        cached = self._cache.pop(instance_id, None)
        if cached is not None:
            cached.close()

    # -- turning events into writes ---------------------------------------------
    def _plan(self, row: InstanceRow, execution: Execution, base: int, events: list[Event], w: TurnWrites) -> None:
        instance_id, execution_id, name = row.instance_id, row.execution_id, row.name
        status = "running"
        output = error = next_input = None
        values: dict[str, ValueWrite] = {}
        children_now: list[str] = []  # children this turn starts, in order
        for offset, event in enumerate(events, start=1):
            data = event.data
            w.history.append(HistoryWrite(instance_id, execution_id, base + offset, event.kind, dumps(data),
                                          event.recorded_at))
            kind = event.kind
            if kind in ev.COMMAND_KINDS:
                self._command(row, kind, data, w)
                if kind == ev.SUB_ORCHESTRATION_SCHEDULED:
                    children_now.append(data["instance_id"])
            elif kind == ev.VALUE_SET:
                values[data["key"]] = ValueWrite(instance_id, data["key"], dumps(data.get("value")), execution_id,
                                                 base + offset)
            elif kind == ev.CANCEL_REQUESTED:  # the cancel reaches the children, each in its own turn
                cascade = dumps({**data, "cascaded_from": instance_id})
                w.cancels.append((instance_id, cascade))
                w.child_cancels.extend(MessageWrite(c, None, ev.CANCEL_REQUESTED, cascade) for c in children_now)
            elif kind in _FINAL_STATUS:
                status = _FINAL_STATUS[kind]
                if kind == ev.ORCHESTRATION_COMPLETED:
                    output = dumps(data.get("output"))
                    note = (ev.SUB_ORCHESTRATION_COMPLETED,
                            ev.child_completed(row.parent_task_id, instance_id, data.get("output")))
                else:
                    failure = data.get("error") if kind == ev.ORCHESTRATION_FAILED else ev.cancelled_error(
                        data.get("reason"))
                    error = dumps(failure)
                    note = (ev.SUB_ORCHESTRATION_FAILED, ev.child_failed(row.parent_task_id, instance_id, failure))
                w.finished.append(instance_id)
                if row.parent_instance_id:
                    w.messages.append(to_parent(row, *note))
            elif kind == ev.CONTINUED_AS_NEW:
                next_input = dumps(data.get("input"))
                w.finished.append(instance_id)  # the old execution's work and timers are moot
                w.messages.append(MessageWrite(instance_id, execution_id + 1, ev.ORCHESTRATION_STARTED,
                                               dumps({"name": name, "input": data.get("input")})))
                for carried in data.get("carry_over") or []:
                    w.messages.append(MessageWrite(instance_id, execution_id + 1, ev.EVENT_RECEIVED, dumps(carried)))
                for late_kind, late_data in execution.unapplied:  # raised after the end: for the next one
                    if late_kind in (ev.EVENT_RECEIVED, ev.CANCEL_REQUESTED):
                        w.messages.append(MessageWrite(instance_id, execution_id + 1, late_kind, dumps(late_data)))
        if next_input is not None:
            w.updates.append(InstanceUpdate(instance_id, "running", None, None, False, None, execution_id + 1, 0,
                                            next_input))
        else:
            custom = dumps(execution.custom_status) if execution.custom_status_changed else None
            waits = execution.event_waits()
            w.updates.append(InstanceUpdate(instance_id, status, output, error, execution.custom_status_changed,
                                            custom, execution_id, base + len(events), None,
                                            None if waits is None else dumps(waits)))
        execution.custom_status_changed = False
        w.values.extend(values.values())

    def _command(self, row: InstanceRow, kind: str, data: dict[str, Any], w: TurnWrites, *,
                 reissue: bool = False) -> None:
        """The work item, timer or child a recorded command stands for."""
        instance_id, execution_id, name = row.instance_id, row.execution_id, row.name
        if kind == ev.ACTIVITY_SCHEDULED:
            retry = None if data.get("retry") is None else dumps(data["retry"])
            activity_name = data["name"]
            queue = self._queue_of.get(activity_name, _REMOTE)
            if queue is None and "key" not in data and "priority" not in data:  # the plain fast path
                w.work.append(WorkWrite(instance_id, execution_id, data["task_id"], name, activity_name,
                                        dumps(data.get("input")), retry))
            else:
                w.work.append(WorkWrite(instance_id, execution_id, data["task_id"], name, activity_name,
                                        dumps(data.get("input")), retry, None if queue is _REMOTE else queue,
                                        queue is not _REMOTE, data.get("key"), data.get("priority", 0)))
        elif kind == ev.TIMER_CREATED:
            fire_at = datetime.fromisoformat(data["fire_at"])
            w.timers.append(TimerWrite(instance_id, execution_id, data["task_id"], name, fire_at))
        elif kind == ev.SUB_ORCHESTRATION_SCHEDULED:
            child_id = data["instance_id"]
            if reissue and _generated_elsewhere(child_id, instance_id, data["task_id"]):
                child_id = f"{instance_id}:{execution_id}:{data['task_id']}"  # the fork's own child, not the source's
            w.children.append(ChildWrite(child_id, data["name"], dumps(data.get("input")), instance_id,
                                         execution_id, data["task_id"]))

    async def _check_names(self, conn: Connection, w: TurnWrites) -> None:
        """Activities and children nobody registered fail at once instead of waiting forever."""
        unknown_work = await self._unknown(conn, "activity", {item.name for item in w.work})
        if unknown_work:
            kept = []
            for item in w.work:
                if item.name in unknown_work:
                    err = ev.error_info("UnknownNameError", f"no activity named {item.name!r} is registered")
                    w.messages.append(MessageWrite(item.instance_id, item.execution_id, ev.ACTIVITY_FAILED,
                                                   dumps(ev.activity_failed(item.task_id, err, 0))))
                else:
                    kept.append(item)
            w.work = kept
        unknown_children = await self._unknown(conn, "orchestration", {c.name for c in w.children})
        if unknown_children or any(is_reserved(c.name) for c in w.children):
            kept_children = []
            for child in w.children:
                if is_reserved(child.name):  # a child graph would run SQL that nobody checked
                    err = ev.error_info("InvalidArgument", f"{child.name!r} is a built-in orchestration; "
                                        "it cannot be started as a child")
                    w.messages.append(child_refused(child, err))
                elif child.name in unknown_children:
                    err = ev.error_info("UnknownNameError", f"no orchestration named {child.name!r} is registered")
                    w.messages.append(child_refused(child, err))
                else:
                    kept_children.append(child)
            w.children = kept_children

    async def _unknown(self, conn: Connection, kind: str, names: Iterable[str]) -> set[str]:
        known = self._known[kind]
        missing = [n for n in names if n not in known]
        if not missing:
            return set()
        found = await turn_store.known_names(conn, kind=kind, names=missing)
        known.update(found)
        return set(missing) - found

def _fact(row: InstanceRow, message: Message) -> tuple[str, dict[str, Any]]:
    """A message as the event it becomes: a start also names its execution, so a saved history
    (or a fork's copy of one) says whose ``ctx.new_uuid()`` / ``ctx.random()`` stream it holds."""
    if message.kind == ev.ORCHESTRATION_STARTED and "instance_id" not in message.payload:
        return message.kind, {**message.payload, "instance_id": row.instance_id, "execution_id": row.execution_id}
    return message.kind, message.payload


def _generated_elsewhere(child_id: str, instance_id: str, task_id: int) -> bool:
    """A child id generated for another instance (``<source>:<execution>:<task_id>``): a fork's copy."""
    parts = child_id.rsplit(":", 2)
    return len(parts) == 3 and parts[0] != instance_id and parts[1].isdigit() and parts[2] == str(task_id)
