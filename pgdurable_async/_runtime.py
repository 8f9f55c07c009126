"""The runtime: LISTEN for wake-ups, dispatch turns, activities and timers.

::

    LISTEN session ──NOTIFY──▶ Wakeup ──▶ turn loops · activity dispatcher · timer loop
                                             │ one transaction per turn batch / ack batch

No loop polls in the steady state: each sleeps until a NOTIFY, a local event or
the earliest known deadline (timer, retry backoff, lease expiry).  After every
(re)connection of the LISTEN session, and every ``sweep_interval`` seconds, all
loops run once anyway, so a missed notification costs latency, never work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskGroup

from ._activities import ActivityWorker, WorkItem
from ._app import App
from ._client import Client
from ._errors import ConfigurationError, DatabaseError
from ._graph_acts import install as install_graph_builtins
from ._migrate import migrate_connection, require_current
from ._serde import DEFAULT_MAX_PAYLOAD_BYTES
from ._sql import q
from ._store import Database, is_transient
from ._turns import TurnProcessor
from ._wakeup import Wakeup

log = logging.getLogger("pgdurable_async.runtime")


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
    ) -> None:
        if max_concurrency < 1 or turn_concurrency < 1 or turn_batch_size < 1:
            raise ConfigurationError("max_concurrency, turn_concurrency and turn_batch_size must be >= 1")
        install_graph_builtins(app)  # SQL-started graphs (df.start) run on any worker
        self.app = app
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db = Database(dsn, schema=schema, min_size=2, max_size=min(max_concurrency, 32) + turn_concurrency + 4)
        self.client = Client(app=app, max_payload_bytes=max_payload_bytes, _db=self.db)
        self.turns = TurnProcessor(
            self.db, app, batch_size=turn_batch_size, cache_size=cache_size, max_payload_bytes=max_payload_bytes
        )
        self.activities = ActivityWorker(
            self.db,
            app,
            worker_id=self.worker_id,
            max_concurrency=max_concurrency,
            lease_seconds=lease_seconds,
            max_payload_bytes=max_payload_bytes,
        )
        self.turn_concurrency = turn_concurrency
        self.lease_seconds = lease_seconds
        self.sweep_interval = sweep_interval
        self.drain_timeout = drain_timeout
        self._migrate = migrate
        self._orch = Wakeup()
        self._work = Wakeup()
        self._timer = Wakeup()
        self._stopping = anyio.Event()
        self._activities_drained = anyio.Event()
        self._tg: TaskGroup | None = None
        self._owner: int | None = None  # the task that started us; only it may close the task group
        self._stopped = anyio.Event()
        self._listener: asyncpg.Connection[Any] | None = None
        self.reconnects = 0
        self._blocked_polls = 0
        self._steps = _StepsInFlight()  # turn and timer transactions under way (stop lets them finish)

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
        except BaseException:
            await self.db.close()
            raise
        listener_ready = anyio.Event()
        self._owner = anyio.get_current_task().id
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._listen, listener_ready)
        for _ in range(self.turn_concurrency):
            self._tg.start_soon(self._turn_loop)
        self._tg.start_soon(self._activity_loop)
        self._tg.start_soon(self._ack_loop)
        self._tg.start_soon(self._lease_loop)
        self._tg.start_soon(self._timer_loop)
        with anyio.move_on_after(10):
            await listener_ready.wait()

    async def _prepare_database(self) -> None:
        await self.db.open()
        if self._migrate:
            await self.db.run(lambda conn: migrate_connection(conn, self.db.schema), transaction=False)
        else:
            await self.db.run(lambda conn: require_current(conn, self.db.schema), transaction=False)
        names = [("orchestration", n) for n in self.app.orchestrations] + [("activity", n) for n in self.app.activities]
        if names:
            await self.db.run(
                lambda conn: conn.execute(q("register_names"), [k for k, _ in names], [n for _, n in names])
            )

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
                    with contextlib.suppress(Exception):
                        await self.db.run(lambda c: c.execute(q("deregister_worker"), self.worker_id), retry_for=2)
                await self._close_listener()
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

    # -- LISTEN session -------------------------------------------------------------
    async def _listen(self, ready: anyio.Event) -> None:
        channels = {
            self.db.channel("orch"): self._orch,
            self.db.channel("work"): self._work,
            self.db.channel("timer"): self._timer,
        }
        delay = 0.1
        while not self.stopping:
            lost = anyio.Event()
            try:
                conn = await self.db.connect()
                self._listener = conn
                conn.add_termination_listener(_set_on_call(lost))
                for channel, wakeup in channels.items():
                    await conn.add_listener(channel, _notify_to(wakeup))
                await conn.execute(q("register_worker"), self.worker_id)
                await self._sweep()
                ready.set()
                delay = 0.1
                while not lost.is_set():
                    with anyio.move_on_after(self.sweep_interval):
                        await lost.wait()
                    if lost.is_set():
                        break
                    await conn.execute(q("register_worker"), self.worker_id)  # alive: heartbeat, re-register
                    await self._sweep()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect whatever went wrong
                if not (is_transient(exc) or isinstance(exc, DatabaseError)):
                    log.exception("LISTEN session failed")
                log.warning("LISTEN session lost (%s); reconnecting", exc)
            await self._close_listener()
            if self.stopping:
                return
            self.reconnects += 1
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _sweep(self) -> None:
        """Catch up on anything a missed NOTIFY would have announced."""
        with contextlib.suppress(DatabaseError):
            await self.db.run(lambda conn: conn.fetch(q("release_dead_leases")), retry_for=5)
        self.wake_all()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    # -- loops --------------------------------------------------------------------------
    async def _guarded(self, what: str, step: Any) -> bool:
        """Run ``step()``; on an error log it, back off a little and return False.

        The loops then run again (the failure may be a database restart); they
        never crash the runtime.
        """
        try:
            await step()
            return True
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("%s failed: %s", what, exc)
            await anyio.sleep(0.5)
            return False

    async def _turn_loop(self) -> None:
        while not self.stopping:
            seen = self._orch.generation
            progressed = 0

            async def step() -> None:
                nonlocal progressed
                with self._steps:
                    progressed = await self.turns.run_batch()

            if not await self._guarded("turn", step) or progressed:
                self._work.set()  # new timers wake the timer loop through their own NOTIFY
                continue
            await self._orch.wait(seen)

    async def _activity_loop(self) -> None:
        worker = self.activities
        threshold = max(1, worker.max_concurrency // 4)
        try:
            async with anyio.create_task_group() as running:
                while not self.stopping:
                    seen_work, seen_cap = self._work.generation, worker.capacity.generation
                    if worker.free < threshold and worker.running:
                        await worker.capacity.wait(seen_cap)  # claim in batches, not one by one
                        continue
                    claimed, wait_for = await self._claim_step()
                    if claimed:
                        running.start_soon(worker.execute_batch, claimed)
                    if wait_for == 0.0:
                        continue  # claimed a full batch: there may be more
                    await self._work.wait(seen_work, _deadline(wait_for))
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

        if not await self._guarded("activity claim", step):
            return [], 0.0  # try again (after the back-off)
        if len(claimed) >= wanted:
            return claimed, 0.0  # a full batch: there may be more
        if due is not None and due <= 0:
            # Rows are due but were not ours to claim: another worker is claiming them, or a
            # long transactional activity holds them. Look again, backing off while it lasts.
            self._blocked_polls += 1
            return claimed, min(0.05 * 2**self._blocked_polls, max(self.lease_seconds, 5.0))
        self._blocked_polls = 0
        return claimed, due

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

            await self._guarded("activity ack", step)
            await worker.acks_pending.wait(seen)

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            await self._guarded("lease extension", self.activities.extend_leases)

    async def _timer_loop(self) -> None:
        names = sorted(self.app.orchestrations)
        if not names:
            return
        while not self.stopping:
            seen = self._timer.generation
            wait_for: float | None = None

            async def step() -> None:
                nonlocal wait_for
                with self._steps:
                    fired = await self.db.run(lambda conn: conn.fetchval(q("fire_timers"), names, 1000))
                if fired:
                    self._orch.set()
                if fired and fired >= 1000:
                    wait_for = 0.0
                    return
                earliest = await self.db.run(lambda conn: conn.fetchval(q("next_timer"), names), transaction=False)
                if earliest is not None:
                    wait_for = max(0.0, (earliest - datetime.now(UTC)).total_seconds()) + 0.002

            if not await self._guarded("timer", step):
                continue
            await self._timer.wait(seen, wait_for)


class _StepsInFlight:
    """Counts loop steps that are inside a transaction; :meth:`idle` waits for none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        if self._count == 0:
            self._idle = anyio.Event()
        self._count += 1

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


def _set_on_call(event: anyio.Event) -> Any:
    def on_call(*_args: Any) -> None:
        event.set()

    return on_call


def _notify_to(wakeup: Wakeup) -> Any:
    def on_notify(_conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        wakeup.set()

    return on_notify


def _deadline(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    return max(0.001, seconds + 0.002) if math.isfinite(seconds) else None
