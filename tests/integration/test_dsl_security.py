"""Roles: SQL nodes run as the submitting role; instances and variables are private to it;
df.grant_usage / df.revoke_usage gate the surface; instance_nodes reports node states."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()


def as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@contextlib.asynccontextmanager
async def login_roles(dsn: str, names: tuple[str, ...], *grants: str) -> AsyncIterator[tuple[str, ...]]:
    """Create login roles, run ``grants`` as the owner, and drop the roles afterwards (they are cluster-wide)."""
    admin = await asyncpg.connect(dsn)
    try:
        for name in names:
            await admin.execute(f'CREATE ROLE "{name}" LOGIN')
        for grant in grants:
            await admin.execute(grant)
        yield names
    finally:
        for name in names:
            await admin.execute(f'DROP OWNED BY "{name}"')
        await admin.close()
        admin = await asyncpg.connect(dsn)
        try:
            for name in names:
                await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        finally:
            await admin.close()


@pytest.fixture
async def roles(dsn: str) -> AsyncIterator[tuple[str, ...]]:
    suffix = uuid.uuid4().hex[:6]
    names = (f"alice_{suffix}", f"bob_{suffix}", f"carol_{suffix}")
    async with login_roles(dsn, names, f'GRANT CREATE ON SCHEMA public TO "{names[0]}"',
                           f"SELECT df.grant_usage('{names[0]}'), df.grant_usage('{names[1]}')") as created:
        yield created


async def test_roles_isolation_and_grants(dsn: str, roles: tuple[str, str, str]) -> None:
    alice_name, bob_name, carol_name = roles
    async with pgd.Runtime(app, dsn) as runtime:
        alice = await asyncpg.connect(as_user(dsn, alice_name))
        bob = await asyncpg.connect(as_user(dsn, bob_name))
        carol = await asyncpg.connect(as_user(dsn, carol_name))
        try:
            await alice.execute("CREATE TABLE alice_data (who text)")
            mine = await alice.fetchval("SELECT df.start('INSERT INTO alice_data VALUES (current_user)', 'a')")
            assert await alice.fetchval("SELECT df.await_instance($1)", mine) == "completed"
            assert await alice.fetchval("SELECT who FROM alice_data") == alice_name  # ran as alice, not the worker

            # bob cannot see, signal or cancel alice's instance, nor read her table through a graph
            assert await bob.fetchval("SELECT df.status($1)", mine) is None
            assert await bob.fetchval("SELECT count(*) FROM df.list_instances()") == 0
            assert await bob.fetchval("SELECT count(*) FROM df.nodes") == 0
            assert await alice.fetchval("SELECT count(*) FROM df.nodes") == 1
            with pytest.raises(asyncpg.PostgresError, match="not found"):
                await bob.execute("SELECT df.signal($1, 'x')", mine)
            with pytest.raises(asyncpg.PostgresError, match="not found"):
                await bob.execute("SELECT * FROM df.instance_nodes($1)", mine)
            theirs = await bob.fetchval("SELECT df.start('SELECT * FROM alice_data')")
            assert await bob.fetchval("SELECT df.await_instance($1)", theirs) == "failed"
            with pytest.raises(pgd.InstanceFailed, match="permission denied"):
                await runtime.client.wait(theirs)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a request names no one but its sender
                await bob.execute(
                    "INSERT INTO df._requests (requested_by, kind, graph) "
                    "VALUES (to_regrole($1)::oid, 'start', '{\"type\": \"sql\", \"query\": \"SELECT 1\"}')",
                    alice_name,
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await bob.execute("SELECT df.http('https://example.com', 'GET')")  # needs include_http

            # variables are per role
            await alice.execute("SELECT df.setvar('k', 'alice-value')")
            await bob.execute("SELECT df.setvar('k', 'bob-value')")
            assert await alice.fetchval("SELECT df.getvar('k')") == "alice-value"
            assert await bob.fetchval("SELECT count(*) FROM df.vars") == 1

            # no grant, no df; revoke takes it away again
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await carol.execute("SELECT df.start('SELECT 1')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await bob.execute(f"SELECT df.grant_usage('{carol_name}')")
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f"SELECT df.revoke_usage('{bob_name}')")
            finally:
                await admin.close()
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await bob.execute("SELECT df.start('SELECT 1')")
        finally:
            for conn in (alice, bob, carol):
                await conn.close()


async def test_instance_nodes(dsn: str) -> None:
    async with pgd.Runtime(app, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            instance_id = await conn.fetchval(
                "SELECT df.start('SELECT 1 AS one' |=> 'x' ~> df.sleep(0)"
                " ~> ('SELECT $x > 0' ?> 'SELECT 2' !> 'SELECT 3'))"
            )
            assert await conn.fetchval("SELECT df.await_instance($1)", instance_id) == "completed"
            public = {r["node_id"]: r for r in await conn.fetch("SELECT * FROM df.instance_nodes($1)", instance_id)}
            relation = await conn.fetch("SELECT id, inferred_status FROM df.nodes WHERE instance_id = $1", instance_id)
            assert {r["id"]: r["inferred_status"] for r in relation} == {
                k: r["inferred_status"] for k, r in public.items()}
            paths = dict(await conn.fetch("SELECT node_id, path FROM df._node_rows($1)", instance_id))
            rows = {paths[k]: r for k, r in public.items()}  # by graph path
        finally:
            await conn.close()
    assert rows["n0"]["node_type"] == "THEN" and rows["n0"]["inferred_status"] == "completed"
    assert rows["n0.0"]["result_name"] == "x" and rows["n0.0"]["node_type"] == "SQL"  # the name is on the node
    assert rows["n0.0"]["query"] == "SELECT 1 AS one" and rows["n0.0"]["status"] == "completed"
    assert '"rows": [{"one": 1}]' in rows["n0.0"]["result"]
    assert rows["n0.1"]["node_type"] == "SLEEP" and rows["n0.1"]["inferred_status"] == "completed"
    assert rows["n0.2.1"]["status"] == "completed"
    assert rows["n0.2.2"]["status"] == "pending" and rows["n0.2.2"]["inferred_status"] == "skipped"
    assert rows["n0.2"]["inferred_status"] == "completed"


async def test_a_sql_node_cannot_keep_a_changed_role(dsn: str, roles: tuple[str, str, str]) -> None:
    async with pgd.Runtime(app, dsn):
        alice = await asyncpg.connect(as_user(dsn, roles[0]))
        try:
            await alice.execute("CREATE TABLE t (x int)")
            instance_id = await alice.fetchval(
                "SELECT df.start($$WITH r AS (SELECT set_config('role', 'none', true)) INSERT INTO t SELECT 1 FROM r$$)"
            )
            assert await alice.fetchval("SELECT df.await_instance($1)", instance_id) == "failed"
            assert await alice.fetchval("SELECT count(*) FROM t") == 0
        finally:
            await alice.close()
