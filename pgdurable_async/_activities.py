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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import orjson

from . import _events as ev
from ._app import ActivityContext, ActivityDef, App, TransactionContext
from ._errors import Cancelled, DatabaseError, SerializationError
from ._serde import DEFAULT_MAX_PAYLOAD_BYTES, encode, error_payload
from ._sql import q
from ._store import Database
from ._types import RetryPolicy
from ._wakeup import Wakeup

log = logging.getLogger("pgdurable_async.activities")


@dataclass(frozen=True)
class WorkItem:
    id: int
    instance_id: str
    execution_id: int
    task_id: int
    name: str
    input: Any
    retry: RetryPolicy | None
    attempt: int
    lease_token: uuid.UUID

    @property
    def activity_id(self) -> str:
        return f"{self.instance_id}:{self.execution_id}:{self.task_id}"


@dataclass(frozen=True)
class Outcome:
    """What an attempt produced: an ack (result or final failure) or a retry."""

    item: WorkItem
    kind: str  # activity_completed | activity_failed | retry
    payload: str = ""
    delay: float = 0.0


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
    ) -> None:
        self.db = db
        self.app = app
        self.names = sorted(app.activities)
        self.worker_id = worker_id
        self.max_concurrency = max_concurrency
        self.lease_seconds = lease_seconds
        self.claim_batch = claim_batch
        self.max_payload_bytes = max_payload_bytes
        self.inflight: dict[int, WorkItem] = {}  # leased and not yet acked (leases are extended)
        self.running = 0  # claimed and still executing: what max_concurrency bounds
        self.acks_pending = Wakeup()
        self.acked = Wakeup()  # set after each ack batch commits (results are now messages)
        self.capacity = Wakeup()
        self._outcomes: list[Outcome] = []
        self.stats = {"completed": 0, "failed": 0, "retried": 0, "acks": 0}
        self._user_search_path: str | None = None  # learned on the first transactional activity

    @property
    def free(self) -> int:
        """Slots for new claims; none while too many finished items wait for their ack."""
        if len(self._outcomes) >= 4 * self.max_concurrency:
            return 0
        return self.max_concurrency - self.running

    # -- claiming ---------------------------------------------------------------
    async def claim(self) -> list[WorkItem]:
        """Lease up to the free capacity of ready items (one statement)."""
        want = min(self.free, self.claim_batch)
        if want <= 0 or not self.names:
            return []
        rows = await self.db.run(
            lambda conn: conn.fetch(q("claim_work"), self.names, want, self.lease_seconds, self.worker_id),
            transaction=False,
        )
        items = [self._item(r) for r in rows]
        for item in items:
            self.inflight[item.id] = item
        self.running += len(items)
        return items

    def _item(self, r: asyncpg.Record) -> WorkItem:
        retry = _policy(r["retry"]) if r["retry"] else None
        return WorkItem(r["id"], r["instance_id"], r["execution_id"], r["task_id"], r["name"], r["input"], retry,
                        r["attempt"], r["lease_token"])

    async def next_due(self) -> float | None:
        """Seconds until the earliest queued item becomes visible (None: queue empty)."""
        due: datetime | None = await self.db.run(
            lambda conn: conn.fetchval(q("next_work_due"), self.names), transaction=False
        )
        if due is None:
            return None
        return max(0.0, (due - datetime.now(UTC)).total_seconds())

    # -- running ----------------------------------------------------------------
    async def execute_batch(self, items: list[WorkItem]) -> None:
        """Run claimed items concurrently: one runtime task per batch, not per item."""
        await asyncio.gather(*(self.execute(item) for item in items))

    async def execute(self, item: WorkItem) -> None:
        """Run one claimed item to an outcome; never raises."""
        try:
            await self._execute(item)
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
            ctx = ActivityContext(item.instance_id, item.activity_id, item.name, item.attempt)
            result = await definition.fn(ctx, item.input)
            self._finish(self._success(item, result))

    async def _execute_transactional(self, definition: ActivityDef, item: WorkItem) -> None:
        async def work(conn: asyncpg.Connection[Any]) -> None:
            if await conn.fetchval(q("lock_work_item"), item.id, item.lease_token) is None:
                return  # lease lost: someone else owns this item now
            if self._user_search_path is None:
                self._user_search_path = str(await conn.fetchval(q("user_search_path")))
            await conn.execute(q("set_search_path"), self._user_search_path)  # the user's tables, not ours
            ctx = TransactionContext(item.instance_id, item.activity_id, item.name, item.attempt, conn=conn)
            result = await definition.fn(ctx, item.input)
            outcome = self._success(item, result)
            if outcome.kind != ev.ACTIVITY_COMPLETED:
                raise _Unencodable(outcome)
            await conn.execute(q("set_search_path"), self.db.schema)
            await conn.fetch(q("ack_work"), [item.id], [item.lease_token], [outcome.kind], [outcome.payload])

        try:
            await self.db.run(work, reset_session=True)
        except _Unencodable as bad:
            self._finish(bad.outcome)
            return
        except DatabaseError as exc:  # the activity's own SQL failed (or the database stayed away)
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            self._finish(self._failure(definition, item, cause))
            return
        self.inflight.pop(item.id, None)
        self.stats["completed"] += 1
        self.acked.set()

    def _success(self, item: WorkItem, result: Any) -> Outcome:
        try:
            body = encode(result, what=f"result of activity {item.name!r}", limit=self.max_payload_bytes)
        except SerializationError as exc:
            payload = {"task_id": item.task_id, "error": error_payload(exc), "attempts": item.attempt}
            return Outcome(item, ev.ACTIVITY_FAILED, orjson.dumps(payload).decode())
        return Outcome(item, ev.ACTIVITY_COMPLETED, f'{{"task_id":{item.task_id},"result":{body}}}')

    def _failure(self, definition: ActivityDef, item: WorkItem, exc: BaseException) -> Outcome:
        policy = item.retry or definition.retry
        error = error_payload(exc)
        if policy.should_retry(item.attempt, error["type"]):
            return Outcome(item, "retry", delay=policy.delay(item.attempt))
        payload = {"task_id": item.task_id, "error": error, "attempts": item.attempt}
        return Outcome(item, ev.ACTIVITY_FAILED, orjson.dumps(payload).decode())

    def _finish(self, outcome: Outcome) -> None:
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

        async def write(conn: asyncpg.Connection[Any]) -> None:
            if acks:
                await conn.fetch(
                    q("ack_work"),
                    [o.item.id for o in acks],
                    [o.item.lease_token for o in acks],
                    [o.kind for o in acks],
                    [o.payload for o in acks],
                )
            if retries:
                await conn.execute(
                    q("retry_work"),
                    [o.item.id for o in retries],
                    [o.item.lease_token for o in retries],
                    [o.delay for o in retries],
                )

        try:  # one statement needs no explicit transaction (it is atomic on its own)
            await self.db.run(write, retry_for=math.inf, transaction=bool(retries))
        except BaseException:
            self._outcomes[:0] = batch  # keep them for the next flush
            raise
        for o in batch:
            self.inflight.pop(o.item.id, None)
        self.stats["acks"] += 1
        self.stats["completed"] += sum(1 for o in acks if o.kind == ev.ACTIVITY_COMPLETED)
        self.stats["failed"] += sum(1 for o in acks if o.kind == ev.ACTIVITY_FAILED)
        self.stats["retried"] += len(retries)
        self.acked.set()
        self._freed()
        return len(acks), len(retries)

    async def extend_leases(self) -> None:
        """Push the lease expiry of running, non-transactional items forward."""
        tokens = [i.lease_token for i in self.inflight.values() if not self.app.activities[i.name].transactional]
        if tokens:
            await self.db.run(
                lambda conn: conn.execute(q("extend_leases"), tokens, self.lease_seconds), transaction=False
            )

    async def release(self, items: list[WorkItem]) -> None:
        """Give unfinished items back at once (graceful shutdown)."""
        if items:
            await self.db.run(
                lambda conn: conn.execute(q("release_leases"), [i.id for i in items], [i.lease_token for i in items]),
                transaction=False,
                retry_for=5,
            )


def _policy(data: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=int(data.get("max_attempts", 3)),
        initial_interval=float(data.get("initial_interval", 1.0)),
        backoff=float(data.get("backoff", 2.0)),
        max_interval=float(data.get("max_interval", 60.0)),
        non_retryable=tuple(data.get("non_retryable", ())),
    )


class _Unencodable(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__("activity result could not be encoded")
        self.outcome = outcome


def _runtime_is_cancelling() -> bool:
    """True when this task is being cancelled (rather than user code raising CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
