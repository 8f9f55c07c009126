"""The lifecycle under least privilege: a worker role sets values and purges, a client role reads
values, waits on them and forks; roles granted before the lifecycle migration get the same rights."""

from __future__ import annotations

import os
from datetime import timedelta

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store import migrations as migrator
from tests.integration.test_roles import roles  # noqa: F401 - the fixture

app = pgd.App()


@app.orchestration
async def reporter(ctx: pgd.OrchestrationContext, n: int) -> int:
    ctx.set_value("n", n)
    return n + int(await ctx.wait_for_event("more"))


async def test_values_fork_and_purge_under_least_privilege(dsn: str, roles: tuple[str, str]) -> None:  # noqa: F811
    worker_dsn, client_dsn = roles
    async with pgd.Runtime(app, worker_dsn) as runtime:
        async with pgd.Client(client_dsn) as client:
            handle = await client.start(reporter, 1, instance_id="r1")
            assert await client.wait_value("r1", "n", timeout=30) == 1
            await client.raise_event("r1", "more", 1)
            assert await handle.result(timeout=30) == 2
            fork = await client.fork("r1", at_seq=2, new_instance_id="r1-fork")  # before the event came
            assert await fork.get_value("n") == 1
            await fork.raise_event("more", 41)
            assert await fork.result(timeout=30) == 42
            conn = await asyncpg.connect(client_dsn)
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("UPDATE pgdurable.instance_values SET value = '0'")
            finally:
                await conn.close()
    owner = await asyncpg.connect(dsn)
    try:
        await owner.execute("UPDATE pgdurable.instances SET created_at = now() - interval '2 days', "
                            "updated_at = now() - interval '2 days'")
    finally:
        await owner.close()
    # Purging deletes history: the owner's right.  A worker role's retention says so once and stops.
    async with pgd.Runtime(app, worker_dsn, retention=timedelta(days=1)) as runtime:
        assert runtime.retention is not None
        with anyio.fail_after(10):
            while not runtime.retention.refused:
                await anyio.sleep(0.05)
        with pytest.raises(pgd.DatabaseError, match="permission denied"):
            await runtime.client.purge_finished(timedelta(days=1))
    async with pgd.Runtime(app, dsn, retention=timedelta(days=1)) as runtime:
        assert runtime.retention is not None
        with anyio.fail_after(10):
            while runtime.retention.purged < 2:
                await anyio.sleep(0.05)
        assert not runtime.retention.refused


async def test_roles_granted_before_the_lifecycle_migration_keep_working(empty_dsn: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = migrator.migrations()
    (lifecycle,) = [m.version for m in shipped if m.name == "lifecycle"]
    monkeypatch.setattr(migrator, "migrations", lambda: [m for m in shipped if m.version < lifecycle])
    await migrator.migrate(empty_dsn)
    suffix = f"{os.getpid()}_upgrade"
    worker, client = f"pgd_old_worker_{suffix}", f"pgd_old_client_{suffix}"
    owner = await asyncpg.connect(empty_dsn)
    try:
        for role in (worker, client):
            await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
            await owner.execute(f'CREATE ROLE "{role}" LOGIN')
        await owner.execute("SELECT pgdurable.grant_worker($1), pgdurable.grant_client($2)", worker, client)
        monkeypatch.undo()
        assert [m.version for m in shipped if m.version >= lifecycle] == await migrator.migrate(empty_dsn)
        check = "SELECT has_table_privilege($1, 'pgdurable.instance_values', $2)"
        assert await owner.fetchval(check, worker, "INSERT") and await owner.fetchval(check, worker, "DELETE")
        assert await owner.fetchval(check, client, "SELECT") and not await owner.fetchval(check, client, "INSERT")
        fork = "SELECT has_function_privilege($1, 'pgdurable.fork(text, integer, text)', 'EXECUTE')"
        assert await owner.fetchval(fork, client) and await owner.fetchval(fork, worker)
    finally:
        for role in (worker, client):
            await owner.execute(f'DROP OWNED BY "{role}"')
            await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
        await owner.close()
