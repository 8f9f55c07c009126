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

Behind a transaction-pooling pooler a LISTEN lands on whichever server session ran
it, and that session serves other clients next: notifications never reach us.
:meth:`Listener.self_test` (``wake="auto"``) finds that out by experiment before the
session is used: the session LISTENs on a fresh channel, a NOTIFY on it goes out
through the pool, and it must arrive within a fraction of a second.  A session that
passes becomes the LISTEN session (it is not opened twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from .._base.errors import ConfigurationError, DatabaseError
from .database import Connection, Database, is_transient, retrying
from .sql_loader import q

log = logging.getLogger("pgdurable_async.listener")

Handler = Callable[[str], None]  # called with the NOTIFY payload
Hook = Callable[[Connection], Awaitable[None]]

WAKE_MODES = ("auto", "listen", "poll")
PROBE_SECONDS = 0.5  # how long wake="auto" waits for its own NOTIFY (direct PostgreSQL: ~1 ms)
SLOW_PROBE_SECONDS = 10.0  # how much longer, when the LISTEN session is provably a backend of its own


def pooled_for(wake: str) -> bool | None:
    """The :class:`Database` ``pooled`` setting for a wake mode (None: find out at open)."""
    if wake not in WAKE_MODES:
        raise ConfigurationError(f"wake must be one of {', '.join(map(repr, WAKE_MODES))}, not {wake!r}")
    return {"listen": False, "poll": True, "auto": None}[wake]


async def detect_wake(listener: Listener, *, poll_interval: float, level: int = logging.WARNING) -> str:
    """``wake="auto"``: "listen" if a LISTEN session hears its own NOTIFY, else "poll" (logged once).

    On "listen" the tested session stays open as ``listener``'s session.  On "poll" the
    database is reopened for a transaction pooler if it was not configured for one.
    """
    db = listener.db
    heard, own_path = await listener.self_test(PROBE_SECONDS)
    if not own_path and not db.pooled:  # a pooler took our startup search_path and dropped it
        await db.reopen(pooled=True)
    if heard:
        log.debug("wake='auto': LISTEN works (%s); no polling", "through a pooler" if db.pooled else "direct")
        return "listen"
    if not db.pooled:  # a pooler that passed our startup parameters on: assume it keeps no session state
        await db.reopen(pooled=True)
    log.log(level, "wake='auto': a NOTIFY sent at start did not reach this LISTEN session within %g s"
            " (a transaction-pooling connection pooler such as PgBouncer?): polling every %g s instead"
            " (pass wake='poll', or worker --wake poll, to skip this check)", PROBE_SECONDS, poll_interval)
    return "poll"


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

    async def _connect(self, conn: Connection | None = None) -> Connection:
        """Subscribe ``conn`` (a new connection by default) and make it the session."""
        conn = await self.db.connect() if conn is None else conn
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

    async def self_test(self, timeout: float) -> tuple[bool, bool]:
        """Whether a NOTIFY sent through the pool reaches a LISTEN session within ``timeout`` s,
        and whether that pool session had our ``search_path`` (a pooler may drop it unasked).

        When it arrived, the tested connection becomes the (subscribed) session; when it
        did not, nothing stays open.
        """
        async with self._connecting:
            if self.connected:
                return True, True
            await self.close()
            await self.db.open()
            conn = await self.db.connect()
            arrived = anyio.Event()
            channel = f"{self.db.schema}_probe_{uuid.uuid4().hex[:12]}"

            def heard(*_: Any) -> None:
                arrived.set()

            try:
                await conn.add_listener(channel, heard)
                seen_path = await self.db.run(lambda c: _send_probe(c, channel), retry_for=2)
                with anyio.move_on_after(timeout):
                    await arrived.wait()
                if not arrived.is_set() and await self.db.run(lambda c: _is_direct(c, conn, channel), retry_for=2):
                    with anyio.move_on_after(SLOW_PROBE_SECONDS):  # a real session: PostgreSQL is just slow
                        await arrived.wait()
                if arrived.is_set():  # it stays subscribed to the probe channel too: nobody sends there
                    await self._connect(conn)
            except BaseException:
                conn.terminate()
                raise
            if not arrived.is_set():
                with anyio.CancelScope(shield=True):
                    await conn.close(timeout=2)
            return arrived.is_set(), seen_path == self.db.search_path

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
            try:  # the first time, a session that passed self_test() may be open already
                conn = self._conn if self.connected and self._conn is not None else await self._connect()
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


async def _send_probe(conn: Connection, channel: str) -> str:
    """NOTIFY ``channel`` (as this session commits); returns the session's ``search_path``."""
    return str(await conn.fetchval(q("notify_probe"), channel))


async def _is_direct(conn: Connection, session: Connection, channel: str) -> bool:
    """Whether ``session`` reports the pid of the backend that ran its LISTEN on ``channel``.

    A direct connection does; PgBouncer reports a random pid of its own.
    """
    return bool(await conn.fetchval(q("session_is_direct"), session.get_server_pid(), channel))


def _deliver(handler: Handler) -> Any:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        handler(payload)

    return on_notify
