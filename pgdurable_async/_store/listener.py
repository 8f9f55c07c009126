"""The one LISTEN session: a dedicated connection that subscribes, notices its loss, reconnects.

NOTIFY is a hint, tables are the truth: after every (re)connection the owner
sweeps (``on_connect``), so a notification missed while disconnected costs
latency, never work.  Two ways to use it:

- :meth:`Listener.serve` runs until cancelled: connect, subscribe, ``on_connect``,
  then every ``interval`` seconds ``on_interval`` (a keep-alive); reconnect with
  back-off on any failure.  The runtime uses this.
- :meth:`Listener.ensure` connects lazily, without a background task, and says
  whether it (re)connected, so the caller re-checks what it waits for; ``on_lost``
  tells such a caller at once that the session died (the client wakes its waiters,
  which reconnect and re-check).  The client and the benchmark use this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from .._base.errors import DatabaseError
from .database import Connection, Database, is_transient, retrying

log = logging.getLogger("pgdurable_async.listener")

Handler = Callable[[str], None]  # called with the NOTIFY payload
Hook = Callable[[Connection], Awaitable[None]]


class Listener:
    """A LISTEN session on ``channels`` (channel name → handler of the payload)."""

    def __init__(self, db: Database, channels: Mapping[str, Handler], *,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.db = db
        self.channels = dict(channels)
        self.on_lost = on_lost  # called when an open session dies (not when we close it)
        self.reconnects = 0
        self._conn: Connection | None = None
        self._lost: anyio.Event | None = None  # set when the session's connection dies
        self._connecting = asyncio.Lock()  # concurrent first waits must not each open a session

    @property
    def connected(self) -> bool:
        lost = self._lost
        return self._conn is not None and not self._conn.is_closed() and lost is not None and not lost.is_set()

    async def _connect(self) -> Connection:
        conn = await self.db.connect()
        lost = anyio.Event()

        def on_terminated(*_: object) -> None:
            lost.set()
            if self._conn is conn and self.on_lost is not None:  # close() forgets the session first
                self.on_lost()

        try:
            conn.add_termination_listener(on_terminated)
            for channel, handler in self.channels.items():
                await conn.add_listener(channel, _deliver(handler))
        except BaseException:
            conn.terminate()
            raise
        self._conn, self._lost = conn, lost
        return conn

    async def ensure(self) -> bool:
        """Connect and subscribe unless connected; True when a new session was opened now.

        Transient faults (the server restarting, a failover under way) are retried as
        :meth:`Database.run` retries them.
        """
        async with self._connecting:
            if self.connected:
                return False
            await self.close()
            async for attempt in retrying(self.db.retry_for):
                with attempt:
                    await self._connect()
            return True

    async def serve(
        self,
        *,
        on_connect: Hook | None = None,
        interval: float = 30.0,
        on_interval: Hook | None = None,
        ready: anyio.Event | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """Keep the session up until cancelled (or ``stopping()``); sets ``ready`` once first connected."""
        delay = 0.1
        while not stopping():
            try:
                conn = await self._connect()
                if on_connect is not None:
                    await on_connect(conn)
                if ready is not None:
                    ready.set()
                delay = 0.1
                lost = self._lost
                assert lost is not None
                while not lost.is_set():
                    with anyio.move_on_after(interval):
                        await lost.wait()
                    if not lost.is_set() and on_interval is not None:
                        await on_interval(conn)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect whatever went wrong
                if not (is_transient(exc) or isinstance(exc, DatabaseError)):
                    log.exception("LISTEN session failed")
                log.warning("LISTEN session lost (%s); reconnecting", exc)
            await self.close()
            if stopping():
                return
            self.reconnects += 1
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """Close the session (a dead one is just dropped)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                with anyio.CancelScope(shield=True):
                    await conn.close(timeout=2)
            except Exception:  # noqa: BLE001 - closing a broken connection
                with contextlib.suppress(Exception):
                    conn.terminate()


def _deliver(handler: Handler) -> Any:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        handler(payload)

    return on_notify
