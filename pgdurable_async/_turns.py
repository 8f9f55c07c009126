"""Orchestration turns: claim instances, replay, append events, emit work — one transaction.

Several instances share a transaction (a batch), and every write is one
multi-row statement for the whole batch.  Replay state is kept in an LRU cache
and reused when the stored history length matches, so a turn that adds k events
costs O(k), not O(history).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from . import _events as ev
from ._app import App
from ._engine import Event, Execution
from ._errors import DatabaseError
from ._serde import DEFAULT_MAX_PAYLOAD_BYTES
from ._sql import q
from ._store import Database
from ._types import TERMINAL_STATUSES

log = logging.getLogger("pgdurable_async.turns")

_QUARANTINE_SECONDS = 60


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, DatabaseError) and bool(getattr(exc, "transient", False))


_FINAL_STATUS = {
    ev.ORCHESTRATION_COMPLETED: "completed",
    ev.ORCHESTRATION_FAILED: "failed",
    ev.ORCHESTRATION_CANCELLED: "cancelled",
}


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


@dataclass
class _Writes:
    """Everything a batch of turns writes, gathered into column arrays."""

    history: list[tuple[str, int, int, str, str, datetime]] = field(default_factory=list)
    work: list[tuple[str, int, int, str, str, str, str | None]] = field(default_factory=list)
    timers: list[tuple[str, int, int, str, datetime]] = field(default_factory=list)
    # (child id, name, input, parent id, parent execution, parent task id)
    children: list[tuple[str, str, str, str, int, int]] = field(default_factory=list)
    messages: list[tuple[str, int | None, str, str]] = field(default_factory=list)
    updates: list[tuple[str, str, str | None, str | None, bool, str | None, int, int, str | None]] = field(
        default_factory=list
    )
    consumed: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


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
    ) -> None:
        self.db = db
        self.app = app
        self.names = sorted(app.orchestrations)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.max_payload_bytes = max_payload_bytes
        self._cache: OrderedDict[str, Execution] = OrderedDict()
        self._known: dict[str, set[str]] = {"activity": set(app.activities), "orchestration": set(app.orchestrations)}
        self.stats = {"turns": 0, "replays": 0, "cache_hits": 0}
        self._quarantine: dict[str, float] = {}  # instance id -> monotonic time it may be retried

    async def run_batch(self) -> int:
        """Claim and run one batch of turns; returns how many instances advanced.

        If the batch cannot be written, its instances are retried one by one, so
        one bad instance fails alone instead of stalling the others.
        """
        if not self.names:
            return 0
        try:
            return await self._committed(None)
        except Exception as exc:  # noqa: BLE001 - isolate whatever broke the batch
            if _transient(exc):
                raise
            log.warning("a turn batch failed (%s); retrying its instances one by one", exc)
            return await self._one_by_one()

    async def _committed(self, only: str | None) -> int:
        """Run one batch transaction; cache its executions only once it has committed."""
        runs: dict[str, Execution] = {}
        try:
            count = await self.db.run(functools.partial(self._batch, only=only, runs=runs))
        except BaseException:
            self._discard(runs)
            raise
        self._remember(runs)
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

    async def _claim(self, conn: asyncpg.Connection[Any]) -> list[asyncpg.Record]:
        """Lock a batch of instances that have messages (skipping quarantined ones)."""
        rows: list[asyncpg.Record] = await conn.fetch(
            q("claim_instances"), self.names, self.batch_size, self.batch_size * 4, self._excluded()
        )
        return rows

    async def _claimable(self, conn: asyncpg.Connection[Any]) -> list[str]:
        return [r["instance_id"] for r in await self._claim(conn)]

    async def _fail_instance(self, conn: asyncpg.Connection[Any], instance_id: str, exc: Exception) -> None:
        row = await conn.fetchrow(q("lock_instance"), instance_id)
        if row is None or row["status"] in TERMINAL_STATUSES:
            return
        self._forget(instance_id)
        w = _Writes()
        error = {"type": "TurnError", "message": f"a turn could not be written: {exc}", "traceback": ""}
        seq = await conn.fetchval(q("last_seq"), instance_id, row["execution_id"]) + 1
        w.history.append((instance_id, row["execution_id"], seq, ev.ORCHESTRATION_FAILED, _json({"error": error}),
                          datetime.now(UTC)))
        w.updates.append((instance_id, "failed", None, _json(error), False, None, row["execution_id"], seq, None))
        w.finished.append(instance_id)
        w.consumed.extend(r["id"] for r in await conn.fetch(q("fetch_messages"), [instance_id]))
        if row["parent_instance_id"]:
            w.messages.append(self._to_parent(row, ev.SUB_ORCHESTRATION_FAILED, {"error": error}))
        await self._write(conn, w)

    # -- one batch -------------------------------------------------------------
    async def _batch(self, conn: asyncpg.Connection[Any], only: str | None, runs: dict[str, Execution]) -> int:
        self._discard(runs)  # left by an attempt whose commit failed (db.run retries)
        if only is None:
            rows = await self._claim(conn)
        else:
            rows = [r for r in [await conn.fetchrow(q("lock_instance"), only)] if r is not None]
        if not rows:
            return 0
        ids = [r["instance_id"] for r in rows]
        inbox: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for msg in await conn.fetch(q("fetch_messages"), ids):
            inbox[msg["instance_id"]].append(msg)

        now = datetime.now(UTC)
        w = _Writes()
        live: list[tuple[asyncpg.Record, list[asyncpg.Record]]] = []
        for row in rows:
            msgs = inbox.get(row["instance_id"], [])
            w.consumed.extend(m["id"] for m in msgs)
            current = [m for m in msgs if m["execution_id"] in (None, row["execution_id"])]
            current.sort(key=lambda m: m["kind"] != ev.ORCHESTRATION_STARTED)  # a start goes first (stable)
            if row["status"] in TERMINAL_STATUSES or not current:
                continue
            live.append((row, current))
        await self._load(conn, [row for row, _ in live], runs)

        for row, current in live:
            execution = runs[row["instance_id"]]
            base = row["history_len"]
            messages = [(m["kind"], m["payload"] or {}) for m in current]
            new_events = execution.advance(messages, now)
            self._plan(row, execution, base, new_events, w)
        await self._check_names(conn, w)
        await self._write(conn, w)
        self.stats["turns"] += len(live)
        return len(rows)

    async def _load(
        self, conn: asyncpg.Connection[Any], rows: list[asyncpg.Record], runs: dict[str, Execution]
    ) -> None:
        """Executions for ``rows``: from the cache when current, else by replaying history."""
        cold: list[asyncpg.Record] = []
        for row in rows:
            # Taken out of the cache for the turn: put back only after the commit.
            cached = self._cache.pop(row["instance_id"], None)
            if (
                cached is not None
                and cached.execution_id == row["execution_id"]
                and cached.history_len == row["history_len"]
                and not cached.finished
            ):
                runs[row["instance_id"]] = cached
                self.stats["cache_hits"] += 1
            else:
                if cached is not None:
                    cached.close()  # stale: another worker advanced it
                runs[row["instance_id"]] = self._new_execution(row)
                if row["history_len"] > 0:
                    cold.append(row)
        if not cold:
            return
        histories: dict[str, list[Event]] = defaultdict(list)
        records = await conn.fetch(
            q("fetch_histories"), [r["instance_id"] for r in cold], [r["execution_id"] for r in cold]
        )
        for rec in records:
            histories[rec["instance_id"]].append(Event(rec["event_type"], rec["payload"] or {}, rec["recorded_at"]))
        for row in cold:
            runs[row["instance_id"]].replay(histories[row["instance_id"]])
            self.stats["replays"] += 1

    def _new_execution(self, row: asyncpg.Record) -> Execution:
        definition = self.app.orchestrations[row["name"]]
        return Execution(
            definition.fn,  # type: ignore[arg-type]
            instance_id=row["instance_id"],
            execution_id=row["execution_id"],
            name=row["name"],
            max_payload_bytes=self.max_payload_bytes,
        )

    def _remember(self, runs: dict[str, Execution]) -> None:
        for instance_id, execution in runs.items():
            if execution.finished:
                self._forget(instance_id)
                execution.close()
            else:
                self._cache[instance_id] = execution
                self._cache.move_to_end(instance_id)
        while len(self._cache) > self.cache_size:
            _, evicted = self._cache.popitem(last=False)
            evicted.close()

    @staticmethod
    def _discard(runs: dict[str, Execution]) -> None:
        """Close executions whose turn did not commit (their state ran ahead of the database)."""
        for execution in runs.values():
            execution.close()
        runs.clear()

    def _forget(self, instance_id: str) -> None:
        """Drop a cached execution (closing its coroutines)."""
        cached = self._cache.pop(instance_id, None)
        if cached is not None:
            cached.close()

    # -- turning events into writes ---------------------------------------------
    def _plan(self, row: asyncpg.Record, execution: Execution, base: int, events: list[Event], w: _Writes) -> None:
        instance_id, execution_id, name = row["instance_id"], row["execution_id"], row["name"]
        status = "running"
        output = error = next_input = None
        for offset, event in enumerate(events, start=1):
            data = event.data
            w.history.append((instance_id, execution_id, base + offset, event.kind, _json(data), event.recorded_at))
            kind = event.kind
            if kind == ev.ACTIVITY_SCHEDULED:
                retry = data.get("retry")
                w.work.append((instance_id, execution_id, data["task_id"], name, data["name"],
                               _json(data.get("input")), None if retry is None else _json(retry)))
            elif kind == ev.TIMER_CREATED:
                fire_at = datetime.fromisoformat(data["fire_at"])
                w.timers.append((instance_id, execution_id, data["task_id"], name, fire_at))
            elif kind == ev.SUB_ORCHESTRATION_SCHEDULED:
                child = data["instance_id"]
                w.children.append((child, data["name"], _json(data.get("input")), instance_id, execution_id,
                                   data["task_id"]))
            elif kind in _FINAL_STATUS:
                status = _FINAL_STATUS[kind]
                if kind == ev.ORCHESTRATION_COMPLETED:
                    output = _json(data.get("output"))
                    note = (ev.SUB_ORCHESTRATION_COMPLETED, {"result": data.get("output")})
                elif kind == ev.ORCHESTRATION_FAILED:
                    error = _json(data.get("error"))
                    note = (ev.SUB_ORCHESTRATION_FAILED, {"error": data.get("error")})
                else:
                    error = _json({"type": "Cancelled", "message": "cancelled", "reason": data.get("reason")})
                    note = (ev.SUB_ORCHESTRATION_FAILED, {"error": orjson.loads(error)})
                w.finished.append(instance_id)
                if row["parent_instance_id"]:
                    w.messages.append(self._to_parent(row, *note))
            elif kind == ev.CONTINUED_AS_NEW:
                next_input = _json(data.get("input"))
                w.finished.append(instance_id)  # the old execution's work and timers are moot
                w.messages.append((instance_id, execution_id + 1, ev.ORCHESTRATION_STARTED,
                                   _json({"name": name, "input": data.get("input")})))
                for carried in data.get("carry_over") or []:
                    w.messages.append((instance_id, execution_id + 1, ev.EVENT_RECEIVED, _json(carried)))
                for late_kind, late_data in execution.unapplied:  # raised after the end: for the next one
                    if late_kind in (ev.EVENT_RECEIVED, ev.CANCEL_REQUESTED):
                        w.messages.append((instance_id, execution_id + 1, late_kind, _json(late_data)))
        if next_input is not None:
            w.updates.append((instance_id, "running", None, None, False, None, execution_id + 1, 0, next_input))
        else:
            custom = _json(execution.custom_status) if execution.custom_status_changed else None
            w.updates.append((instance_id, status, output, error, execution.custom_status_changed, custom,
                              execution_id, base + len(events), None))
        execution.custom_status_changed = False

    def _to_parent(self, row: Any, kind: str, data: dict[str, Any]) -> tuple[str, int | None, str, str]:
        payload = {"task_id": row["parent_task_id"], "instance_id": row["instance_id"], **data}
        return (row["parent_instance_id"], row["parent_execution_id"], kind, _json(payload))

    async def _check_names(self, conn: asyncpg.Connection[Any], w: _Writes) -> None:
        """Activities and children nobody registered fail at once instead of waiting forever."""
        unknown_work = await self._unknown(conn, "activity", {item[4] for item in w.work})
        if unknown_work:
            kept = []
            for item in w.work:
                if item[4] in unknown_work:
                    err = {"type": "UnknownNameError", "message": f"no activity named {item[4]!r} is registered",
                           "traceback": ""}
                    w.messages.append((item[0], item[1], ev.ACTIVITY_FAILED,
                                       _json({"task_id": item[2], "error": err, "attempts": 0})))
                else:
                    kept.append(item)
            w.work = kept
        unknown_children = await self._unknown(conn, "orchestration", {c[1] for c in w.children})
        if unknown_children:
            kept_children = []
            for child in w.children:
                if child[1] in unknown_children:
                    parent, parent_exec, task_id = child[3:]
                    err = {"type": "UnknownNameError",
                           "message": f"no orchestration named {child[1]!r} is registered", "traceback": ""}
                    w.messages.append((parent, parent_exec, ev.SUB_ORCHESTRATION_FAILED,
                                       _json({"task_id": task_id, "instance_id": child[0], "error": err})))
                else:
                    kept_children.append(child)
            w.children = kept_children

    async def _unknown(self, conn: asyncpg.Connection[Any], kind: str, names: Iterable[str]) -> set[str]:
        known = self._known[kind]
        missing = [n for n in names if n not in known]
        if not missing:
            return set()
        found = {r["name"] for r in await conn.fetch(q("known_names"), kind, missing)}
        known.update(found)
        return set(missing) - found

    async def _write(self, conn: asyncpg.Connection[Any], w: _Writes) -> None:
        if w.history:
            await conn.execute(q("append_history"), *_columns(w.history, 6))
        if w.work:
            await conn.execute(q("enqueue_work"), *_columns(w.work, 7))
        if w.timers:
            await conn.execute(q("create_timers"), *_columns(w.timers, 5))
        if w.children:
            created = {r["instance_id"] for r in await conn.fetch(q("create_children"), *_columns(w.children, 6))}
            for child in w.children:
                if child[0] not in created:
                    parent, parent_exec, task_id = child[3:]
                    err = {"type": "InstanceAlreadyExists", "message": f"instance {child[0]!r} already exists",
                           "traceback": ""}
                    w.messages.append((parent, parent_exec, ev.SUB_ORCHESTRATION_FAILED,
                                       _json({"task_id": task_id, "instance_id": child[0], "error": err})))
        if w.finished:
            await conn.execute(q("drop_pending_work"), w.finished)
        if w.messages:
            await conn.execute(q("enqueue_messages"), *_columns(w.messages, 4))
        if w.updates:
            await conn.execute(q("update_instances"), *_columns(w.updates, 9))
        if w.consumed:
            await conn.execute(q("delete_messages"), w.consumed)


def _columns(rows: list[Any], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]

