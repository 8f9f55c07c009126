"""``testing.Environment``: a Runtime on real PostgreSQL whose clock skips ahead when idle.

Time skipping moves the runtime's clock offset (see ``_runtime/clock.py``): every
durable time the runtime reads is ``now() + offset`` in SQL.  Whenever no activity
runs, no message waits and no work item is visible, the offset jumps to the
earliest timer or retry, so ``await ctx.sleep(timedelta(days=30))`` returns in
milliseconds while ``ctx.now()`` advances 30 days.  Idleness is checked by one
query every few milliseconds (backing off while nothing is scheduled at all):
this is a test harness, the runtime itself still never polls.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from .._app import App
from .._base.errors import DatabaseError
from .._client import Client
from .._runtime import Runtime
from .._store import timer_store
from .._store.cluster import EmbeddedCluster

log = logging.getLogger("pgdurable_async.testing")

_MIN_PAUSE = 0.002  # seconds between idleness checks while things happen
_MAX_PAUSE = 0.05  # ... and at most, while nothing at all is scheduled
_PAST_DUE = timedelta(milliseconds=1)  # land just after the deadline, not on it
#: A throwaway cluster need not survive a power cut.
_CLUSTER_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class Environment:
    """Runs ``app`` in a :class:`pgd.Runtime` for tests: ``async with Environment(app) as env``.

    With no ``dsn`` it starts a throwaway PostgreSQL cluster from the server binaries
    on the machine (and removes it afterwards).  ``env.client`` is the runtime's
    client; other keyword arguments go to the Runtime.
    """

    def __init__(self, app: App, dsn: str | None = None, *, time_skipping: bool = True,
                 **runtime_options: Any) -> None:
        self.app = app
        self.time_skipping = time_skipping
        self._dsn = dsn
        self._options = runtime_options
        self._cluster: EmbeddedCluster | None = None
        self._runtime: Runtime | None = None
        self._tg: TaskGroup | None = None
        self.skips = 0  # how often the clock jumped

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the Environment is not running: use `async with Environment(app) as env`")
        return self._runtime

    @property
    def client(self) -> Client:
        return self.runtime.client

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("the Environment is not running")
        return self._dsn

    @property
    def clock_offset(self) -> timedelta:
        """How far the runtime's clock is ahead of the database's."""
        return self.runtime.clock.offset

    async def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta`` now (also without time skipping)."""
        self.runtime.clock.advance(delta)
        self.runtime.wake_all()

    async def __aenter__(self) -> Environment:
        if self._dsn is None:
            self._cluster = EmbeddedCluster(settings=_CLUSTER_SETTINGS)
            self._dsn = await anyio.to_thread.run_sync(self._cluster.start)
        try:
            self._runtime = Runtime(self.app, self._dsn, **self._options)
            await self._runtime.start()
            if self.time_skipping:
                self._tg = anyio.create_task_group()
                await self._tg.__aenter__()
                self._tg.start_soon(self._skip_time)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:  # entered after the runtime's own task group: left before it
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            runtime, self._runtime = self._runtime, None
            try:
                if runtime is not None:
                    await runtime.stop()
            finally:
                cluster, self._cluster = self._cluster, None
                if cluster is not None:
                    self._dsn = None
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(cluster.stop)

    async def _skip_time(self) -> None:
        """Jump to the next timer or retry whenever nothing can run now."""
        runtime = self.runtime
        orchestrations, activities = sorted(runtime.app.orchestrations), sorted(runtime.app.activities)
        pause = _MIN_PAUSE
        while True:
            await anyio.sleep(pause)
            pause = _MIN_PAUSE
            if runtime.activities.running or runtime.activities.inflight:
                continue  # an activity runs, or its result is not acked yet

            async def target(conn: Any) -> tuple[bool, float | None]:
                return await timer_store.skip_target(conn, orchestrations=orchestrations, activities=activities,
                                                     offset=runtime.clock.offset)

            try:
                busy, due_in = await runtime.db.run(target, transaction=False, retry_for=1)
            except DatabaseError as exc:  # the database went away under a test: look again later
                log.warning("time skipping: %s", exc)
                pause = _MAX_PAUSE
                continue
            if busy:
                continue
            if due_in is None:
                pause = _MAX_PAUSE  # nothing scheduled: a new start or event is announced by the runtime
                continue
            if due_in > 0:
                runtime.clock.advance(timedelta(seconds=due_in) + _PAST_DUE)
                self.skips += 1
            runtime.wake_all()
