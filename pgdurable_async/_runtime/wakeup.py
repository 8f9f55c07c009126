"""A level-triggered wake-up signal for the runtime's loops (no lost wake-ups)."""

from __future__ import annotations

import anyio


class Wakeup:
    """Set by NOTIFY callbacks and local events; awaited by one or more loops.

    A loop reads :attr:`generation` *before* it looks for work and passes it to
    :meth:`wait`, which returns at once if anything was signalled since; so a
    signal that arrives while the loop is busy is never lost.  :meth:`set` is
    called once per finished activity: it only makes an event when a loop waits.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._event: anyio.Event | None = None  # made by the first waiter, replaced by each set

    def set(self) -> None:
        self.generation += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, seen: int, timeout: float | None = None) -> bool:
        """Wait for a signal newer than ``seen``; False if ``timeout`` passed first."""
        if self.generation != seen:
            return True
        if timeout is not None and timeout <= 0:
            return False
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        if timeout is None:  # no cancel scope to make
            await event.wait()
            return True
        with anyio.move_on_after(timeout):
            await event.wait()
            return True
        return False
