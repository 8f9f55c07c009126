"""What a failover does to connections, one fault at a time, against a real server.

- a FATAL reaching an idle pooled session before its EOF wrecks the session's protocol
  state: the store must treat that as transient and never reuse the session;
- while no host of a multi-host DSN accepts writes yet, connecting is transient;
- a client waiting for an instance must notice at once that its LISTEN session died;
- an activity ack that failed must be written again without waiting for another ack.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store.database import Database, is_transient

app = pgd.App()
gates: dict[str, anyio.Event] = {}  # "entered": `held` is running; "release": it may return


@app.activity
async def held(ctx: pgd.ActivityContext, n: int) -> int:
    gates["entered"].set()
    await gates["release"].wait()
    return n + 1


@app.orchestration
async def hold(ctx: pgd.OrchestrationContext, n: int) -> int:
    return await ctx.call_activity(held, n)


@app.orchestration
async def gated(ctx: pgd.OrchestrationContext, _: object) -> object:
    return await ctx.wait_for_event("go")


class HoldingProxy:
    """A TCP relay to PostgreSQL that can hold back the end of a server's connection.

    With ``hold_eof`` set, a client reads everything its server sent (such as the
    FATAL of a terminated backend) but not, until :meth:`close`, the EOF that follows:
    a slow network, or a busy client, shows it that way round too.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.hold_eof = False
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._released.set()
        assert self._server is not None
        self._server.close()
        if self._relays:
            await asyncio.wait(self._relays, timeout=10)
        await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        server_r, server_w = await asyncio.open_connection(*self.target)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_server: bool) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                if from_server and self.hold_eof:
                    await self._released.wait()
            finally:
                writer.close()

        await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True), return_exceptions=True)


def _with_host(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"))


def _with_query(dsn: str, option: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(query=f"{parts.query}&{option}" if parts.query else option))


async def _admin(dsn: str, *statements: str) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


async def test_session_wrecked_by_a_fatal_is_replaced(dsn: str) -> None:
    parts = urlsplit(dsn)
    async with HoldingProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = _with_host(dsn, proxy.port)
        db = Database(proxied, min_size=1, max_size=1)  # one pooled session, idle between calls
        raw = await asyncpg.connect(proxied)  # shows what the driver alone makes of it
        try:
            pids = [await db.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"), transaction=False),
                    await raw.fetchval("SELECT pg_backend_pid()")]
            proxy.hold_eof = True
            await _admin(dsn, f"SELECT count(pg_terminate_backend(pid)) FROM unnest(ARRAY{pids}) AS pid")
            await anyio.sleep(0.3)  # the FATALs have arrived on the idle sessions; their EOFs have not
            assert not raw.is_closed()
            with pytest.raises(asyncpg.exceptions.InternalClientError, match="cannot switch to state"):
                await raw.fetchval("SELECT 1")

            new_pid = await db.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"), transaction=False)
            assert new_pid not in pids  # transient: retried on a fresh session
        finally:
            raw.terminate()
            proxy.hold_eof = False  # closing a session waits for its EOF
            await db.close()


async def test_no_writable_host_yet_is_transient(dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    (version,) = await _admin(dsn, "SHOW server_version_num")
    if int(str(version)) < 140000:
        pytest.skip("servers before 14 do not report default_transaction_read_only at connection")
    writable = _with_query(dsn, "target_session_attrs=read-write")
    await _admin(dsn, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')  # like a standby
    with pytest.raises(asyncpg.exceptions.TargetServerAttributeNotMatched) as info:
        await asyncpg.connect(writable)
    assert is_transient(info.value)

    db = Database(writable)

    async def promote_later() -> None:
        await anyio.sleep(0.5)
        await _admin(dsn, "SET default_transaction_read_only = off",
                     f'ALTER DATABASE "{name}" RESET default_transaction_read_only')

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(promote_later)
            with anyio.fail_after(20):
                assert await db.run(lambda conn: conn.fetchval("SELECT NOT pg_is_in_recovery()")) is True
    finally:
        await db.close()


async def test_wait_notices_its_listen_session_died(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime, pgd.Client(dsn) as client:
        await runtime.client.start(gated, None, instance_id="waited")
        outcome: list[object] = []

        async def wait() -> None:
            outcome.append(await client.wait("waited"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            with anyio.fail_after(20):  # the client's LISTEN session is up; kill it
                while await _admin(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                        " WHERE query ~ '^LISTEN .*pgdurable_(done|value)'") == [0]:
                    await anyio.sleep(0.02)
            await runtime.client.raise_event("waited", "go", "done")
            with anyio.fail_after(10):  # well before the 30 s safety re-check
                while not outcome:
                    await anyio.sleep(0.02)
        assert outcome == ["done"]


async def test_failed_ack_is_written_again(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    gates.update(entered=anyio.Event(), release=anyio.Event())
    await _admin(
        dsn,
        "CREATE TABLE public.ack_gate (closed bool)",
        "CREATE FUNCTION public.ack_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF EXISTS (SELECT FROM public.ack_gate) THEN RAISE EXCEPTION 'acks are refused'; END IF;"
        " RETURN NEW; END $$",
        "CREATE TRIGGER ack_gate BEFORE INSERT ON pgdurable.orchestrator_queue"
        " FOR EACH ROW EXECUTE FUNCTION public.ack_gate()",
    )
    with caplog.at_level(logging.WARNING, logger="pgdurable_async.runtime"):
        async with pgd.Runtime(app, dsn) as runtime:
            handle = await runtime.client.start(hold, 41)
            with anyio.fail_after(20):
                await gates["entered"].wait()
            await _admin(dsn, "INSERT INTO public.ack_gate VALUES (true)")
            gates["release"].set()
            with anyio.fail_after(20):  # the ack was refused (not transient: no retry inside the store)
                while "activity ack failed" not in caplog.text:
                    await anyio.sleep(0.02)
            await _admin(dsn, "DELETE FROM public.ack_gate")
            # No other activity will finish to trigger a flush: the refused ack must go again by itself.
            assert await handle.result(timeout=10) == 42
