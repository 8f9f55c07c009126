"""Migrations: idempotent, recorded, serialized by an advisory lock, and refusing a newer schema."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store.migrations import latest_version, migrations


async def test_migrate_installs_records_and_is_idempotent(empty_dsn: str) -> None:
    applied = await pgd.migrate(empty_dsn)
    assert applied == [m.version for m in migrations()]
    assert await pgd.migrate(empty_dsn) == []
    conn = await asyncpg.connect(empty_dsn)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM pgdurable.schema_migrations")]
        assert versions == [m.version for m in migrations()]
        tables = {
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'pgdurable'")
        }
        assert {"instances", "history", "orchestrator_queue", "work_queue", "timers"} <= tables
    finally:
        await conn.close()


async def test_concurrent_migrations_serialize(empty_dsn: str) -> None:
    results: list[list[int]] = []

    async def run() -> None:
        results.append(await pgd.migrate(empty_dsn))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(run)
    assert sorted(map(len, results)) == [0, 0, 0, len(migrations())]


async def test_other_schema_names_are_isolated(empty_dsn: str) -> None:
    await pgd.migrate(empty_dsn, schema="tenant_a")
    app = pgd.App()

    @app.orchestration
    async def hello(ctx: pgd.OrchestrationContext, name: str) -> str:
        return f"hi {name}"

    async with pgd.Runtime(app, empty_dsn, schema="tenant_b") as runtime:
        assert await (await runtime.client.start(hello, "b")).result(timeout=30) == "hi b"
    with pytest.raises(pgd.ConfigurationError):
        pgd.Client(empty_dsn, schema='x"; DROP SCHEMA public; --')


async def test_schema_newer_than_code_is_refused(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO pgdurable.schema_migrations (version, name) VALUES ($1, 'from the future')",
            latest_version() + 1,
        )
    finally:
        await conn.close()
    with pytest.raises(pgd.SchemaVersionError):
        await pgd.migrate(dsn)
    async with pgd.Client(dsn) as client:
        with pytest.raises(pgd.SchemaVersionError):
            await client.status("x")
    with pytest.raises(pgd.SchemaVersionError):
        async with pgd.Runtime(pgd.App(), dsn):
            pass
