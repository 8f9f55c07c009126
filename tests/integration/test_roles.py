"""Least privilege: an owner migrates, a worker role runs the runtime, a client role only starts/queries/signals."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._store.sql_loader import q

app = pgd.App()
_names = itertools.count()


@app.activity
async def double(ctx: pgd.ActivityContext, n: int) -> int:
    return 2 * n


@app.activity
async def linger(ctx: pgd.ActivityContext, seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


@app.orchestration
async def lingering(ctx: pgd.OrchestrationContext, seconds: float) -> float:
    return float(await ctx.call_activity(linger, seconds))


@app.orchestration
async def doubled(ctx: pgd.OrchestrationContext, n: int) -> int:
    value = int(await ctx.call_activity(double, n))
    return value + int(await ctx.wait_for_event("add"))


def _as(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def roles(dsn: str) -> AsyncIterator[tuple[str, str]]:
    """DSNs for a fresh worker role and a fresh client role, granted by the owner."""
    suffix = f"{os.getpid()}_{next(_names)}"
    worker, client = f"pgd_worker_{suffix}", f"pgd_client_{suffix}"
    owner = await asyncpg.connect(dsn)
    try:
        try:
            for role in (worker, client):
                await owner.execute(f'CREATE ROLE "{role}" LOGIN')
        except asyncpg.InsufficientPrivilegeError:
            pytest.skip("the test server's role cannot create roles")
        await owner.execute("SELECT pgdurable.grant_worker($1), pgdurable.grant_client($2)", worker, client)
        await owner.execute("CREATE TABLE public.secrets (v text)")
        yield _as(dsn, worker), _as(dsn, client)
    finally:
        for role in (worker, client):
            await owner.execute(f'DROP OWNED BY "{role}"')
            await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
        await owner.close()


async def test_worker_and_client_roles_do_their_jobs(roles: tuple[str, str]) -> None:
    worker_dsn, client_dsn = roles
    async with pgd.Runtime(app, worker_dsn) as runtime:  # migrate=True: finds the schema current
        assert runtime.worker_id
        async with pgd.Client(client_dsn) as client:
            handle = await client.start(doubled, 20, instance_id="least-privilege")
            with pytest.raises(pgd.InstanceAlreadyExists):
                await client.start(doubled, 1, instance_id="least-privilege")
            await client.raise_event("least-privilege", "add", 2)
            assert await handle.result(timeout=30) == 42
            assert [e.kind for e in await client.history("least-privilege")][-1] == "orchestration_completed"
            assert [s.instance_id for s in await client.list()] == ["least-privilege"]
            with pytest.raises(pgd.InstanceNotFound):
                await client.cancel("nobody")


async def test_client_role_cannot_touch_what_it_does_not_need(roles: tuple[str, str]) -> None:
    _, client_dsn = roles
    conn = await asyncpg.connect(client_dsn)
    try:
        for statement in (
            "SELECT * FROM public.secrets",
            "SELECT * FROM pgdurable.work_queue",
            "SELECT * FROM pgdurable.timers",
            "UPDATE pgdurable.history SET payload = '{}'",
            "DELETE FROM pgdurable.history",
            "INSERT INTO pgdurable.history (instance_id, execution_id, seq, event_type) VALUES ('x', 1, 1, 'x')",
            "INSERT INTO pgdurable.orchestrator_queue (instance_id, orchestration, kind) "
            "VALUES ('x', 'doubled', 'activity_completed')",
            "UPDATE pgdurable.instances SET status = 'completed'",
            "SELECT pgdurable.grant_worker(current_user)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_worker_role_cannot_rewrite_history(roles: tuple[str, str]) -> None:
    worker_dsn, _ = roles
    conn = await asyncpg.connect(worker_dsn)
    try:
        for statement in ("UPDATE pgdurable.history SET payload = '{}'", "DELETE FROM pgdurable.history",
                          "SELECT * FROM public.secrets", "DROP TABLE pgdurable.history"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_another_services_worker_role_sees_this_worker_alive(dsn: str, roles: tuple[str, str]) -> None:
    """pg_stat_activity hides other roles' backend_start: that must not read as "session gone"."""
    worker_dsn, _ = roles
    other = f"pgd_other_worker_{os.getpid()}_{next(_names)}"
    owner = await asyncpg.connect(dsn)
    try:
        await owner.execute(f'CREATE ROLE "{other}" LOGIN')
        await owner.execute("SELECT pgdurable.grant_worker($1)", other)
        async with pgd.Runtime(app, worker_dsn) as runtime:
            handle = await runtime.client.start(lingering, 2.0)
            with anyio.fail_after(20):
                leased = "SELECT count(*) FROM pgdurable.work_queue WHERE lease_token IS NOT NULL"
                while not await owner.fetchval(leased):
                    await anyio.sleep(0.05)
            sweeper = await asyncpg.connect(_as(dsn, other), server_settings={"search_path": "pgdurable"})
            try:
                assert await sweeper.fetch(q("release_dead_leases")) == []
            finally:
                await sweeper.close()
            assert await owner.fetchval("SELECT count(*) FROM pgdurable.workers WHERE worker_id = $1",
                                        runtime.worker_id) == 1
            assert await handle.result(timeout=30) == 2.0
        attempts = await owner.fetchval(
            "SELECT count(*) FROM pgdurable.history WHERE event_type = 'activity_completed'")
        assert attempts == 1
    finally:
        await owner.execute(f'DROP OWNED BY "{other}"')
        await owner.execute(f'DROP ROLE IF EXISTS "{other}"')
        await owner.close()
