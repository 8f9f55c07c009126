"""Numbered SQL migrations from ``schema/``, applied under an advisory lock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import asyncpg

from ._errors import ConfigurationError, SchemaVersionError
from ._store import check_schema_name, connect, mapped_errors

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
    return Path(__file__).resolve().parent.parent / "schema"  # source checkout


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
    """Bring ``schema`` up to date; returns the versions applied now (maybe none)."""
    check_schema_name(schema)
    conn = await connect(dsn, schema)
    try:
        with mapped_errors():
            return await migrate_connection(conn, schema)
    finally:
        await conn.close()


async def migrate_connection(conn: asyncpg.Connection[Any], schema: str) -> list[int]:
    known = migrations()
    applied_now: list[int] = []
    if await schema_version(conn) == latest_version():
        return applied_now  # current: no DDL, no lock (a worker role may not hold CREATE)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:migrate:' || $1))", schema)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path = "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        newest = max(known, key=lambda m: m.version).version
        if done and max(done) > newest:
            raise SchemaVersionError(
                f"schema {schema!r} is at version {max(done)}, newer than this pgdurable_async "
                f"(knows up to {newest}); upgrade the package",
                database_version=max(done),
                code_version=newest,
            )
        for migration in known:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
            )
            applied_now.append(migration.version)
    return applied_now


async def require_current(conn: asyncpg.Connection[Any], schema: str) -> None:
    """Raise unless ``schema`` is installed at a version this code understands."""
    version = await schema_version(conn)
    if version is None:
        raise ConfigurationError(
            f"pgdurable schema {schema!r} is not installed: run "
            "`python -m pgdurable_async migrate` or start a Runtime first"
        )
    if version > latest_version():
        raise SchemaVersionError(
            f"schema {schema!r} is at version {version}, newer than this pgdurable_async "
            f"(knows up to {latest_version()}); upgrade the package",
            database_version=version,
            code_version=latest_version(),
        )


async def schema_version(conn: asyncpg.Connection[Any]) -> int | None:
    """The newest applied version, or None when the schema is not installed."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return None
    value = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    return int(value) if value is not None else None
