"""The runtime's NOTIFYs after commit: coalesced per channel, sent from one loop.

Turns, acks and the runtime's client starts run in transactions whose queue inserts do not
NOTIFY (``notify_store``); after each commit they :meth:`Notifier.request` the channels their
inserts would have notified, and this loop sends them, several requests in one statement.
"""

from __future__ import annotations

import logging

from .._base.errors import DatabaseError
from .._store import Database, notify_store
from .wakeup import Wakeup

log = logging.getLogger("pgdurable_async.runtime")


class Notifier:
    """Sends requested NOTIFYs, each channel once per round, after the commits that asked for them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: set[str] = set()
        self._wakeup = Wakeup()
        self.sent = 0

    def request(self, channel: str) -> None:
        """NOTIFY ``channel`` soon (call after the commit of the transaction it announces)."""
        self._pending.add(channel)
        self._wakeup.set()

    async def flush(self) -> None:
        """Send what is pending now (a failure is logged: the next sweep catches up)."""
        if not self._pending:
            return
        channels, self._pending = sorted(self._pending), set()
        try:
            await self.db.run(lambda conn: notify_store.notify(conn, channels=channels), transaction=False,
                              retry_for=2)
            self.sent += 1
        except DatabaseError as exc:
            log.warning("wake-ups on %s were not sent (%s): the next sweep catches up", ", ".join(channels), exc)

    async def run(self) -> None:
        """Until cancelled: send each round of requests as it comes."""
        while True:
            seen = self._wakeup.generation
            await self.flush()
            await self._wakeup.wait(seen)
