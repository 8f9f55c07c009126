"""The schedule loop: fire due schedules, then sleep until the next one is due.

Each pass is one transaction: lock due schedules (``FOR UPDATE SKIP LOCKED``, so
concurrent runtimes split them), decide per schedule what to fire
(:func:`pgdurable_async._base.schedules.plan`), create the instances and advance
``next_fire_at``.  An instance id names its schedule and fire time, so a fire time
starts one instance however many runtimes race for it.  The loop is woken by the
``<schema>_schedule`` NOTIFY (a schedule changed) and by its own deadline, computed
from the database's clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .._base.errors import PgDurableError
from .._base.schedules import ScheduleSpec, plan
from .._store import Connection, Database, schedule_store
from .._store.records import DueSchedule
from .loops import StepsInFlight, guarded
from .wakeup import Wakeup

log = logging.getLogger("pgdurable_async.schedules")

FIRE_BATCH = 32  # schedules handled per transaction
_RETRY_BROKEN = timedelta(seconds=60)  # a schedule that cannot be evaluated is looked at again after this


class ScheduleLoop:
    """Fires the schedules of ``orchestrations``."""

    def __init__(
        self,
        db: Database,
        orchestrations: Sequence[str],
        wakeup: Wakeup,
        *,
        on_fired: Callable[[], None],
        steps: StepsInFlight,
    ) -> None:
        self.db = db
        self.orchestrations = list(orchestrations)
        self.wakeup = wakeup
        self.on_fired = on_fired
        self.steps = steps
        # When this loop began watching (the database's clock): times due before it were missed.
        self.watching_since: datetime | None = None
        self.deferred: dict[str, datetime] = {}  # schedule id -> when to decide again (catchup="none")
        self.fired = 0

    async def run(self, stopping: Callable[[], bool]) -> None:
        if not self.orchestrations:
            return
        while not stopping():
            seen = self.wakeup.generation
            wait_for: float | None = None

            async def step() -> None:
                nonlocal wait_for
                with self.steps:
                    fired, full = await self.db.run(self._pass)
                if fired:
                    self.fired += fired
                    self.on_fired()
                if full:
                    wait_for = 0.0
                    return
                due_in = await self.db.run(
                    lambda conn: schedule_store.next_due(conn, orchestrations=self.orchestrations,
                                                         deferred=self.deferred),
                    transaction=False,
                )
                if due_in is not None:
                    wait_for = max(0.0, due_in) + 0.002

            if not await guarded("schedule", step):
                self.watching_since = None  # the database was away: what came due meanwhile was missed
                continue
            await self.wakeup.wait(seen, wait_for)

    async def _pass(self, conn: Connection) -> tuple[int, bool]:
        """One firing transaction; returns (instances started, whether the batch was full)."""
        now = await schedule_store.db_now(conn)
        watching = self.watching_since or now
        self.deferred = {k: v for k, v in self.deferred.items() if v > now}
        due = await schedule_store.claim_due(conn, orchestrations=self.orchestrations, limit=FIRE_BATCH,
                                             deferred=self.deferred)
        started = 0
        for row in due:
            started += await self._fire(conn, row, watching)
        self.watching_since = watching
        return started, len(due) >= FIRE_BATCH

    async def _fire(self, conn: Connection, row: DueSchedule, watching: datetime) -> int:
        try:
            spec = ScheduleSpec(row.cron, row.every, row.timezone, row.overlap, row.catchup, ZoneInfo(row.timezone))
            decided = plan(spec, next_fire_at=row.next_fire_at, now=row.db_now, watching_since=watching,
                           previous_running=row.previous_running)
        except (PgDurableError, ValueError) as exc:  # a schedule written by hand, or cronsim missing
            log.error("schedule %r cannot fire: %s", row.schedule_id, exc)
            self.deferred[row.schedule_id] = row.db_now.replace(microsecond=0) + _RETRY_BROKEN
            return 0
        if decided.defer_until is not None:
            self.deferred[row.schedule_id] = decided.defer_until
            return 0
        started = 0
        if decided.fire:
            started = await schedule_store.start_firings(conn, schedule_id=row.schedule_id, fire_at=decided.fire,
                                                         orchestration=row.orchestration, input_json=row.input_json)
        await schedule_store.advance(conn, schedule_id=row.schedule_id, next_fire_at=decided.next_fire_at,
                                     last_fired=decided.fire[-1] if decided.fire else None)
        return started
