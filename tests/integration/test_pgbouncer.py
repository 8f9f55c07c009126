"""Behind a real PgBouncer in transaction pooling mode: nothing is lost, and LISTEN is never used.

Debian's pgbouncer (1.18) forwards no prepared statements and refuses a ``search_path``
startup parameter, and in transaction mode a LISTEN lands on whichever server session
ran it.  The fixture starts one pgbouncer process (``pool_mode = transaction``, auth
``any``) in front of the test server.

Its ``server_reset_query`` runs after every transaction (``server_reset_query_always``)
in the server session that ran it, and copies that session's ``pg_listening_channels()``
into ``public.listen_audit``: a LISTEN sent through the pooler by anyone, an in-process
runtime or a worker process, is recorded there by the database itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store import Database, listener
from pgdurable_async._store.migrations import migrate, migrations
from tests.conftest import PgServer
from tests.integration.pgbouncer_app import app
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(60)

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)
POOL_SIZE = 10  # server sessions per database behind the pooler


@dataclass
class Bouncer:
    port: int
    log_path: Path

    def dsn(self, direct: str) -> str:
        """``direct``'s database through the pooler (which logs in to the server on its own)."""
        parts = urlsplit(direct)
        return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bouncer(pg_server: PgServer) -> Iterator[Bouncer]:
    if PGBOUNCER is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    server = urlsplit(pg_server.admin_dsn)
    backend = f"host={server.hostname or '127.0.0.1'} port={server.port or 5432} user={server.username or 'postgres'}"
    if server.password:
        backend += f" password={server.password}"
    workdir = Path(tempfile.mkdtemp(prefix="pgd-pgbouncer-"))
    port = _free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = {backend}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\n"
        f"default_pool_size = {POOL_SIZE}\nmax_client_conn = 500\n"
        "server_reset_query = INSERT INTO public.listen_audit SELECT pg_listening_channels()\n"
        "server_reset_query_always = 1\n"
        f"logfile = {workdir / 'pgbouncer.log'}\npidfile = {workdir / 'pgbouncer.pid'}\n"
    )
    cmd = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        shutil.chown(workdir, "postgres")
        shutil.chown(ini, "postgres")
        cmd = [shutil.which("runuser") or "/sbin/runuser", "-u", "postgres", "--", *cmd]
    with (workdir / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    found = Bouncer(port, workdir / "pgbouncer.log")
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"pgbouncer exited:\n{(workdir / 'stdout.log').read_text()}{found.log()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"pgbouncer did not listen on {port}:\n{found.log()}"
                time.sleep(0.05)
        yield found
    finally:  # pgbouncer itself (runuser, signalled, would wait 2 s for it), then its process group
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((workdir / "pgbouncer.pid").read_text()), signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None and not _exits_within(proc, 5):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _exits_within(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


async def _prepare(direct: str) -> None:
    """The app's table, and the audit table the pooler's reset query fills (before any pooled session)."""
    conn = await asyncpg.connect(direct)
    try:
        await conn.execute("CREATE TABLE public.effects (key text NOT NULL)")
        await conn.execute("CREATE TABLE public.listen_audit (channel text NOT NULL)")
    finally:
        await conn.close()


async def _audit(direct: str) -> set[str]:
    """Every channel a server session behind the pooler was listening on after a transaction."""
    conn = await asyncpg.connect(direct)
    try:
        return {r["channel"] for r in await conn.fetch("SELECT DISTINCT channel FROM public.listen_audit")}
    finally:
        await conn.close()


async def _effects(direct: str) -> dict[str, int]:
    conn = await asyncpg.connect(direct)
    try:
        return {r["key"]: r["n"] for r in await conn.fetch("SELECT key, count(*) AS n FROM public.effects GROUP BY 1")}
    finally:
        await conn.close()


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)


async def _run_flows(client: pgd.Client, ids: list[str], fanout: int = 6) -> None:
    """Start ``flow`` instances, raise their event once they wait for it, check every result."""
    handles = [await client.start("flow", fanout, instance_id=i) for i in ids]

    async def all_waiting() -> bool:
        states = [await h.status() for h in handles]
        return all(state.custom_status == "waiting" for state in states)

    await _until(all_waiting)
    for h in handles:
        await h.raise_event("go", h.instance_id)
    for h in handles:
        assert await h.result(timeout=30) == {
            "sum": sum(i * i for i in range(fanout)),
            "event": h.instance_id,
            "key": f"{h.instance_id}/done",
            "child": fanout * fanout + 1,
        }


@pytest.fixture
def listens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Channels this process subscribes to (asyncpg's add_listener, watched, not replaced)."""
    seen: list[str] = []
    original = asyncpg.Connection.add_listener

    async def add_listener(self: asyncpg.Connection, channel: str, callback: Any) -> None:
        seen.append(channel)
        await original(self, channel, callback)

    monkeypatch.setattr(asyncpg.Connection, "add_listener", add_listener)
    return seen


async def test_poll_mode_runs_every_kind_of_step_through_pgbouncer(
    dsn: str, bouncer: Bouncer, listens: list[str]
) -> None:
    await _prepare(dsn)
    url = bouncer.dsn(dsn)
    async with (
        pgd.Runtime(app, url, wake="poll", poll_interval=0.2) as runtime,
        pgd.Client(url, wake="poll", poll_interval=0.2) as client,  # a client of its own, through the pooler
    ):
        assert runtime.wake == "poll" and runtime.db.pooled
        await _run_flows(client, [f"poll-{i}" for i in range(3)])
    assert listens == [], "poll mode subscribed to a channel"
    assert await _audit(dsn) == set(), "a server session behind the pooler was LISTENing"
    assert await _effects(dsn) == {f"poll-{i}/done": 1 for i in range(3)}


async def test_auto_mode_detects_the_pooler_and_polls(
    dsn: str, bouncer: Bouncer, caplog: pytest.LogCaptureFixture
) -> None:
    await _prepare(dsn)
    url = bouncer.dsn(dsn)
    with caplog.at_level(logging.INFO, logger="pgdurable_async"):
        started = time.monotonic()
        async with pgd.Runtime(app, url, poll_interval=0.2) as runtime:  # wake="auto" is the default
            start_seconds = time.monotonic() - started
            assert runtime.wake == "poll" and runtime.db.pooled
            await _run_flows(runtime.client, ["auto-1"])
            async with pgd.Client(url, poll_interval=0.2) as client:  # auto as well: it tests at its first wait
                await _run_flows(client, ["auto-2"], fanout=2)
                assert client.wake == "poll"
    assert start_seconds < 5
    fallbacks = [r for r in caplog.records if "did not reach this LISTEN session" in r.getMessage()]
    assert [r.levelno for r in fallbacks] == [logging.WARNING, logging.INFO]  # the runtime's, the client's
    # The only LISTENs that went through the pooler were the start-up tests' own probes (which
    # also shows that the audit sees a LISTEN sent through the pooler).
    audit = await _audit(dsn)
    assert audit and all(channel.startswith("pgdurable_probe_") for channel in audit), audit
    assert await _effects(dsn) == {"auto-1/done": 1, "auto-2/done": 1}


async def test_auto_mode_listens_on_direct_postgres(dsn: str) -> None:
    started = time.monotonic()
    async with pgd.Runtime(app, dsn) as runtime:
        assert runtime.wake == "listen" and runtime.db.pooled is False
        assert time.monotonic() - started < 5
        handle = await runtime.client.start("child", 3)
        assert await handle.result(timeout=20) == 10
        assert runtime.client.wake == "listen"


async def test_a_late_notify_on_a_direct_session_is_waited_for(
    dsn: str, bouncer: Bouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that reports the pid of the backend that ran its LISTEN is direct: no fallback.

    PgBouncer reports a random pid; a direct session its own.  With no time at all for the
    probe NOTIFY, wake="auto" still listens on direct PostgreSQL.
    """
    await _prepare(dsn)
    for url, direct in ((dsn, True), (bouncer.dsn(dsn), False)):
        db = Database(url, pooled=None)
        try:
            session = await db.connect() if direct else await _pooled_session(db)
            try:
                await session.execute('LISTEN "pgdurable_probe_direct"')
                assert await db.run(lambda c, s=session: listener._is_direct(c, s, "pgdurable_probe_direct")) is direct
            finally:
                await session.close()
        finally:
            await db.close()
    monkeypatch.setattr(listener, "PROBE_SECONDS", 0.0)
    async with pgd.Runtime(app, dsn) as runtime:
        assert runtime.wake == "listen"


async def _pooled_session(db: Database) -> asyncpg.Connection:
    await db.open()
    assert db.pooled
    return await db.connect()


async def test_migrate_through_pgbouncer(empty_dsn: str, bouncer: Bouncer) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("CREATE TABLE public.listen_audit (channel text NOT NULL)")
    finally:
        await conn.close()
    url = bouncer.dsn(empty_dsn)
    assert await migrate(url) == [m.version for m in migrations()]  # one transaction: one server session
    assert await migrate(url) == []
    async with pgd.Runtime(app, url, wake="poll", migrate=False) as runtime:
        assert await (await runtime.client.start("child", 2)).result(timeout=20) == 5


async def test_sigkilled_poll_worker_leases_are_released(dsn: str, bouncer: Bouncer, tmp_path: Path) -> None:
    """A SIGKILLed worker has no session to be seen gone: its expired heartbeat frees its leases.

    The lease is 30 s, so completing well within that proves the heartbeat released them.
    """
    await _prepare(dsn)
    url = bouncer.dsn(dsn)
    markers = tmp_path / "markers"
    options = ("--wake", "poll", "--poll-interval", "0.2", "--sweep-interval", "1", "--lease-seconds", "30")

    def spawn(n: int) -> WorkerProcess:
        return WorkerProcess(url, "tests.integration.pgbouncer_app:app", tmp_path / f"worker-{n}.log", *options,
                             env={"PGDURABLE_TEST_MARKERS": str(markers)})

    worker = spawn(1)
    try:
        await worker.ready()
        assert "wake poll every 0.2 s" in worker.log()
        async with pgd.Client(url, wake="poll", poll_interval=0.2) as client:
            handle = await client.start("slow_flow", 4, instance_id="killed")

            async def started() -> bool:
                return markers.exists() and any(markers.iterdir())

            await _until(started)
            worker.kill()  # mid-activity: its leases are held for 30 s
            killed = worker.pid
            first = {p.name for p in markers.iterdir()}
            worker = spawn(2)
            with anyio.fail_after(25):
                assert await handle.result(timeout=25) == {"sum": 0 + 1 + 4 + 9, "key": "killed/done"}
            rerun = {p.name.rsplit(".", 1)[1] for p in markers.iterdir() if p.name not in first}
            assert str(worker.pid) in rerun, "the second worker re-ran the interrupted activities"
    finally:
        await worker.stop()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT worker_id, backend_pid, expires_at FROM pgdurable.workers")
    finally:
        await conn.close()
    assert not [r for r in rows if f":{killed}:" in r["worker_id"]], "the dead worker is still registered"
    assert await _audit(dsn) == set(), "a worker process LISTENed through the pooler"
    assert await _effects(dsn) == {"killed/done": 1}
