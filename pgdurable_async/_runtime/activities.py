"""Activity execution: batched claims under a lease, bounded concurrency, batched acks.

A claimed item carries a lease token; its completion is acked only while the
token still matches (``ack_work`` deletes the item and inserts the result
message in one statement), so a late result from a lost lease is ignored.
Transactional activities lock their item for the whole of their transaction
and ack inside it: their SQL and their completion commit together.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .._app import App
from .._base import events as ev
from .._base.definitions import ActivityContext, ActivityDef, TransactionContext
from .._base.errors import Cancelled, DatabaseError, SerializationError
from .._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, dumps, encode
from .._store import Connection, Database, queue_store, work_store
from .._store.records import Outcome, QueueWake, WorkItem
from .clock import Clock
from .observer import Observer
from .wakeup import Wakeup

log = logging.getLogger("pgdurable_async.activities")


class ActivityWorker:
    """Claims, runs and acks the activities one app registers."""

    def __init__(
        self,
        db: Database,
        app: App,
        *,
        worker_id: str,
        max_concurrency: int = 64,
        lease_seconds: float = 30.0,
        claim_batch: int = 512,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Clock | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.db = db
        self.clock = clock or Clock()
        self.observer = observer or Observer(db)
        self.app = app
        self.names = sorted(n for n, d in app.activities.items() if d.queue is None)  # claim_work
        self.queued_names = sorted(n for n, d in app.activities.items() if d.queue is not None)  # claim_queued
        self.queues = sorted({d.queue for d in app.activities.values() if d.queue is not None})
        self.queue_wake = QueueWake(False, None)  # what the last claim of limited queues said
        # Queues whose slots a finished item frees (a rate window frees itself, by the clock).
        self._slotted = {q.name for q in app.queues.values() if q.concurrency or q.key_concurrency}
        self.worker_id = worker_id
        self.max_concurrency = max_concurrency
        self.lease_seconds = lease_seconds
        self.claim_batch = claim_batch
        self.max_payload_bytes = max_payload_bytes
        # leased and not yet acked (leases are extended), by lease token: one per claim, so a second claim
        # of an item whose lease ran out mid-attempt is tracked apart from the first
        self.inflight: dict[uuid.UUID, WorkItem] = {}
        self.running = 0  # claimed and still executing: what max_concurrency bounds
        self.acks_pending = Wakeup()
        self.capacity = Wakeup()
        self._outcomes: list[Outcome] = []
        self.stats = {"completed": 0, "failed": 0, "retried": 0, "acks": 0}
        self._user_search_path: str | None = None  # learned on the first transactional activity
        #: Set by the runtime: acks then NOTIFY after their commit, through it (notify_store).
        self.notify: Callable[[str], None] | None = None

    @property
    def free(self) -> int:
        """Slots for new claims; none while too many finished items wait for their ack."""
        if len(self._outcomes) >= 4 * self.max_concurrency:
            return 0
        return self.max_concurrency - self.running

    # -- claiming ---------------------------------------------------------------
    async def claim(self) -> list[WorkItem]:
        """Lease up to the free capacity of ready items: limited queues first (their limits bound
        them), then items without a queue, one statement each (``queue_wake`` then says when the
        limited queues may give more)."""
        want = min(self.free, self.claim_batch)
        items: list[WorkItem] = []
        if want > 0 and self.queued_names:
            items, self.queue_wake = await self.db.run(
                lambda conn: queue_store.claim_queued(
                    conn, queues=self.queues, names=self.queued_names, limit=want, lease_seconds=self.lease_seconds,
                    owner=self.worker_id,
                ),
                transaction=False,
            )
            self._taken(items)
        rest = want - len(items)
        if rest <= 0 or not self.names:
            return items
        plain = await self.db.run(
            lambda conn: work_store.claim_work(
                conn, names=self.names, limit=rest, lease_seconds=self.lease_seconds, owner=self.worker_id,
                offset=self.clock.offset,
            ),
            transaction=False,
        )
        self._taken(plain)
        return items + plain

    def _taken(self, items: list[WorkItem]) -> None:
        for item in items:
            self.inflight[item.lease_token] = item
        self.running += len(items)

    async def next_due(self) -> float | None:
        """Seconds until the earliest item without a queue becomes visible (None: none), by the database's clock."""
        if not self.names:
            return None
        due: float | None = await self.db.run(
            lambda conn: work_store.next_work_due(conn, names=self.names, offset=self.clock.offset),
            transaction=False,
        )
        return None if due is None else max(0.0, due)

    # -- running ----------------------------------------------------------------
    async def execute_batch(self, items: list[WorkItem]) -> None:
        """Run claimed items concurrently: one runtime task per batch, not per item."""
        await self.observer.activities_claimed(items)
        await asyncio.gather(*(self.execute(item) for item in items))

    async def execute(self, item: WorkItem) -> None:
        """Run one claimed item to an outcome; never raises."""
        try:
            await self.observer.run_activity(item, self._execute)
        finally:
            self.running -= 1
            self._freed()

    async def _execute(self, item: WorkItem) -> None:
        definition = self.app.activities[item.name]
        try:
            if definition.timeout is None:  # a cancel scope per call is not free: only when needed
                await self._attempt(definition, item)
            else:
                with anyio.move_on_after(definition.timeout) as scope:
                    await self._attempt(definition, item)
                if scope.cancelled_caught:
                    raise builtins.TimeoutError(f"the attempt ran longer than its timeout of {definition.timeout:g} s")
        except anyio.get_cancelled_exc_class() as exc:
            if _runtime_is_cancelling():
                raise  # shutdown: the item's lease is released or expires
            self._finish(self._failure(definition, item, exc))  # the activity raised it itself
        except (Exception, SystemExit, Cancelled) as exc:  # noqa: BLE001 - the activity's failure is data
            self._finish(self._failure(definition, item, exc))

    async def _attempt(self, definition: ActivityDef, item: WorkItem) -> None:
        if definition.transactional:
            await self._execute_transactional(definition, item)
        else:
            if definition.check is not None:
                await self._check(definition.check, item)
            ctx = ActivityContext(item.instance_id, item.activity_id, item.name, item.attempt)
            result = await definition.fn(ctx, item.input)
            self._finish(self._success(item, result))

    async def _check(self, check: Callable[[TransactionContext, Any], Awaitable[None]], item: WorkItem) -> None:
        """An activity's own check before an attempt (the HTTP node's: its submitter still holds the grant)."""
        async def work(conn: Connection) -> None:
            await check(TransactionContext(item.instance_id, item.activity_id, item.name, item.attempt, conn=conn,
                                           schema=self.db.schema), item.input)

        await self.db.run(work)

    async def _execute_transactional(self, definition: ActivityDef, item: WorkItem) -> None:
        async def work(conn: Connection) -> None:
            if not await work_store.lock_work_item(conn, item):
                return  # lease lost: someone else owns this item now
            if self._user_search_path is None:
                self._user_search_path = await work_store.user_search_path(conn)
            await work_store.set_search_path(conn, self._user_search_path)  # the user's tables, not ours
            ctx = TransactionContext(item.instance_id, item.activity_id, item.name, item.attempt, conn=conn,
                                     schema=self.db.schema)
            result = await definition.fn(ctx, item.input)
            outcome = self._success(item, result)
            if outcome.kind != ev.ACTIVITY_COMPLETED:
                raise _Unencodable(outcome)
            await work_store.set_search_path(conn, self.db.search_path)
            await work_store.ack_work(conn, [outcome])
            if item.queue in self._slotted:  # a slot of its queue is free: claimers elsewhere look again
                await queue_store.notify_work(conn, channel=self.db.channel("work"))

        try:
            await self.db.run(work, reset_session=True)
        except _Unencodable as bad:
            self._finish(bad.outcome)
            return
        except DatabaseError as exc:  # the activity's own SQL failed (or the database stayed away)
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            self._finish(self._failure(definition, item, cause))
            return
        self.inflight.pop(item.lease_token, None)
        self.stats["completed"] += 1
        self.observer.outcome(item, ev.ACTIVITY_COMPLETED)

    def _success(self, item: WorkItem, result: Any) -> Outcome:
        try:
            body = encode(result, what=f"result of activity {item.name!r}", limit=self.max_payload_bytes)
        except SerializationError as exc:
            payload = ev.activity_failed(item.task_id, ev.error_payload(exc), item.attempt)
            return Outcome(item, ev.ACTIVITY_FAILED, dumps(payload))
        done = f'{{"task_id":{item.task_id},"attempts":{item.attempt},"result":{body}}}'
        return Outcome(item, ev.ACTIVITY_COMPLETED, done)

    def _failure(self, definition: ActivityDef, item: WorkItem, exc: BaseException) -> Outcome:
        policy = item.retry or definition.retry
        error = ev.error_payload(exc)
        self.observer.attempt_failed(item, policy, error)
        if policy.should_retry(item.attempt, error["type"]):
            return Outcome(item, "retry", delay=policy.delay(item.attempt))
        return Outcome(item, ev.ACTIVITY_FAILED, dumps(ev.activity_failed(item.task_id, error, item.attempt)))

    def _finish(self, outcome: Outcome) -> None:
        self.observer.outcome(outcome.item, outcome.kind)
        self._outcomes.append(outcome)
        self.acks_pending.set()

    def _freed(self) -> None:
        if self.free >= max(1, self.max_concurrency // 4) or not self.running:
            self.capacity.set()

    # -- acking -----------------------------------------------------------------
    async def flush(self) -> tuple[int, int]:
        """Write every buffered outcome in one transaction; returns (acked, retried)."""
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return 0, 0
        acks = [o for o in batch if o.kind != "retry"]
        retries = [o for o in batch if o.kind == "retry"]

        queued = any(o.item.queue in self._slotted for o in batch)

        deferred = self.notify is not None

        async def write(conn: Connection) -> None:
            if acks:
                await work_store.ack_work(conn, acks, deferred=deferred)
            if retries:
                await work_store.retry_work(conn, retries, offset=self.clock.offset)
            if queued:  # slots of limited queues are free: claimers elsewhere look again
                await queue_store.notify_work(conn, channel=self.db.channel("work"))

        try:  # one statement needs no explicit transaction (it is atomic on its own; the NOTIFY may follow it)
            await self.db.run(write, retry_for=math.inf, transaction=bool(retries))
        except BaseException:
            self._outcomes[:0] = batch  # keep them for the next flush
            raise
        if acks and self.notify is not None:
            self.notify(self.db.channel("orch"))
        for o in batch:
            self.inflight.pop(o.item.lease_token, None)
        self.stats["acks"] += 1
        self.stats["completed"] += sum(1 for o in acks if o.kind == ev.ACTIVITY_COMPLETED)
        self.stats["failed"] += sum(1 for o in acks if o.kind == ev.ACTIVITY_FAILED)
        self.stats["retried"] += len(retries)
        self._freed()
        return len(acks), len(retries)

    async def extend_leases(self) -> None:
        """Push the lease expiry of running, non-transactional items forward."""
        tokens = [i.lease_token for i in self.inflight.values() if not self.app.activities[i.name].transactional]
        if tokens:
            await self.db.run(
                lambda conn: work_store.extend_leases(conn, tokens=tokens, lease_seconds=self.lease_seconds,
                                                      offset=self.clock.offset),
                transaction=False,
            )

    async def release(self, items: list[WorkItem]) -> None:
        """Give unfinished items back at once (graceful shutdown)."""
        if not items:
            return

        async def give_back(conn: Connection) -> None:
            await work_store.release_leases(conn, items)
            if any(i.queue in self._slotted for i in items):
                await queue_store.notify_work(conn, channel=self.db.channel("work"))

        await self.db.run(give_back, retry_for=5)


class _Unencodable(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__("activity result could not be encoded")
        self.outcome = outcome


def _runtime_is_cancelling() -> bool:
    """True when this task is being cancelled (rather than user code raising CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
