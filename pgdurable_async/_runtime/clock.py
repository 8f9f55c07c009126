"""The runtime's clock: the database's ``now()`` plus an offset.

Every durable time (history times, ``ctx.now()``, timers, activity visibility
and leases) is read in SQL as ``now() + offset``.  The offset is zero except
under ``testing.Environment``'s time skipping, which moves it forward to the
next timer whenever nothing else can run.
"""

from __future__ import annotations

from datetime import timedelta


class Clock:
    """A runtime's offset from the database's clock (it only moves forward)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        if delta < timedelta(0):
            raise ValueError("the clock only moves forward")
        self.offset += delta
