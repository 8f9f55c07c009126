"""schema/schema.sql, the one-file snapshot of the schema, builds the same database as the migrations.

One empty database is built by ``python -m pgdurable_async migrate`` (a subprocess, so this test
needs no internal module path), another by applying schema/schema.sql the way the migrator applies
a migration.  Their ``pg_dump --schema-only`` output must match, and so must their privileges.

``schema_migrations`` is the migrator's own table: it creates it before migration 0001 and adds
one row per migration.  The snapshot declares the same table (so both dumps show it) and inserts
no rows; a schema-only dump compares definitions, never rows.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import PgServer

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "schema" / "schema.sql"
SCHEMA = "pgdurable"
DIFF_LINES = 80

_NOISE = re.compile(
    r"^(--.*|\s*|SET .*|SELECT pg_catalog\.set_config\('search_path', '', false\);|\\(un)?restrict .*)$"
)
_ACL_STATEMENT = re.compile(r"^(GRANT|REVOKE|ALTER DEFAULT PRIVILEGES) ")

# Effective privileges (NULL ACLs expanded to the built-in defaults) of every function,
# relation and schema pgdurable installs, one line each.
_EFFECTIVE_ACLS = """
WITH objects (kind, name, acl) AS (
    SELECT 'function', p.oid::regprocedure::text, coalesce(p.proacl, acldefault('f'::"char", p.proowner))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY ($1)
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY ($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    UNION ALL
    SELECT 'schema', n.nspname::text, coalesce(n.nspacl, acldefault('n'::"char", n.nspowner))
    FROM pg_namespace n WHERE n.nspname = ANY ($1)
)
SELECT format('%s %s: %s %s%s', o.kind, o.name,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
              a.privilege_type, CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) AS line
FROM objects o CROSS JOIN LATERAL aclexplode(o.acl) a
ORDER BY 1
"""


def _pg_dump_program() -> str | None:
    """pg_dump of the newest server install (it must not be older than the server), else PATH's."""

    def version(path: str) -> tuple[int, ...]:
        release = Path(path).parent.parent.name
        return tuple(int(part) for part in release.split(".")) if release.replace(".", "").isdigit() else (-1,)

    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), key=version, reverse=True)
    for candidate in [*installed, shutil.which("pg_dump")]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def pg_dump(pg_server: PgServer) -> str:
    own = pg_server.cluster.bindir / "pg_dump" if pg_server.cluster is not None else None
    if own is not None and os.access(own, os.X_OK):  # the throwaway cluster's own (the wheel's on PostgreSQL 18)
        return str(own)
    program = _pg_dump_program()
    if program is None:
        pytest.skip("no pg_dump found (neither /usr/lib/postgresql/*/bin/pg_dump nor pg_dump on PATH)")
    return program


@pytest.fixture
async def second_empty_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """Another fresh database with nothing installed (as tests/conftest.py's empty_dsn)."""
    name = f"pgd_empty_snapshot_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _admin(pg_server, f'CREATE DATABASE "{name}"')
    yield pg_server.dsn_for(name)
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(pg_server: PgServer, statement: str) -> None:
    conn = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


# -- building ----------------------------------------------------------------------------
async def _migrate(dsn: str) -> None:
    """``python -m pgdurable_async migrate`` run from this checkout (its root goes first on sys.path)."""
    command = [sys.executable, "-m", "pgdurable_async", "migrate", "--dsn", dsn]
    done = await anyio.run_process(command, cwd=ROOT, check=False)
    if done.returncode != 0:
        pytest.fail(f"migrate exited with {done.returncode}:\n{done.stdout.decode()}{done.stderr.decode()}")


async def _apply_snapshot(dsn: str) -> None:
    """As the migrator applies a migration: one transaction, search_path = the target schema."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})
    try:
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
            await conn.execute(f'SET LOCAL search_path = "{SCHEMA}"')
            await conn.execute(SNAPSHOT.read_text(encoding="utf-8"))
    finally:
        await conn.close()


# -- comparing ---------------------------------------------------------------------------
def _database_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


def _normalised(dump: str, dsn: str) -> list[str]:
    name = _database_name(dsn)
    return [line.replace(name, "<database>") for line in dump.splitlines() if not _NOISE.match(line)]


async def _dump(pg_dump: str, dsn: str, *options: str) -> list[str]:
    done = await anyio.run_process([pg_dump, "--schema-only", "--no-owner", *options, dsn], check=False)
    if done.returncode != 0:
        error = done.stderr.decode()
        if "server version mismatch" in error:
            pytest.skip(f"{pg_dump} is older than the server: {error.strip()}")
        pytest.fail(f"pg_dump exited with {done.returncode}:\n{error}")
    return _normalised(done.stdout.decode(), dsn)


async def _structure(pg_dump: str, dsn: str) -> list[str]:
    return await _dump(pg_dump, dsn, "--no-privileges")


async def _privileges(pg_dump: str, dsn: str) -> list[str]:
    """The GRANT/REVOKE statements pg_dump writes, then the effective ACL of every object."""
    statements = [line for line in await _dump(pg_dump, dsn) if _ACL_STATEMENT.match(line)]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_EFFECTIVE_ACLS, [SCHEMA, "df", "public"])
    finally:
        await conn.close()
    return statements + [row["line"] for row in rows]


def _assert_same(expected: list[str], actual: list[str], expected_name: str, actual_name: str, what: str) -> None:
    if expected == actual:
        return
    diff = list(difflib.unified_diff(expected, actual, expected_name, actual_name, lineterm="", n=2))
    shown = "\n".join(diff[:DIFF_LINES])
    more = f"\n... ({len(diff) - DIFF_LINES} more diff lines)" if len(diff) > DIFF_LINES else ""
    pytest.fail(f"{what} differ ({expected_name} vs {actual_name}):\n{shown}{more}", pytrace=False)


# -- tests -------------------------------------------------------------------------------
def test_snapshot_is_not_a_migration() -> None:
    assert SNAPSHOT.is_file()
    assert re.match(r"^(\d{4})_(\w+)\.sql$", SNAPSHOT.name) is None


async def test_snapshot_builds_the_database_the_migrations_build(
    pg_dump: str, empty_dsn: str, second_empty_dsn: str
) -> None:
    migrated, snapshot = empty_dsn, second_empty_dsn
    await _migrate(migrated)
    await _apply_snapshot(snapshot)

    _assert_same(await _structure(pg_dump, migrated), await _structure(pg_dump, snapshot),
                 "migrations", "schema/schema.sql", "pg_dump --schema-only outputs")
    _assert_same(await _privileges(pg_dump, migrated), await _privileges(pg_dump, snapshot),
                 "migrations", "schema/schema.sql", "privileges")

    conn = await asyncpg.connect(snapshot)
    try:  # the table is the migrator's bookkeeping: the snapshot records no version
        assert await conn.fetchval(f'SELECT count(*) FROM "{SCHEMA}".schema_migrations') == 0
    finally:
        await conn.close()


async def test_migrating_twice_changes_nothing(pg_dump: str, empty_dsn: str) -> None:
    async def state() -> tuple[list[str], list[str], list[tuple[object, ...]]]:
        conn = await asyncpg.connect(empty_dsn)
        try:
            rows = await conn.fetch(f'SELECT version, name, applied_at FROM "{SCHEMA}".schema_migrations ORDER BY 1')
        finally:
            await conn.close()
        return (await _structure(pg_dump, empty_dsn), await _privileges(pg_dump, empty_dsn),
                [tuple(row) for row in rows])

    await _migrate(empty_dsn)
    structure, privileges, versions = await state()
    assert versions, "the first migrate recorded no version"
    await _migrate(empty_dsn)
    again_structure, again_privileges, again_versions = await state()
    _assert_same(structure, again_structure, "first migrate", "second migrate", "pg_dump --schema-only outputs")
    _assert_same(privileges, again_privileges, "first migrate", "second migrate", "privileges")
    assert again_versions == versions


async def test_upgrading_one_version_at_a_time_builds_the_same_database(
    pg_dump: str, empty_dsn: str, second_empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade path of a long-lived database: every migration in a ``migrate`` run of its own."""
    from pgdurable_async._store import migrations as migrator

    shipped = migrator.migrations()
    for k in range(1, len(shipped) + 1):
        monkeypatch.setattr(migrator, "migrations", lambda k=k: shipped[:k])
        assert await migrator.migrate(empty_dsn) == [shipped[k - 1].version]
    monkeypatch.undo()
    await _apply_snapshot(second_empty_dsn)

    _assert_same(await _structure(pg_dump, empty_dsn), await _structure(pg_dump, second_empty_dsn),
                 "migrations, one run each", "schema/schema.sql", "pg_dump --schema-only outputs")
    _assert_same(await _privileges(pg_dump, empty_dsn), await _privileges(pg_dump, second_empty_dsn),
                 "migrations, one run each", "schema/schema.sql", "privileges")
