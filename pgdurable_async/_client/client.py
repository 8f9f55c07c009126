"""The client: start, query, signal and wait for instances; fork, terminate and purge them."""

from __future__ import annotations

import builtins
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio

from .._app import App
from .._base import events as ev
from .._base import tracing
from .._base.errors import (
    ConfigurationError,
    InstanceCancelled,
    InstanceFailed,
    InstanceNotFound,
    InvalidArgument,
    UnknownNameError,
)
from .._base.errors import TimeoutError as DurableTimeout
from .._base.names import check_id, is_reserved, name_of
from .._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, encode
from .._base.types import TERMINAL_STATUSES, HistoryEvent, InstanceState, Status
from .._store import Database, instance_store, turn_store
from .._store.listener import Listener, detect_wake, pooled_for
from .._store.migrations import require_current
from .schedules import ScheduleMethods

_RECHECK_SECONDS = 30.0  # safety re-check while waiting, in case a NOTIFY was missed
_PURGE_BATCH = 100  # finished instances (with their descendants) per purge transaction


class InstanceHandle:
    """A reference to one instance, returned by :meth:`Client.start`."""

    def __init__(self, client: Client, instance_id: str) -> None:
        self.client = client
        self.instance_id = instance_id

    def __repr__(self) -> str:
        return f"InstanceHandle({self.instance_id!r})"

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the output (see :meth:`Client.wait`)."""
        return await self.client.wait(self.instance_id, timeout=timeout)

    async def status(self) -> InstanceState:
        return await self.client.status(self.instance_id)

    async def history(self) -> list[HistoryEvent]:
        return await self.client.history(self.instance_id)

    async def raise_event(self, name: str, data: Any = None, *, idempotency_key: str | None = None) -> None:
        await self.client.raise_event(self.instance_id, name, data, idempotency_key=idempotency_key)

    async def cancel(self, reason: str | None = None) -> None:
        await self.client.cancel(self.instance_id, reason)

    async def terminate(self, reason: str | None = None) -> None:
        await self.client.terminate(self.instance_id, reason)

    async def get_value(self, key: str, default: Any = None) -> Any:
        return await self.client.get_value(self.instance_id, key, default)

    async def wait_value(self, key: str, timeout: float | None = None) -> Any:
        return await self.client.wait_value(self.instance_id, key, timeout=timeout)


class FiredInstance(str, InstanceHandle):
    """What ``trigger_schedule`` returns: the id of the instance it started (a ``str``), which is
    also that instance's :class:`InstanceHandle`."""

    def __new__(cls, client: Client, instance_id: str) -> FiredInstance:
        return str.__new__(cls, instance_id)

    def __init__(self, client: Client, instance_id: str) -> None:
        InstanceHandle.__init__(self, client, instance_id)


class Client(ScheduleMethods):
    """Starts and manages instances and schedules.  Connects lazily on the first call.

    ``Client(dsn)`` works alone; ``Runtime.client`` shares the runtime's pool.
    ``wake``: how :meth:`wait` learns that an instance finished: "listen" (a NOTIFY),
    "poll" (its status, every ``poll_interval`` seconds; behind a transaction pooler)
    or "auto" (test LISTEN at the first wait, fall back to polling).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "pgdurable",
        app: App | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        wake: str = "auto",
        poll_interval: float = 0.5,
        _db: Database | None = None,
        _on_sent: Callable[[], None] | None = None,
        _notify: Callable[[str], None] | None = None,
    ) -> None:
        pooled = pooled_for(wake)
        if not poll_interval > 0:
            raise ConfigurationError(f"poll_interval must be > 0 seconds, not {poll_interval!r}")
        self._owns_db = _db is None  # a runtime's client shares the runtime's pool
        if _db is None:
            if not dsn:
                raise ConfigurationError("Client needs a DSN (postgresql://user@host:port/dbname)")
            _db = Database(dsn, schema=schema, min_size=1, max_size=5, pooled=pooled)
        self.db = _db
        self.app = app
        self.max_payload_bytes = max_payload_bytes
        self.wake = wake  # "auto" until the first wait() has decided
        self.poll_interval = poll_interval
        self._on_sent = _on_sent
        self._notify = _notify  # a runtime's client: its starts NOTIFY after commit, through the runtime
        self._checked = False
        self._registered: set[str] = set()
        self._listener = Listener(self.db, {
            self.db.channel("done"): lambda instance_id: self._wake("done", instance_id),
            self.db.channel("value"): lambda instance_id: self._wake("value", instance_id),
        }, on_lost=self._wake_all)
        self._waiters: dict[tuple[str, str], set[anyio.Event]] = {}  # (channel kind, instance id) -> waits
        self._deciding = anyio.Lock()  # concurrent first waits run one start-up test

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's connections (a runtime's client leaves the pool to it)."""
        await self._listener.close()
        if self._owns_db:
            await self.db.close()

    async def _ready(self) -> Database:
        if not self._checked:
            await self.db.run(lambda conn: require_current(conn, self.db.schema), transaction=False)
            self._checked = True
        return self.db

    async def ready_db(self) -> Database:
        """The client's pool, once the schema is known to be current (for read-only tools: the dashboard)."""
        return await self._ready()

    # -- starting ----------------------------------------------------------------
    async def start(self, orchestration: Any, input: Any = None, *, instance_id: str | None = None) -> InstanceHandle:
        """Start an orchestration (function or registered name); raises on a taken id."""
        name = name_of(orchestration, kind="orchestration")
        if is_reserved(name):
            raise InvalidArgument(f"{name!r} is a built-in orchestration; start graphs with dsl.start or df.start")
        generated = instance_id is None
        instance_id = uuid.uuid4().hex if instance_id is None else check_id(instance_id)
        body = encode(input, what=f"input of {name!r}", limit=self.max_payload_bytes)
        db = await self._ready()
        await self._check_registered(name)

        # One statement, atomic on its own.  A generated id can only collide with this call's
        # own earlier attempt: it committed, then the connection dropped and db.run retried.
        deferred = self._notify is not None
        with tracing.span(tracing.START, {tracing.INSTANCE_ID: instance_id, tracing.NAME: name}):
            carrier = tracing.carrier()  # this span's: the instance's turns and activities join its trace
            await db.run(
                lambda conn: instance_store.start(conn, instance_id=instance_id, name=name, input_json=body,
                                                  fresh_id=generated, trace_context=carrier, deferred=deferred),
                transaction=False,
            )
        if self._notify is not None:
            self._notify(db.channel("orch"))
        self._sent()
        return InstanceHandle(self, instance_id)

    def _sent(self) -> None:
        if self._on_sent is not None:
            self._on_sent()

    async def _check_registered(self, name: str) -> None:
        if name in self._registered or (self.app is not None and name in self.app.orchestrations):
            return
        found = await self.db.run(
            lambda conn: turn_store.known_names(conn, kind="orchestration", names=[name]), transaction=False
        )
        if found:
            self._registered.add(name)  # the registry only grows: a name found stays found
        else:
            raise UnknownNameError(
                f"no orchestration named {name!r} is registered by any runtime of this database",
                kind="orchestration",
                name=name,
            )

    async def start_graph(
        self, graph: dict[str, Any], *, label: str | None = None, vars: dict[str, str] | None = None,
        instance_id: str | None = None, search_path: str | None = None,
    ) -> InstanceHandle:
        """Submit graph JSON as the client's own role (``df._submit``): its SQL runs as that role."""
        if instance_id is not None:
            check_id(instance_id)
        body = encode(graph, what="graph", limit=self.max_payload_bytes)
        db = await self._ready()
        submitted = await db.run(
            lambda conn: instance_store.submit_graph(
                conn, graph_json=body, label=label, search_path=search_path,
                vars_json=None if vars is None else encode(vars, what="graph variables"), instance_id=instance_id,
            ),
            transaction=False,
        )
        return InstanceHandle(self, submitted)

    def get_handle(self, instance_id: str) -> InstanceHandle:
        """A handle for an existing instance id."""
        return InstanceHandle(self, check_id(instance_id))

    def _fired(self, instance_id: str) -> FiredInstance:
        return FiredInstance(self, instance_id)

    # -- querying ---------------------------------------------------------------------
    async def status(self, instance_id: str) -> InstanceState:
        """The current state of an instance, with what it waits on; raises :class:`InstanceNotFound`."""
        return await self._status(instance_id, waits=True)

    async def _status(self, instance_id: str, *, waits: bool) -> InstanceState:
        check_id(instance_id)
        db = await self._ready()
        state = await db.run(lambda conn: instance_store.get_instance(conn, instance_id=instance_id, waits=waits),
                             transaction=False)
        if state is None:
            raise InstanceNotFound(instance_id)
        return state

    async def list(
        self, status: Status | str | None = None, name: Any = None, limit: int = 100
    ) -> builtins.list[InstanceState]:
        """Instances, newest first, optionally filtered by status and orchestration name."""
        try:
            status_value = Status(status).value if status is not None else None
        except ValueError:
            raise InvalidArgument(f"unknown status {status!r}; one of {', '.join(Status)}") from None
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidArgument(f"limit must be a non-negative integer, not {limit!r}")
        name_value = name_of(name, kind="orchestration") if name is not None else None
        db = await self._ready()
        return await db.run(
            lambda conn: instance_store.list_instances(conn, status=status_value, name=name_value, limit=int(limit)),
            transaction=False,
        )

    async def history(self, instance_id: str, *, execution_id: int | None = None) -> builtins.list[HistoryEvent]:
        """The events of the current (or given) execution, in ``seq`` order."""
        state = await self._status(instance_id, waits=False)
        return await self.db.run(
            lambda conn: instance_store.get_history(conn, instance_id=state.instance_id, execution_id=execution_id),
            transaction=False,
        )

    # -- signalling -------------------------------------------------------------------
    async def raise_event(
        self, instance_id: str, name: str, data: Any = None, *, idempotency_key: str | None = None
    ) -> None:
        """Deliver an event to ``ctx.wait_for_event(name)``; a finished instance ignores it.

        Each call is delivered at most once, even when a dropped connection makes the
        client retry it.  Calls that pass the same ``idempotency_key`` for one instance
        deliver the event once (for callers that retry on their own).
        """
        check_id(name, "event name")
        if idempotency_key is None:
            idempotency_key = uuid.uuid4().hex
        check_id(idempotency_key, "idempotency key")
        event = {"name": name, "data": data, "delivery_key": idempotency_key}
        body = encode(event, what=f"data of event {name!r}", limit=self.max_payload_bytes)
        await self._send(instance_id, ev.EVENT_RECEIVED, body)

    async def cancel(self, instance_id: str, reason: str | None = None) -> None:
        """Ask the instance to stop: ``pgd.Cancelled`` is raised at its current await.

        The turn that records the cancel passes it on to the instance's unfinished children.
        """
        body = encode({"reason": reason}, what="cancel reason", limit=self.max_payload_bytes)
        await self._send(instance_id, ev.CANCEL_REQUESTED, body)

    async def _send(self, instance_id: str, kind: str, body: str) -> None:
        check_id(instance_id)
        db = await self._ready()

        await db.run(lambda conn: instance_store.send(conn, instance_id=instance_id, kind=kind, payload_json=body))
        self._sent()

    async def terminate(self, instance_id: str, reason: str | None = None) -> None:
        """Stop the instance and its unfinished descendants now, running no more of their code."""
        check_id(instance_id)
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgument(f"reason must be a string, not {type(reason).__name__}")
        encode(reason, what="terminate reason", limit=self.max_payload_bytes)  # NUL, size
        db = await self._ready()

        await db.run(lambda conn: instance_store.terminate(conn, instance_id=instance_id, reason=reason))

    async def purge(self, instance_id: str) -> None:
        """Delete a finished instance, its finished descendants and their history."""
        check_id(instance_id)
        db = await self._ready()

        await db.run(lambda conn: instance_store.purge(conn, instance_id=instance_id))

    async def purge_finished(self, older_than: timedelta, *, status: Status | str | None = None) -> int:
        """Purge finished instances not updated for ``older_than``, each with its finished descendants.

        Works in small transactions (rows a turn holds are skipped); returns how many were purged.
        """
        if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
            raise InvalidArgument("older_than must be a positive timedelta")
        try:
            status_value = None if status is None else Status(status).value
        except ValueError:
            status_value = str(status)
        if status_value is not None and status_value not in TERMINAL_STATUSES:
            raise InvalidArgument(f"status must be a finished status ({', '.join(sorted(TERMINAL_STATUSES))}), "
                                  f"not {status!r}")
        db = await self._ready()
        total = 0
        while True:
            purged = await db.run(lambda conn: instance_store.purge_finished(
                conn, older_than=older_than, status=status_value, limit=_PURGE_BATCH))
            if not purged:
                return total
            total += purged

    # -- forking ----------------------------------------------------------------------
    async def fork(
        self, instance_id: str, *, at_seq: int | None = None, new_instance_id: str | None = None
    ) -> InstanceHandle:
        """Start a new instance of the same orchestration and input whose history begins as
        ``instance_id``'s events with ``seq <= at_seq``, then a ``forked_from`` event.

        Default ``at_seq``: every event before the first ``activity_failed``,
        ``sub_orchestration_failed`` or ``orchestration_failed`` (with none, before a
        cancel request or the end).  The new instance replays the copy with today's code
        (``NonDeterminismError`` if it disagrees) and runs on; completed activities are not
        repeated, and what the copy left open is issued again.
        """
        check_id(instance_id)
        if at_seq is not None and (not isinstance(at_seq, int) or isinstance(at_seq, bool) or at_seq < 1):
            raise InvalidArgument(f"at_seq must be a positive integer, not {at_seq!r}")
        generated = new_instance_id is None
        new_id = uuid.uuid4().hex if new_instance_id is None else check_id(new_instance_id, "new_instance_id")
        db = await self._ready()
        await db.run(
            lambda conn: instance_store.fork(conn, instance_id=instance_id, at_seq=at_seq, new_instance_id=new_id,
                                             fresh_id=generated),
            transaction=False,
        )
        return InstanceHandle(self, new_id)

    # -- durable values ---------------------------------------------------------------
    async def get_value(self, instance_id: str, key: str, default: Any = None) -> Any:
        """The value the instance last set for ``key`` (``ctx.set_value``), or ``default``.

        Values stay readable after the instance finishes; raises :class:`InstanceNotFound`.
        """
        found, value = await self._read_value(instance_id, key)
        return value if found else default

    async def wait_value(self, instance_id: str, key: str, timeout: float | None = None) -> Any:
        """Wait until the instance has set ``key`` and return its value (at once if it already has).

        Woken by NOTIFY, no polling; raises :class:`pgd.TimeoutError` after ``timeout`` seconds.
        """
        return await self._wait_for("value", instance_id, timeout, lambda: self._read_value(instance_id, key),
                                    f"instance {instance_id!r} did not set {key!r} within {timeout} s")

    async def _read_value(self, instance_id: str, key: str) -> tuple[bool, Any]:
        check_id(instance_id)
        check_id(key, "value key")
        db = await self._ready()
        return await db.run(lambda conn: instance_store.get_value(conn, instance_id=instance_id, key=key),
                            transaction=False)

    # -- waiting ----------------------------------------------------------------------
    async def wait(self, instance_id: str, timeout: float | None = None) -> Any:
        """Wait until the instance finishes and return its output.

        Raises :class:`InstanceFailed`, :class:`Cancelled` or :class:`pgd.TimeoutError`.
        Woken by NOTIFY, no polling; with ``wake="poll"`` it reads the status every
        ``poll_interval`` seconds instead.
        """

        async def finished() -> tuple[bool, Any]:
            state = await self._status(instance_id, waits=False)
            return (True, _outcome(state)) if state.status.is_terminal else (False, None)

        return await self._wait_for("done", instance_id, timeout, finished,
                                    f"instance {instance_id!r} did not finish within {timeout} s")

    async def _wait_for(
        self, kind: str, instance_id: str, timeout: float | None,
        check: Callable[[], Awaitable[tuple[bool, Any]]], late: str,
    ) -> Any:
        """Re-run ``check`` on each NOTIFY of channel ``kind`` for ``instance_id`` until it is done."""
        check_id(instance_id)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        polling = await self._ensure_listener()
        key = (kind, instance_id)
        while True:
            event = anyio.Event()
            self._waiters.setdefault(key, set()).add(event)
            try:
                done, value = await check()
                if done:
                    return value
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise DurableTimeout(late, instance_id=instance_id)
                if polling:
                    await anyio.sleep(min(remaining, self.poll_interval))
                    continue
                if self._listener.connected:  # else its NOTIFY may be lost: reconnect and re-check now
                    with anyio.move_on_after(min(remaining, _RECHECK_SECONDS)):
                        await event.wait()  # set by the NOTIFY, or when the session dies
                await self._ensure_listener()  # reconnects if the session was lost; then we re-check
            finally:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[key]

    async def _ensure_listener(self) -> bool:
        """Make sure the LISTEN session is up; True instead when waits poll (wake="poll")."""
        await self._ready()
        if self.wake == "auto":
            async with self._deciding:
                if self.wake == "auto":
                    self.wake = await detect_wake(self._listener, poll_interval=self.poll_interval,
                                                  level=logging.INFO)
        if self.wake == "poll":
            return True
        await self._listener.ensure()
        return False

    def _wake(self, kind: str, instance_id: str) -> None:
        for event in self._waiters.get((kind, instance_id), ()):
            event.set()

    def _wake_all(self) -> None:
        """The LISTEN session died: a NOTIFY may be missed, so every waiter re-checks."""
        for events in self._waiters.values():
            for event in events:
                event.set()


def _outcome(state: InstanceState) -> Any:
    if state.status is Status.COMPLETED:
        return state.output
    if state.status is Status.CANCELLED:
        reason = state.error.get("reason") if isinstance(state.error, dict) else None
        raise InstanceCancelled(
            f"instance {state.instance_id!r} was cancelled", instance_id=state.instance_id, reason=reason
        )
    raise InstanceFailed(state.instance_id, state.error)
