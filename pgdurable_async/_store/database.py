"""The one module that speaks to asyncpg: pools, transactions, error mapping, retries.

Driver errors become :class:`DatabaseError`; transient ones (connection loss,
serialization failures, deadlocks, failover) are retried with tenacity here and
nowhere else.
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
    if _session_lost(exc):
        text = f"PostgreSQL ended the session: {exc}"
    elif isinstance(exc, OSError) or (transient and not isinstance(exc, asyncpg.PostgresError)):
        text = f"cannot reach PostgreSQL: {exc}"
    elif isinstance(exc, asyncpg.PostgresError):
        text = f"PostgreSQL error {getattr(exc, 'sqlstate', '?')}: {exc}"
    else:
        text = f"database error: {exc}"
    return DatabaseError(text, transient=transient, sqlstate=getattr(exc, "sqlstate", None))


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


async def connect(dsn: str, schema: str, **kwargs: Any) -> Connection:
    """One dedicated connection (the LISTEN session, migrations)."""
    with mapped_errors(), _dsn_errors(dsn):
        conn: Connection = await asyncpg.connect(
            dsn, server_settings=_settings(schema), timeout=kwargs.pop("timeout", 10), **kwargs
        )
        await _setup_connection(conn)
        return conn


def _settings(schema: str) -> dict[str, str]:
    return {"search_path": schema, "application_name": "pgdurable_async"}


class Database:
    """A connection pool bound to one schema, with retrying transactions."""

    def __init__(self, dsn: str, *, schema: str = "pgdurable", min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool[Any] | None = None
        self._opening = asyncio.Lock()  # concurrent first calls must not each create a pool
        self.retry_for = 30.0  # seconds a transient fault is retried before it surfaces

    def channel(self, kind: str) -> str:
        """The NOTIFY channel of ``kind`` (orch, work, timer, done) for this schema."""
        return f"{self.schema}_{kind}"

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._opening:
            if self._pool is not None:
                return
            with mapped_errors(), _dsn_errors(self.dsn):
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    server_settings=_settings(self.schema),
                    init=_setup_connection,
                    reset=_keep_session,
                    timeout=10,
                )

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
        return await connect(self.dsn, self.schema)

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
        when ``work`` runs user SQL that might change settings.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.retry_for if retry_for is None else retry_for),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with self.acquire() as conn:
                    with mapped_errors():
                        try:
                            if not transaction:
                                return await work(conn)
                            async with conn.transaction():
                                return await work(conn)
                        finally:
                            if reset_session and not conn.is_closed():
                                await conn.reset()
        raise AssertionError("unreachable")  # pragma: no cover
