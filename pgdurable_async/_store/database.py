"""The one module that speaks to asyncpg: pools, transactions, error mapping, retries.

Driver errors become :class:`DatabaseError`; transient ones (connection loss,
serialization failures, deadlocks, failover) are retried with tenacity here and
nowhere else.

Behind a transaction-pooling connection pooler (PgBouncer ``pool_mode=transaction``)
consecutive transactions of one client connection run on different server sessions,
so a :class:`Database` with ``pooled=True`` keeps no state in the session: no
prepared-statement cache (``statement_cache_size=0``), no ``search_path`` startup
parameter (PgBouncer refuses it), and instead ``search_path`` set with
``set_config(..., true)`` at the start of every transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from .._base.errors import ConfigurationError, DatabaseError, PgDurableError
from .._base.serde import decode, dumps
from .sql_loader import q

T = TypeVar("T")
#: The driver connection: only the store calls methods on it; elsewhere it is passed through.
Connection: TypeAlias = "asyncpg.Connection[Any]"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53300",  # too_many_connections
    "08000", "08003", "08006", "08001", "08004",  # connection exceptions
    "25006",  # read_only_sql_transaction (failover to a standby)
}
_PROTOCOL_VIOLATION = "08P01"  # also what PgBouncer answers to a startup parameter it does not support


def check_schema_name(schema: str) -> str:
    """Validate a schema name (it is used as an identifier and channel prefix)."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(f"invalid schema name {schema!r}: use lowercase letters, digits and _")
    return schema


def _session_lost(exc: BaseException) -> bool:
    """asyncpg's error for a connection whose session the server ended while it sat idle.

    When PostgreSQL ends a session (crash, restart, ``pg_terminate_backend``, failover) it sends
    a FATAL error, then closes the socket.  An idle connection consumes the error and is left
    in an error state, yet looks open until the close arrives; a statement started on it in
    that moment fails with ``InternalClientError("cannot switch to state N; another operation
    (2) is in progress")`` (asyncpg issues #784, #1069) before anything is sent.  A fresh
    connection is all it takes.
    """
    return isinstance(exc, asyncpg.exceptions.InternalClientError) or isinstance(
        exc.__cause__, asyncpg.exceptions.InternalClientError)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: the same operation may succeed in a moment."""
    if isinstance(exc, DatabaseError):
        return bool(getattr(exc, "transient", False))
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False  # a malformed DSN does not get better by waiting
    if _session_lost(exc):
        # The driver's own state, not the statement, is at fault: none of the hosts of a
        # multi-host DSN accepts writes yet (TargetServerAttributeNotMatched, mid-failover),
        # or a session's protocol state was wrecked by a FATAL that a dying server sent to
        # an idle pooled connection before its EOF arrived ("cannot switch to state ...").
        # A fresh connection, in a moment, is the cure.
        return True
    if isinstance(exc, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "sqlstate", None) in _TRANSIENT_SQLSTATES
    return isinstance(exc, TimeoutError) and not isinstance(exc, PgDurableError)


def translate(exc: BaseException) -> DatabaseError:
    """A driver error as a :class:`DatabaseError` with one readable line."""
    if isinstance(exc, DatabaseError):
        return exc
    transient = is_transient(exc)
    if isinstance(exc, asyncpg.exceptions.TargetServerAttributeNotMatched):
        text = f"no host accepts this connection yet: {exc}"
    elif _session_lost(exc):
        text = f"PostgreSQL ended the session: {exc}"
    elif isinstance(exc, OSError) or (transient and not isinstance(exc, asyncpg.PostgresError)):
        text = f"cannot reach PostgreSQL: {exc}"
    elif _refused_startup_parameter(exc):
        text = (f"PostgreSQL error {_PROTOCOL_VIOLATION}: {exc} (a connection pooler such as PgBouncer?"
                " use wake='auto' or wake='poll')")
    elif isinstance(exc, asyncpg.PostgresError):
        text = f"PostgreSQL error {getattr(exc, 'sqlstate', '?')}: {exc}"
    else:
        text = f"database error: {exc}"
    return DatabaseError(text, transient=transient, sqlstate=getattr(exc, "sqlstate", None))


def _refused_startup_parameter(exc: BaseException) -> bool:
    """PgBouncer's answer to ``search_path`` in the startup packet (it forwards only a few parameters)."""
    return (isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) == _PROTOCOL_VIOLATION
            and "startup parameter" in str(exc))


@contextlib.contextmanager
def mapped_errors() -> Any:
    """Turn driver exceptions raised inside the block into :class:`DatabaseError`."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, OSError) as exc:
        raise translate(exc) from exc
    except TimeoutError as exc:
        if isinstance(exc, PgDurableError):
            raise
        raise translate(exc) from exc


def retrying(retry_for: float) -> AsyncRetrying:
    """Retry transient faults, backing off from 50 ms to 2 s, for ``retry_for`` seconds."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        stop=stop_after_delay(retry_for),
        reraise=True,
    )


@contextlib.contextmanager
def _dsn_errors(dsn: str) -> Any:
    """asyncpg parses the DSN when connecting: a malformed one cannot reach any database."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        raise DatabaseError(text if text.startswith("invalid DSN") else f"invalid DSN: {text}",
                            transient=False) from None


async def _keep_session(conn: Connection) -> None:
    """Pool release hook: our own queries leave no session state, so skip asyncpg's
    reset round trip (``Database.run(reset_session=True)`` resets after user SQL)."""


async def _setup_connection(conn: Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(typ, schema="pg_catalog", encoder=dumps, decoder=decode)


async def connect(dsn: str, schema: str, *, pooled: bool = False, **kwargs: Any) -> Connection:
    """One dedicated connection (the LISTEN session); ``pooled``: see :class:`Database`."""
    with mapped_errors(), _dsn_errors(dsn):
        conn: Connection = await asyncpg.connect(
            dsn, server_settings=_settings(schema, pooled), timeout=kwargs.pop("timeout", 10),
            **_driver_options(pooled), **kwargs
        )
        await _setup_connection(conn)
        return conn


def search_path(schema: str) -> str:
    """Our sessions' search_path: pg_temp goes last, so no temporary relation can stand in for ours."""
    return f"{schema}, pg_temp"


def _settings(schema: str, pooled: bool) -> dict[str, str]:
    if pooled:  # PgBouncer forwards application_name (and a few others), refuses search_path
        return {"application_name": "pgdurable_async"}
    return {"search_path": search_path(schema), "application_name": "pgdurable_async"}


def _driver_options(pooled: bool) -> dict[str, Any]:
    # Named prepared statements live in one server session: behind a transaction pooler the
    # next transaction may run in another one.  With the cache off asyncpg uses unnamed ones.
    return {"statement_cache_size": 0} if pooled else {}


class Database:
    """A connection pool bound to one schema, with retrying transactions.

    ``pooled``: False for a direct connection (or a session pooler that forwards
    ``search_path``); True behind a transaction pooler (see the module docstring);
    None to find out at :meth:`open`: a refused ``search_path`` startup parameter
    (PgBouncer) makes it True, anything else False.
    """

    def __init__(
        self, dsn: str, *, schema: str = "pgdurable", min_size: int = 1, max_size: int = 10,
        pooled: bool | None = False,
    ) -> None:
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.pooled = pooled
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool[Any] | None = None
        self._opening = asyncio.Lock()  # concurrent first calls must not each create a pool
        self.retry_for = 30.0  # seconds a transient fault is retried before it surfaces

    @property
    def search_path(self) -> str:
        return search_path(self.schema)

    def channel(self, kind: str) -> str:
        """The NOTIFY channel of ``kind`` (orch, work, timer, done) for this schema."""
        return f"{self.schema}_{kind}"

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._opening:
            if self._pool is not None:
                return
            if self.pooled is None:
                try:
                    self._pool = await self._create_pool(pooled=False)
                    self.pooled = False
                except DatabaseError as exc:
                    if exc.__cause__ is None or not _refused_startup_parameter(exc.__cause__):
                        raise
                    self.pooled = True
            if self._pool is None:
                self._pool = await self._create_pool(pooled=bool(self.pooled))

    async def _create_pool(self, *, pooled: bool) -> asyncpg.Pool[Any]:
        with mapped_errors(), _dsn_errors(self.dsn):
            pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=_settings(self.schema, pooled),
                init=_setup_connection,
                reset=_keep_session,
                timeout=10,
                **_driver_options(pooled),
            )
            return pool

    async def reopen(self, *, pooled: bool) -> None:
        """Close the pool and open it again for a direct (``pooled=False``) or pooled connection."""
        await self.close()
        self.pooled = pooled
        await self.open()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.close()

    @property
    def pool(self) -> asyncpg.Pool[Any]:
        if self._pool is None:
            raise PgDurableError("database pool is not open")
        return self._pool

    async def connect(self) -> Connection:
        """A dedicated connection configured like the pool (open the pool first when ``pooled`` is None)."""
        return await connect(self.dsn, self.schema, pooled=bool(self.pooled))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        await self.open()
        with mapped_errors():
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except BaseException as exc:
                    if _session_lost(exc):
                        conn.terminate()  # never hand this connection out again: the pool opens a new one
                    raise

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        transaction: bool = True,
        retry_for: float | None = None,
        reset_session: bool = False,
    ) -> T:
        """Run ``work(conn)`` (in one transaction), retrying transient faults.

        ``reset_session`` resets the connection's session state afterwards: use it
        when ``work`` runs user SQL that might change settings.  (Not when ``pooled``:
        the session that ran it is someone else's by then, and a reset would reach
        another one.)
        """
        async for attempt in retrying(self.retry_for if retry_for is None else retry_for):
            with attempt:
                async with self.acquire() as conn:
                    try:
                        return await self.run_on(conn, work, transaction=transaction)
                    finally:
                        if reset_session and not self.pooled and not conn.is_closed():
                            with mapped_errors():
                                await conn.reset()
        raise AssertionError("unreachable")  # pragma: no cover

    async def run_on(self, conn: Connection, work: Callable[[Connection], Awaitable[T]], *,
                     transaction: bool = True) -> T:
        """Run ``work(conn)`` on a connection of this database (once, no retries).

        When ``pooled``, it always runs in a transaction that first sets ``search_path``:
        outside a transaction, each statement may reach a different server session.
        """
        with mapped_errors():
            if self.pooled:
                async with conn.transaction():
                    await conn.execute(q("set_search_path"), self.search_path)
                    return await work(conn)
            if not transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)
