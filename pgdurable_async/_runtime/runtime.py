"""The runtime: LISTEN for wake-ups, dispatch turns, activities and timers.

::

    LISTEN session ──NOTIFY──▶ Wakeup ──▶ turn loops · activity dispatcher · timer loop · schedule loop
                                             │ one transaction per turn batch / ack batch / firing

No loop polls in the steady state: each sleeps until a NOTIFY, a local event or
the earliest known deadline (timer, schedule, retry backoff, lease expiry, rate window).  After every
(re)connection of the LISTEN session, and every ``sweep_interval`` seconds, all
loops run once anyway, so a missed notification costs latency, never work.

``wake="poll"`` (behind a transaction-pooling pooler, where LISTEN cannot work) has
no LISTEN session: a ticker wakes every loop each ``poll_interval`` seconds, and the
worker's liveness is a heartbeat with an expiry instead of its session's backend.
``wake="auto"`` (the default) tests at start whether LISTEN works and picks one.
With ``retention``, each sweep also purges old finished instances in small batches.
With ``metrics=True`` the runtime's counters and the database-wide gauges join
``prometheus_client.REGISTRY`` (``_runtime/metrics.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from .._app import App
from .._base.errors import ConfigurationError, DatabaseError
from .._base.serde import DEFAULT_MAX_PAYLOAD_BYTES
from .._client import Client
from .._store import Connection, Database, queue_store, worker_store
from .._store.listener import Listener, detect_wake, pooled_for
from .._store.migrations import migrate_connection, require_current
from .._store.records import WorkItem
from . import metrics as prometheus
from .activities import ActivityWorker
from .clock import Clock
from .loops import StepsInFlight, deadline, guarded
from .notifier import Notifier
from .observer import Observer
from .retention import Retention
from .schedules import ScheduleLoop
from .timers import TimerLoop
from .turns import TurnProcessor
from .wakeup import Wakeup

log = logging.getLogger("pgdurable_async.runtime")
_HELD_RECHECK = 1.0  # seconds: a turn loop looks again at messages another worker's turn held


class Runtime:
    """Runs an :class:`App`'s orchestrations and activities against one database.

    Use it as ``async with Runtime(app, dsn) as runtime:`` inside a service, or
    call :meth:`serve` to run until cancelled (the CLI worker does).
    """

    def __init__(
        self,
        app: App,
        dsn: str,
        *,
        schema: str = "pgdurable",
        max_concurrency: int = 64,
        turn_batch_size: int = 32,
        turn_concurrency: int = 2,
        lease_seconds: float = 30.0,
        sweep_interval: float = 30.0,
        drain_timeout: float = 30.0,
        cache_size: int = 10_000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        migrate: bool = True,
        worker_id: str | None = None,
        wake: str = "auto",
        poll_interval: float = 0.5,
        retention: timedelta | None = None,
        metrics: bool = False,
    ) -> None:
        if max_concurrency < 1 or turn_concurrency < 1 or turn_batch_size < 1:
            raise ConfigurationError("max_concurrency, turn_concurrency and turn_batch_size must be >= 1")
        if not poll_interval > 0:
            raise ConfigurationError(f"poll_interval must be > 0 seconds, not {poll_interval!r}")
        pooled = pooled_for(wake)
        app.install_builtins()  # SQL-started graphs (df.start) run on any worker
        self.app = app
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db = Database(dsn, schema=schema, min_size=2, max_size=min(max_concurrency, 32) + turn_concurrency + 4,
                           pooled=pooled)
        #: "listen" or "poll" once started ("auto" until the start-up test has decided).
        self.wake = wake
        self.poll_interval = poll_interval
        #: NOTIFYs of our turns, acks and client starts, sent after their commits (notify_store).
        self.notifier = Notifier(self.db)
        self.client = Client(app=app, max_payload_bytes=max_payload_bytes, wake=wake, poll_interval=poll_interval,
                             _db=self.db, _on_sent=self._client_sent, _notify=self.notifier.request)
        self.clock = Clock()  # the database's clock; only testing.Environment moves its offset
        self.metrics = metrics
        self.observer = Observer(self.db, metrics=metrics)
        self._metrics_source: prometheus.Source | None = None
        self.turns = TurnProcessor(
            self.db, app, batch_size=turn_batch_size, cache_size=cache_size, max_payload_bytes=max_payload_bytes,
            clock=self.clock, observer=self.observer,
        )
        self.activities = ActivityWorker(
            self.db,
            app,
            worker_id=self.worker_id,
            max_concurrency=max_concurrency,
            lease_seconds=lease_seconds,
            max_payload_bytes=max_payload_bytes,
            clock=self.clock,
            observer=self.observer,
        )
        self.turns.notify = self.activities.notify = self.notifier.request
        self.retention = None if retention is None else Retention(self.db, retention)
        self.turn_concurrency = turn_concurrency
        self.lease_seconds = lease_seconds
        self.sweep_interval = sweep_interval
        self.drain_timeout = drain_timeout
        self._migrate = migrate
        self._orch = Wakeup()
        self._work = Wakeup()
        self._timer = Wakeup()
        self._schedule = Wakeup()
        self._steps = StepsInFlight()  # turn and timer transactions under way (stop lets them finish)
        self._stopping = anyio.Event()
        self._activities_drained = anyio.Event()
        self._tg: TaskGroup | None = None
        self._owner: int | None = None  # the task that started us; only it may close the task group
        self._stopped = anyio.Event()
        self._listener = Listener(self.db, {
            self.db.channel("orch"): lambda _payload: self._orch.set(),
            self.db.channel("work"): lambda _payload: self._work.set(),
            self.db.channel("timer"): lambda _payload: self._timer.set(),
            self.db.channel("schedule"): lambda _payload: self._schedule.set(),
        })
        self._timers = TimerLoop(self.db, sorted(app.orchestrations), self._timer, on_fired=self._orch.set,
                                 steps=self._steps, clock=self.clock)
        self.schedules = ScheduleLoop(self.db, sorted(app.orchestrations), self._schedule, on_fired=self._orch.set,
                                      steps=self._steps)
        self._blocked_polls = 0
        self._df_expiry_due = 0.0  # monotonic time of the next retention pass over df instances

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, migrate, register names and start the loops."""
        try:
            await self._prepare_database()
            if self.metrics:
                self._metrics_source = prometheus.register(self.db, self.observer.oldest_running)
        except BaseException:
            await self._listener.close()
            await self.db.close()
            raise
        listener_ready = anyio.Event()
        self._owner = anyio.get_current_task().id
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._listen if self.wake == "listen" else self._poll, listener_ready)
        for _ in range(self.turn_concurrency):
            self._tg.start_soon(self._turn_loop)
        self._tg.start_soon(self._activity_loop)
        self._tg.start_soon(self._ack_loop)
        self._tg.start_soon(self._lease_loop)
        self._tg.start_soon(self.notifier.run)
        self._tg.start_soon(self._timers.run, self._stopping.is_set)
        if self.retention is not None:
            self._tg.start_soon(self.retention.run, self._stopping.is_set)
        self._tg.start_soon(self.schedules.run, self._stopping.is_set)
        with anyio.move_on_after(10):
            await listener_ready.wait()

    async def _prepare_database(self) -> None:
        await self.db.open()
        if self.wake == "auto":
            self.wake = await detect_wake(self._listener, poll_interval=self.poll_interval)
        self.client.wake = self.wake
        if self._migrate:
            await self.db.run(lambda conn: migrate_connection(conn, self.db.schema), transaction=False)
        else:
            await self.db.run(lambda conn: require_current(conn, self.db.schema), transaction=False)
        orchestrations = sorted(self.app.orchestrations)
        activities = {name: d.queue for name, d in sorted(self.app.activities.items())}
        queues = [self.app.queues[name] for name in sorted(self.app.queues)]

        async def register(conn: Connection) -> None:
            if queues:  # before the names: an item enqueued under a queue finds its limits stored
                await queue_store.upsert_queues(conn, queues)
            await worker_store.register_names(conn, orchestrations=orchestrations, activities=activities)

        if orchestrations or activities:
            await self.db.run(register)

    async def serve(self) -> None:
        """Run until cancelled (or :meth:`stop` is called), then drain."""
        async with self:
            await self._stopping.wait()

    async def stop(self) -> None:
        """Stop claiming, let running activities finish (up to ``drain_timeout``), shut down.

        Safe to call more than once and from any task: a task other than the one
        that started the runtime asks for the stop and waits for it to finish.
        """
        if self._tg is None:
            return
        if anyio.get_current_task().id != self._owner:
            self._stopping.set()
            await self._stopped.wait()
            return
        if self._stopping.is_set() and self._stopped.is_set():
            return
        self._stopping.set()
        if self._metrics_source is not None:
            await prometheus.unregister(self._metrics_source)
            self._metrics_source = None
        self.wake_all()
        self.activities.capacity.set()
        with anyio.move_on_after(self.drain_timeout, shield=True):
            await self._activities_drained.wait()
        with anyio.move_on_after(10, shield=True):  # let a turn in progress commit, not be cut off
            await self._steps.idle()
        tg, self._tg = self._tg, None
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
        finally:  # even if a loop failed: leave no session or pool behind
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(10):
                    with contextlib.suppress(Exception):
                        await self.activities.flush()
                    with contextlib.suppress(Exception):
                        await self.activities.release(list(self.activities.inflight.values()))
                    await self.notifier.flush()  # the last acks' NOTIFYs
                    with contextlib.suppress(Exception):
                        await self.db.run(lambda c: worker_store.deregister_worker(c, worker_id=self.worker_id),
                                          retry_for=2)
                await self._listener.close()
                await self.client.close()  # its LISTEN session; the pool is ours to close
                await self.db.close()
            self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake_all(self) -> None:
        self._orch.set()
        self._work.set()
        self._timer.set()
        self._schedule.set()

    @property
    def reconnects(self) -> int:
        """How often the LISTEN session was lost and opened again."""
        return self._listener.reconnects

    def _client_sent(self) -> None:
        """Our own client started or signalled an instance: look now, not after the NOTIFY's round trip
        (with wake="poll" there is none to wait for)."""
        self._orch.set()

    # -- LISTEN session -------------------------------------------------------------
    async def _listen(self, ready: anyio.Event) -> None:
        async def registered(conn: Connection) -> None:  # on the LISTEN session: its backend is our liveness
            await self.db.run_on(conn, lambda c: worker_store.register_worker(c, worker_id=self.worker_id),
                                 transaction=False)
            await self._sweep()

        await self._listener.serve(on_connect=registered, interval=self.sweep_interval, on_interval=registered,
                                   ready=ready, stopping=lambda: self.stopping)

    # -- no LISTEN session (wake="poll") -------------------------------------------------
    @property
    def heartbeat_interval(self) -> float:
        """wake="poll": how often the worker renews its liveness (it is dead after 3 missed)."""
        return max(0.2, min(self.lease_seconds / 6, self.sweep_interval))

    async def _poll(self, ready: anyio.Event) -> None:
        """Wake every loop each ``poll_interval``; heartbeat and sweep each ``heartbeat_interval``."""
        next_beat = 0.0
        while True:
            if anyio.current_time() >= next_beat:
                next_beat = anyio.current_time() + self.heartbeat_interval
                await guarded("heartbeat", self._heartbeat)
                ready.set()
            self.wake_all()
            await anyio.sleep(min(self.poll_interval, max(0.0, next_beat - anyio.current_time())))

    async def _heartbeat(self) -> None:
        ttl = 3 * self.heartbeat_interval
        await self.db.run(lambda conn: worker_store.heartbeat_worker(conn, worker_id=self.worker_id, ttl=ttl),
                          retry_for=self.heartbeat_interval)
        await self._sweep()

    async def _sweep(self) -> None:
        """Catch up on anything a missed NOTIFY would have announced."""
        with contextlib.suppress(DatabaseError):
            await self.db.run(worker_store.release_dead_leases, retry_for=5)
        with contextlib.suppress(DatabaseError):
            await self._expire_df()
        self.wake_all()
        if self.retention is not None:
            self.retention.due()  # purged by its own loop, off the LISTEN session

    async def _expire_df(self) -> None:
        """pg_durable's retention of finished df instances, every ``pg_durable.reconcile_interval`` s (0: never)."""
        now = time.monotonic()
        if now < self._df_expiry_due:
            return
        interval = await self.db.run(worker_store.df_retention_interval, transaction=False)
        self._df_expiry_due = now + (interval or 3600)
        if interval > 0:
            await self.db.run(worker_store.expire_df_instances)

    # -- loops --------------------------------------------------------------------------
    async def _turn_loop(self) -> None:
        while not self.stopping:
            seen = self._orch.generation
            progressed, held = 0, False

            async def step() -> None:
                nonlocal progressed, held
                with self._steps:
                    progressed, held = await self.turns.run_batch()

            if not await guarded("turn", step) or progressed:
                self._work.set()  # new timers wake the timer loop through their own NOTIFY
                continue
            # Messages held by another worker's turn: if that worker dies, its locks go with its
            # session and no NOTIFY says so, so look again after a moment (not only at the sweep).
            await self._orch.wait(seen, _HELD_RECHECK if held else None)

    async def _activity_loop(self) -> None:
        worker = self.activities
        threshold = max(1, worker.max_concurrency // 4)
        try:
            async with anyio.create_task_group() as running:
                while not self.stopping:
                    seen_work, seen_cap = self._work.generation, worker.capacity.generation
                    if worker.free < threshold:  # claim in batches, not one by one; a full ack backlog
                        await worker.capacity.wait(seen_cap)  # with nothing running waits for the flush
                        continue
                    claimed, wait_for = await self._claim_step()
                    if claimed:
                        running.start_soon(worker.execute_batch, claimed)
                    if wait_for == 0.0:
                        continue  # claimed a full batch: there may be more
                    await self._work.wait(seen_work, deadline(wait_for))
        finally:
            self._activities_drained.set()

    async def _claim_step(self) -> tuple[list[WorkItem], float | None]:
        """Claim a batch; also say how long to sleep (0: go again, None: until woken)."""
        worker = self.activities
        wanted = min(worker.free, worker.claim_batch)
        claimed: list[WorkItem] = []
        due: float | None = None

        async def step() -> None:
            nonlocal claimed, due
            claimed = await worker.claim()
            if not claimed:  # after a partial claim, new work announces itself with a NOTIFY
                due = await worker.next_due()

        if not await guarded("activity claim", step):
            return [], 0.0  # try again (after the back-off)
        if len(claimed) >= wanted:
            return claimed, 0.0  # a full batch: there may be more
        # Limited queues that gave less than asked: a rate window slides or a backoff ends at
        # wake_in; a lease ends with an ack, whose NOTIFY wakes us.
        limited = max(0.0, worker.queue_wake.wake_in) if worker.queue_wake.wake_in is not None else None
        if due is not None and due <= 0:
            # Rows are due but were not ours to claim: another worker is claiming them, or a
            # long transactional activity holds them. Look again, backing off while it lasts.
            self._blocked_polls += 1
            return claimed, _sooner(min(0.05 * 2**self._blocked_polls, max(self.lease_seconds, 5.0)), limited)
        self._blocked_polls = 0
        return claimed, _sooner(due, limited)

    async def _ack_loop(self) -> None:
        worker = self.activities
        while True:
            seen = worker.acks_pending.generation

            async def step() -> None:
                acked, retried = await worker.flush()
                if acked:
                    self._orch.set()
                if retried:
                    self._work.set()  # the dispatcher re-reads the earliest visible_at

            if await guarded("activity ack", step):
                await worker.acks_pending.wait(seen)
            # else the batch went back to the buffer: flush it again (after guarded's back-off),
            # not only once another activity finishes, which may never happen

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            await guarded("lease extension", self.activities.extend_leases)
            await guarded("running report", lambda: self.observer.report_running(self.worker_id))


def _sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional deadlines (None: no deadline)."""
    return b if a is None else a if b is None else min(a, b)
