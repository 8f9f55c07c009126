"""What the turn and activity paths report, in one place: metrics, spans and log lines.

:class:`TurnProcessor` and :class:`ActivityWorker` call one method per fact (a turn batch
planned, committed; an attempt run, failed, finished), so their hot paths stay as they
were.  Log lines (loggers ``pgdurable_async.instances`` and ``pgdurable_async.activities``)
carry the instance id, and the JSON log format (``worker --log-format json``) adds the
fields given as ``extra``.  Metrics are counted only when ``metrics`` is on; spans are made
only while OpenTelemetry has a tracer provider (see ``_base/tracing.py``).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from .._base import events as ev
from .._base import tracing
from .._base.types import RetryPolicy
from .._store import Connection, Database, ops_store
from .._store.records import InstanceRow, InstanceUpdate, WorkItem
from . import metrics as m

instances_log = logging.getLogger("pgdurable_async.instances")
activities_log = logging.getLogger("pgdurable_async.activities")
log = logging.getLogger("pgdurable_async.observer")

_OUTCOMES = {ev.ACTIVITY_COMPLETED: "completed", ev.ACTIVITY_FAILED: "failed", "retry": "retried"}
_TRACE_CACHE = 10_000  # instances whose trace context is remembered


class _Turn(NamedTuple):
    instance_id: str
    name: str
    started: bool  # the first turn of the instance's first execution
    update: InstanceUpdate | None


class Observer:
    """Reports one runtime's turns and activity attempts."""

    def __init__(self, db: Database, *, metrics: bool = False) -> None:
        self.db = db
        self.metrics = metrics
        self._planned: dict[str, _Turn] = {}  # by instance id (locked by one batch at a time)
        # lease token -> time.time() its attempt started: one per claim (a work item whose lease ran
        # out mid-attempt can be claimed again by this process while the first attempt still runs)
        self._running: dict[uuid.UUID, float] = {}
        self._traces: OrderedDict[str, tracing.Carrier | None] = OrderedDict()  # instance id -> carrier
        self._reported: datetime | None = None
        self._attempts: dict[tuple[str, str], Any] = {}  # (activity, outcome) -> its counter child
        self._durations: dict[str, Any] = {}
        self._tracing = False  # tracing.active() as of the last claimed batch (it costs a microsecond)
        if metrics:
            m.count_running(self)

    # -- turns ---------------------------------------------------------------------
    def turns_planned(self, rows: Iterable[InstanceRow], updates: Sequence[InstanceUpdate]) -> None:
        """A batch of turns is about to be written (it may still roll back: a retry plans again)."""
        by_id = {u.instance_id: u for u in updates}
        self._planned.update(
            (r.instance_id, _Turn(r.instance_id, r.name, r.history_len == 0 and r.execution_id == 1,
                                  by_id.get(r.instance_id)))
            for r in rows
        )

    def replayed(self) -> None:
        """An instance's history was replayed in full (it was not cached)."""
        if self.metrics:
            m.REPLAYS.inc()

    async def turns_committed(self, committed: Iterable[str], began_ns: int) -> None:
        """A batch committed; ``committed``: the ids of its instances (whose last plan it wrote)."""
        end_ns = time.time_ns()
        turns = [t for t in map(self._planned.pop, committed, itertools.repeat(None)) if t is not None]
        if not turns:
            return
        if self.metrics:
            m.TURNS.inc(len(turns))
            m.TURN_DURATION.observe(max(0, end_ns - began_ns) / 1e9)
        for turn in turns:
            _log_turn(turn)
        if tracing.active():
            parents = await self._trace_parents([t.instance_id for t in turns])
            for turn in turns:
                tracing.record(tracing.TURN, {tracing.INSTANCE_ID: turn.instance_id, tracing.NAME: turn.name},
                               parent=parents.get(turn.instance_id), start_ns=began_ns, end_ns=end_ns)

    def turn_failed(self, instance_id: str, exc: BaseException) -> None:
        """A turn could not be written; the instance was failed instead."""
        self._planned.pop(instance_id, None)
        instances_log.error("instance %s failed: its turn could not be written (%s)", instance_id, exc,
                            extra={"instance_id": instance_id, "error": str(exc)})

    # -- activities ----------------------------------------------------------------
    async def activities_claimed(self, items: Sequence[WorkItem]) -> None:
        """A claimed batch is about to run: fetch the trace contexts its spans join (one query)."""
        self._tracing = tracing.active()
        if self._tracing:
            await self._trace_parents([i.instance_id for i in items])

    async def run_activity(self, item: WorkItem, run: Callable[[WorkItem], Awaitable[None]]) -> None:
        """Run one attempt (``run`` never raises but for cancellation), timed and traced."""
        started = time.perf_counter()
        self._running[item.lease_token] = time.time()  # also what pgdurable_activities_running counts
        try:
            if self._tracing:
                parent = self._traces.get(item.instance_id)
                attributes: dict[str, str | int] = {tracing.INSTANCE_ID: item.instance_id, tracing.NAME: item.name,
                              tracing.ATTEMPT: item.attempt}
                with tracing.span(tracing.ACTIVITY, attributes, parent=parent):
                    await run(item)
            else:
                await run(item)
            if self.metrics:
                self._duration(item.name).observe(time.perf_counter() - started)
        finally:
            del self._running[item.lease_token]

    def attempt_failed(self, item: WorkItem, policy: RetryPolicy, error: dict[str, Any]) -> None:
        """An attempt raised ``error``: say whether and when it runs again."""
        kind, message = error.get("type", "Error"), error.get("message", "")
        tracing.fail_current(kind, message)
        extra: dict[str, Any] = {"instance_id": item.instance_id, "activity": item.name, "task_id": item.task_id,
                                 "attempt": item.attempt, "max_attempts": policy.max_attempts,
                                 "error": f"{kind}: {message}"}
        if policy.should_retry(item.attempt, kind):
            at = datetime.now(UTC) + timedelta(seconds=policy.delay(item.attempt))
            extra["next_attempt_at"] = at.isoformat(timespec="milliseconds")
            activities_log.warning(
                "activity %s of instance %s failed (attempt %d of %d): %s: %s; retrying at %s",
                item.name, item.instance_id, item.attempt, policy.max_attempts, kind, message,
                extra["next_attempt_at"], extra=extra,
            )
        else:
            why = "not retryable" if kind in policy.non_retryable else "no attempts left"
            activities_log.warning(
                "activity %s of instance %s failed (attempt %d of %d, %s): %s: %s",
                item.name, item.instance_id, item.attempt, policy.max_attempts, why, kind, message, extra=extra,
            )

    def outcome(self, item: WorkItem, kind: str) -> None:
        """An attempt finished: ``kind`` is activity_completed, activity_failed or retry."""
        if self.metrics:
            key = (item.name, _OUTCOMES.get(kind, kind))
            counter = self._attempts.get(key)
            if counter is None:
                counter = self._attempts[key] = m.ACTIVITY_ATTEMPTS.labels(*key)
            counter.inc()

    def _duration(self, name: str) -> Any:
        child = self._durations.get(name)
        if child is None:
            child = self._durations[name] = m.ACTIVITY_DURATION.labels(name)
        return child

    # -- running attempts --------------------------------------------------------------
    def running(self) -> int:
        """Attempts of this runtime running now."""
        return len(self._running)

    def oldest_running(self) -> float:
        """Seconds the longest-running attempt of this runtime has run (0: none runs)."""
        return max(0.0, time.time() - min(self._running.values())) if self._running else 0.0

    async def report_running(self, worker_id: str) -> None:
        """Tell the database when this worker's longest-running attempt started (for every
        process's ``pgdurable_activity_oldest_running_seconds``)."""
        since = datetime.fromtimestamp(min(self._running.values()), UTC) if self._running else None
        if since == self._reported:
            return  # a time, not a heartbeat: written only when the longest-running attempt changes
        await self.db.run(lambda conn: ops_store.report_running(conn, worker_id=worker_id, since=since),
                          transaction=False, retry_for=5)
        self._reported = since

    # -- trace contexts ------------------------------------------------------------------
    async def _trace_parents(self, instance_ids: Sequence[str]) -> dict[str, tracing.Carrier | None]:
        """The stored carrier of each instance (cached: it never changes).  Never raises: spans
        without their parent are better than a turn or an activity held up by a trace."""
        missing = sorted({i for i in instance_ids if i not in self._traces})
        if missing:
            async def fetch(conn: Connection) -> dict[str, tracing.Carrier]:
                return await ops_store.trace_contexts(conn, instance_ids=missing)

            try:
                found = await self.db.run(fetch, transaction=False, retry_for=1)
            except Exception as exc:  # noqa: BLE001
                log.warning("trace contexts could not be read (%s): these spans start their own traces", exc)
                return {}
            for instance_id in missing:
                self._traces[instance_id] = found.get(instance_id)
            while len(self._traces) > _TRACE_CACHE:
                self._traces.popitem(last=False)
        return {i: self._traces.get(i) for i in instance_ids}


def _log_turn(turn: _Turn) -> None:
    extra = {"instance_id": turn.instance_id, "orchestration": turn.name}
    if turn.started:
        instances_log.info("instance %s (%s) started", turn.instance_id, turn.name, extra=extra)
    update = turn.update
    if update is None:
        return
    if update.input is not None:  # continue_as_new: the next execution begins
        instances_log.info("instance %s (%s) continued as new (execution %d)", turn.instance_id, turn.name,
                           update.execution_id, extra={**extra, "execution_id": update.execution_id})
    elif update.status == "completed":
        instances_log.info("instance %s (%s) completed", turn.instance_id, turn.name, extra=extra)
    elif update.status in ("failed", "cancelled"):
        error = _error_text(update.error)
        level = logging.WARNING if update.status == "failed" else logging.INFO
        instances_log.log(level, "instance %s (%s) %s: %s", turn.instance_id, turn.name, update.status, error,
                          extra={**extra, "error": error})


def _error_text(error_json: str | None) -> str:
    try:
        error = orjson.loads(error_json) if error_json else None
    except orjson.JSONDecodeError:
        return str(error_json)
    if isinstance(error, dict):
        return f"{error.get('type', 'Error')}: {error.get('message', '')}"
    return str(error)
