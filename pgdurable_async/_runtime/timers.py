"""The timer loop: sleep until the earliest known ``fire_at``, then fire what is due in one statement."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._store import Database, timer_store
from .clock import Clock
from .loops import StepsInFlight, guarded
from .wakeup import Wakeup

FIRE_BATCH = 1000  # timers moved to the orchestrator queue per statement


class TimerLoop:
    """Fires the durable timers of ``orchestrations``; a NOTIFY for an earlier timer re-arms it."""

    def __init__(
        self,
        db: Database,
        orchestrations: Sequence[str],
        wakeup: Wakeup,
        *,
        on_fired: Callable[[], None],
        steps: StepsInFlight,
        clock: Clock | None = None,
    ) -> None:
        self.db = db
        self.clock = clock or Clock()
        self.orchestrations = list(orchestrations)
        self.wakeup = wakeup
        self.on_fired = on_fired
        self.steps = steps

    async def run(self, stopping: Callable[[], bool]) -> None:
        if not self.orchestrations:
            return
        while not stopping():
            seen = self.wakeup.generation
            wait_for: float | None = None

            async def step() -> None:
                nonlocal wait_for
                with self.steps:
                    fired = await self.db.run(
                        lambda conn: timer_store.fire_timers(conn, orchestrations=self.orchestrations,
                                                             limit=FIRE_BATCH, offset=self.clock.offset)
                    )
                if fired:
                    self.on_fired()
                if fired >= FIRE_BATCH:
                    wait_for = 0.0
                    return
                due_in = await self.db.run(
                    lambda conn: timer_store.next_timer(conn, orchestrations=self.orchestrations,
                                                        offset=self.clock.offset),
                    transaction=False,
                )
                if due_in is not None:  # the database's clock, as fire_timers: a skewed worker clock is harmless
                    wait_for = max(0.0, due_in) + 0.002

            if not await guarded("timer", step):
                continue
            await self.wakeup.wait(seen, wait_for)
