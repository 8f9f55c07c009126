"""Faults inside one process: database restart, dropped LISTEN session, code changed under an instance."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store.database import is_transient, mapped_errors
from tests.conftest import PgServer

app = pgd.App()


@app.activity
async def inc(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.orchestration
async def chain(ctx: pgd.OrchestrationContext, n: int) -> int:
    value = 0
    for _ in range(n):
        value = await ctx.call_activity(inc, value)
    return value


@app.orchestration
async def gated(ctx: pgd.OrchestrationContext, _: object) -> object:
    await ctx.call_activity(inc, 0)
    return await ctx.wait_for_event("go")


async def test_listen_session_killed_is_reconnected(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, sweep_interval=60) as runtime:
        assert await (await runtime.client.start(chain, 3)).result(timeout=30) == 3
        conn = await asyncpg.connect(dsn)
        try:
            killed = await conn.fetchval("SELECT count(pg_terminate_backend(backend_pid)) FROM pgdurable.workers")
            assert killed == 1
        finally:
            await conn.close()
        with anyio.fail_after(20):
            while runtime.reconnects == 0:
                await anyio.sleep(0.05)
        # Work started right after the reconnect still runs promptly (NOTIFY, not the 60 s sweep).
        assert await (await runtime.client.start(chain, 3)).result(timeout=20) == 3


async def test_survives_postgres_restart(pg_server: PgServer, dsn: str) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs a server this test suite owns")
    async with pgd.Runtime(app, dsn) as runtime:
        first = await runtime.client.start(gated, None, instance_id="before-restart")
        with anyio.fail_after(20):
            while (await runtime.client.status("before-restart")).status is not pgd.Status.RUNNING:
                await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(pg_server.cluster.restart)
        await runtime.client.raise_event("before-restart", "go", "after")
        assert await first.result(timeout=60) == "after"
        assert await (await runtime.client.start(chain, 5)).result(timeout=60) == 5
        assert runtime.reconnects >= 1


async def test_code_changed_under_running_instance_fails_with_nondeterminism(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.start(gated, None, instance_id="evolving")
        with anyio.fail_after(20):
            while "activity_completed" not in [e.kind for e in await runtime.client.history("evolving")]:
                await anyio.sleep(0.05)

    changed = pgd.App()

    @changed.activity(name="inc")
    async def inc2(ctx: pgd.ActivityContext, n: int) -> int:
        return n + 2

    @changed.activity
    async def other(ctx: pgd.ActivityContext, n: int) -> int:
        return n

    @changed.orchestration(name="gated")
    async def gated_v2(ctx: pgd.OrchestrationContext, _: object) -> object:
        await ctx.call_activity(other, 0)  # was `inc`: history disagrees
        return await ctx.wait_for_event("go")

    async with pgd.Runtime(changed, dsn) as runtime:
        await runtime.client.raise_event("evolving", "go", 1)
        with pytest.raises(pgd.InstanceFailed) as info:
            await runtime.client.wait("evolving", timeout=30)
        assert info.value.error["type"] == "NonDeterminismError"
        assert "'inc'" in info.value.error["message"] and "'other'" in info.value.error["message"]


async def test_version_lets_code_evolve(dsn: str) -> None:
    v1 = pgd.App()

    @v1.activity
    async def step(ctx: pgd.ActivityContext, n: int) -> str:
        return f"step{n}"

    @v1.orchestration(name="evolve")
    async def evolve_v1(ctx: pgd.OrchestrationContext, _: object) -> list[str]:
        a = await ctx.call_activity(step, 1)
        await ctx.wait_for_event("go")
        return [a]

    async with pgd.Runtime(v1, dsn) as runtime:
        await runtime.client.start("evolve", None, instance_id="old")
        with anyio.fail_after(20):
            while "activity_completed" not in [e.kind for e in await runtime.client.history("old")]:
                await anyio.sleep(0.05)

    v2 = pgd.App()
    v2.activity(step)

    @v2.orchestration(name="evolve")
    async def evolve_v2(ctx: pgd.OrchestrationContext, _: object) -> list[str]:
        if ctx.version("extra-step", default=1, latest=2) == 2:
            a = await ctx.call_activity(step, 0)
        else:
            a = "skipped"
        b = await ctx.call_activity(step, 1)
        await ctx.wait_for_event("go")
        return [a, b]

    async with pgd.Runtime(v2, dsn, cache_size=0) as runtime:
        new = await runtime.client.start("evolve", None, instance_id="new")
        await runtime.client.raise_event("old", "go")
        await runtime.client.raise_event("new", "go")
        assert await runtime.client.wait("old", timeout=30) == ["skipped", "step1"]
        assert await new.result(timeout=30) == ["step0", "step1"]


async def test_shared_database_runs_only_own_names(dsn: str) -> None:
    other_app = pgd.App()

    @other_app.activity(name="inc")
    async def inc_elsewhere(ctx: pgd.ActivityContext, n: int) -> int:
        return n + 1000

    @other_app.orchestration
    async def foreign(ctx: pgd.OrchestrationContext, n: int) -> int:
        return int(await ctx.call_activity(inc_elsewhere, n))

    async with pgd.Runtime(app, dsn) as mine:
        async with pgd.Runtime(other_app, dsn):
            pass  # registers "foreign"
        handle = await mine.client.start("foreign", 1, instance_id="foreign-1")
        await anyio.sleep(0.5)
        assert (await mine.client.status("foreign-1")).status is pgd.Status.PENDING  # nobody here runs it
        async with pgd.Runtime(other_app, dsn):
            result = await handle.result(timeout=30)
        assert result in (1001, 2)  # either runtime may execute the shared activity name "inc"


class _SlowCloseRelay:
    """A TCP relay to PostgreSQL that passes bytes at once but the server's close only ``hold`` s later.

    When the server ends a session (a crash, a restart, ``pg_terminate_backend``) it first sends a
    FATAL ErrorResponse, then closes the socket.  Between the two, an idle pooled asyncpg connection
    has consumed the error (its protocol is left in an error state) but does not look closed yet.
    The relay widens that moment, as a slow network or a connection pooler can.
    """

    def __init__(self, host: str, port: int, hold: float) -> None:
        self.host, self.port, self.hold = host, port, hold
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _session(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: float) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                await asyncio.sleep(hold)
            except OSError:
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pump(client_r, server_w, 0.0)),
                 asyncio.create_task(pump(server_r, client_w, self.hold))]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.difference_update(tasks)


async def test_pooled_session_ended_by_the_server_is_not_handed_out(dsn: str) -> None:
    """Regression (chaos run): a pooled connection whose session the server ended was handed out again.

    Its next statement failed with asyncpg's ``InternalClientError('cannot switch to state 15;
    another operation (2) is in progress')``: not a ``pgd.PgDurableError``, and not retried, so a
    ``raise_event`` or ``start`` made just as PostgreSQL went down surfaced it to the caller (and a
    worker's loop could hit it the same way).
    """
    parts = urlsplit(dsn)
    async with _SlowCloseRelay(parts.hostname or "127.0.0.1", parts.port or 5432, hold=3.0) as port:
        relayed = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
        async with pgd.Client(relayed, app=app) as client:
            assert await client.list() == []  # the pool now holds one idle session
            admin = await asyncpg.connect(dsn)
            try:
                ended = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'pgdurable_async'")
            finally:
                await admin.close()
            assert ended == 1
            await asyncio.sleep(0.5)  # the FATAL error has arrived; the close is held back
            started = time.monotonic()
            await client.start("chain", 1, instance_id="after-termination")  # no InternalClientError
            assert (await client.status("after-termination")).status is pgd.Status.PENDING
            assert time.monotonic() - started < 2.0  # a fresh session, not a wait for the close


def test_a_session_the_server_ended_is_a_transient_database_error() -> None:
    error = asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    with pytest.raises(pgd.DatabaseError) as info, mapped_errors():
        raise error
    assert info.value.transient and is_transient(info.value) and is_transient(error)
    assert str(info.value).startswith("PostgreSQL ended the session")
