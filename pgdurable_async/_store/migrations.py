"""Numbered SQL migrations from ``schema/``, applied under an advisory lock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from .._base.errors import ConfigurationError, SchemaVersionError
from .database import Connection, Database, check_schema_name
from .sql_loader import q

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _schema_dir() -> Traversable:
    packaged = resources.files("pgdurable_async").joinpath("schema")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schema"  # source checkout


@cache
def migrations() -> list[Migration]:
    """Every migration shipped with this version, in order."""
    found = []
    for entry in _schema_dir().iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return max(m.version for m in migrations())


async def migrate(dsn: str, schema: str = "pgdurable") -> list[int]:
    """Bring ``schema`` up to date; returns the versions applied now (maybe none).

    It works through a transaction pooler too (PgBouncer, found by the startup parameter
    it refuses): the migration is one transaction, which such a pooler keeps on one
    server session.
    """
    db = Database(dsn, schema=check_schema_name(schema), min_size=1, max_size=1, pooled=None)
    try:
        return await db.run(lambda conn: migrate_connection(conn, schema), transaction=False, retry_for=0)
    finally:
        await db.close()


async def migrate_connection(conn: Connection, schema: str) -> list[int]:
    """Apply the pending migrations of ``schema`` on ``conn`` in one transaction, under an advisory lock."""
    known = migrations()
    applied_now: list[int] = []
    if await schema_version(conn) == latest_version():
        return applied_now  # current: no DDL, no lock (a worker role may not hold CREATE)
    async with conn.transaction():
        await conn.execute(q("migration_lock"), schema)
        await conn.execute(await conn.fetchval(q("create_schema_ddl"), schema))
        await conn.execute(q("set_search_path"), schema)
        await conn.execute(q("create_migrations_table"))
        done = {r["version"] for r in await conn.fetch(q("applied_migrations"))}
        newest = known[-1].version
        if done and max(done) > newest:
            raise _too_new(schema, max(done))
        for migration in known:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(q("record_migration"), migration.version, migration.name)
            applied_now.append(migration.version)
    return applied_now


def _too_new(schema: str, version: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"schema {schema!r} is at version {version}, newer than this pgdurable_async "
        f"(knows up to {latest_version()}); upgrade the package",
        database_version=version,
        code_version=latest_version(),
    )


async def require_current(conn: Connection, schema: str) -> None:
    """Raise unless ``schema`` is installed at a version this code understands."""
    version = await schema_version(conn)
    if version is None:
        raise ConfigurationError(
            f"pgdurable schema {schema!r} is not installed: run "
            "`python -m pgdurable_async migrate` or start a Runtime first"
        )
    if version > latest_version():
        raise _too_new(schema, version)


async def schema_version(conn: Connection) -> int | None:
    """The newest applied version, or None when the schema is not installed."""
    if not await conn.fetchval(q("migrations_table_exists")):
        return None
    value = await conn.fetchval(q("schema_version"))
    return int(value) if value is not None else None
