"""Cancel and signal act at once, 'new'-mode starts survive a rollback, identity edge cases, retention.

pg_durable hands signals, cancels and 'new'-mode starts to its background worker on a session of
its own; ours open that second session with dblink (as the schema owner) when the extension is
there.  These tests run against a real database with a worker in this process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import asyncpg
import pytest

import pgdurable_async as pgd
from tests.integration.test_dsl_security import as_user, login_roles
from tests.integration.test_dsl_sql import environment


async def wait_until(conn: asyncpg.Connection, query: str, *args: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await conn.fetchval(query, *args):
        assert time.monotonic() < deadline, query
        await asyncio.sleep(0.05)


# -- cancel -----------------------------------------------------------------------------------------
async def test_cancel_marks_the_instance_cancelled_at_once_and_it_stays_so(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE reached (n int)")
        instance_id = await env.start("'SELECT pg_sleep(1)' ~> 'INSERT INTO reached VALUES (1)'")
        await wait_until(env.conn, "SELECT status = 'running' FROM df.instances WHERE id = $1", instance_id)
        async with env.conn.transaction():
            await env.conn.fetchval("SELECT df.cancel($1, 'no longer needed')", instance_id)
            assert await env.val("SELECT df.status($1)", instance_id) == "cancelled"  # before the commit
        with pytest.raises(pgd.Cancelled):
            await env.runtime.client.wait(instance_id, timeout=10)
        await wait_until(env.conn, "SELECT EXISTS (SELECT 1 FROM pgdurable.history WHERE instance_id = $1"
                                   " AND event_type = 'orchestration_cancelled')", instance_id)
        await asyncio.sleep(1.5)  # the SQL node's completion arrives after the cancel: it changes nothing
        assert await env.val("SELECT df.status($1)", instance_id) == "cancelled"
        assert await env.val("SELECT count(*) FROM reached") == 0
        info = await env.conn.fetchrow("SELECT * FROM df.instance_info($1)", instance_id)
        assert info["status"] == "cancelled"


# -- signals on a second session -------------------------------------------------------------------
async def test_signal_then_await_in_one_transaction(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
        instance_id = await env.start("df.wait_for_signal('go') |=> 's' ~> 'SELECT $s.data'")
        await wait_until(env.conn, "SELECT EXISTS (SELECT 1 FROM df.instance_nodes($1)"
                                   " WHERE node_type = 'SIGNAL' AND inferred_status = 'running')", instance_id)
        async with env.conn.transaction():
            await env.conn.fetchval("""SELECT df.signal($1, 'go', '{"ok": true}')""", instance_id)
            assert await env.val("SELECT df.await_instance($1, 10)", instance_id) == "completed"


async def test_without_dblink_a_signal_is_delivered_at_commit(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("df.wait_for_signal('go')")
        await wait_until(env.conn, "SELECT EXISTS (SELECT 1 FROM df.instance_nodes($1)"
                                   " WHERE node_type = 'SIGNAL' AND inferred_status = 'running')", instance_id)
        async with env.conn.transaction():
            await env.conn.fetchval("SELECT df.signal($1, 'go')", instance_id)
            with pytest.raises(asyncpg.QueryCanceledError, match="still running"):
                async with env.conn.transaction():  # a savepoint: the timeout does not end the transaction
                    await env.val("SELECT df.await_instance($1, 1)", instance_id)
        assert await env.val("SELECT df.await_instance($1, 10)", instance_id) == "completed"


# -- transaction_mode => 'new' ------------------------------------------------------------------------
async def test_new_mode_survives_a_rollback_for_an_ordinary_role(dsn: str) -> None:
    tenant = f"newmode_{uuid.uuid4().hex[:6]}"
    async with environment(dsn) as env, login_roles(
        dsn, (tenant,), "CREATE EXTENSION IF NOT EXISTS dblink", "CREATE TABLE public.audit (msg text)",
        f"GRANT INSERT ON public.audit TO {tenant}", f"SELECT df.grant_usage('{tenant}')",
    ):
        conn = await asyncpg.connect(as_user(dsn, tenant))
        try:
            tx = conn.transaction()
            await tx.start()
            survivor = await conn.fetchval(
                "SELECT df.start('INSERT INTO public.audit VALUES (''kept'')', 'survivor', transaction_mode => 'new')")
            await tx.rollback()
            assert len(survivor) == 8
            assert await conn.fetchval("SELECT df.await_instance($1, 10)", survivor) == "completed"
            assert await conn.fetchval("SELECT submitted_by::text FROM df.instances WHERE id = $1", survivor) == tenant
            with pytest.raises(asyncpg.InvalidParameterValueError, match="invalid transaction_mode"):
                await conn.fetchval("SELECT df.start('SELECT 1', NULL, NULL, 'detached')")
        finally:
            await conn.close()
        assert await env.val("SELECT array_agg(msg) FROM public.audit") == ["kept"]


# -- identity ----------------------------------------------------------------------------------------
async def test_an_instance_whose_submitter_was_dropped_stays_visible_as_failed(dsn: str) -> None:
    tenant = f"gone_{uuid.uuid4().hex[:6]}"
    async with environment(dsn) as env:
        await env.conn.execute(f"CREATE ROLE {tenant} LOGIN")
        await env.val(f"SELECT df.grant_usage('{tenant}')")
        conn = await asyncpg.connect(as_user(dsn, tenant))
        try:
            instance_id = await conn.fetchval("SELECT df.start(df.sleep(1) ~> 'SELECT 1')")
        finally:
            await conn.close()
        await env.conn.execute(f"DROP OWNED BY {tenant}; DROP ROLE {tenant}")
        assert await env.val("SELECT df.await_instance($1, 15)", instance_id) == "failed"
        row = await env.conn.fetchrow("SELECT status, submitted_by::text AS who FROM df.instances WHERE id = $1",
                                      instance_id)
        assert row["status"] == "failed" and row["who"].isdigit()  # the role's number: it has no name any more
        assert "no longer exists" in await env.val(
            "SELECT error FROM df.nodes WHERE instance_id = $1 AND node_type = 'SQL'", instance_id)


async def test_security_definer_start_records_its_owner(dsn: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    owner, caller = f"definer_{suffix}", f"caller_{suffix}"
    async with environment(dsn) as env, login_roles(
        dsn, (owner, caller), f"SELECT df.grant_usage('{owner}'), df.grant_usage('{caller}')",
        f"GRANT CREATE ON SCHEMA public TO {owner}",
    ):
        conn = await asyncpg.connect(as_user(dsn, owner))
        try:
            await conn.execute(
                f"CREATE FUNCTION public.start_as_{owner}() RETURNS text LANGUAGE sql SECURITY DEFINER"
                " AS $$ SELECT df.start('SELECT current_user::text AS who') $$;"
                f" GRANT EXECUTE ON FUNCTION public.start_as_{owner}() TO {caller}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(as_user(dsn, caller))
        try:
            instance_id = await conn.fetchval(f"SELECT public.start_as_{owner}()")
        finally:
            await conn.close()
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        assert await env.val("SELECT submitted_by::text FROM df.instances WHERE id = $1", instance_id) == owner
        assert owner in await env.val("SELECT df.result($1)", instance_id)  # and it ran as the owner


async def test_a_delegated_admin_revokes_what_it_granted(dsn: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    admin, app_role = f"admin_{suffix}", f"app_{suffix}"
    async with login_roles(dsn, (admin, app_role), f"SELECT df.grant_usage('{admin}', with_grant => true)"):
        conn = await asyncpg.connect(as_user(dsn, admin))
        try:
            await conn.execute(f"SELECT df.grant_usage('{app_role}')")
            assert await conn.fetchval(f"SELECT has_schema_privilege('{app_role}', 'df', 'USAGE')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # it has no df.http to give
                await conn.execute(f"SELECT df.grant_usage('{app_role}', include_http => true)")
            await conn.execute(f"SELECT df.revoke_usage('{app_role}')")
            assert not await conn.fetchval(f"SELECT has_schema_privilege('{app_role}', 'df', 'USAGE')")
            await conn.execute(f"SELECT df.revoke_usage('{admin}')")  # its own grant is not its to revoke
            assert await conn.fetchval(f"SELECT has_schema_privilege('{admin}', 'df', 'USAGE')")
        finally:
            await conn.close()
        owner = await asyncpg.connect(dsn)
        try:
            await owner.execute(f"SELECT df.grant_usage('{app_role}')")
            await owner.execute(f"SELECT df.revoke_usage('{admin}')")
            assert not await owner.fetchval(f"SELECT has_schema_privilege('{admin}', 'df', 'USAGE')")
        finally:
            await owner.close()


async def test_superuser_instances_are_off_unless_switched_on(dsn: str) -> None:
    database = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" RESET pg_durable.enable_superuser_instances')
    finally:
        await admin.close()
    async with environment(dsn) as env:  # the worker's sessions: the setting is off
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="superuser instances are disabled"):
            await env.start("'SELECT 1'")
        await env.conn.execute("SET pg_durable.enable_superuser_instances = on")  # this session only
        instance_id = await env.start("'SELECT 1'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "failed"
        assert "superuser instances are disabled" in await env.val(
            "SELECT error FROM df.nodes WHERE instance_id = $1", instance_id)


# -- retention -----------------------------------------------------------------------------------------
async def test_finished_df_instances_expire_by_age_and_by_count(dsn: str) -> None:
    async with environment(dsn) as env:
        done = [await env.start("'SELECT 1'") for _ in range(3)]
        for instance_id in done:
            assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        waiting = await env.start("df.wait_for_signal('never')")
        assert await env.val("SELECT df._expire(30, 2)") == 1  # the cap keeps the newest two
        left = {r["id"] for r in await env.conn.fetch("SELECT id FROM df.instances")}
        assert waiting in left and len(set(done) - left) == 1
        assert await env.val("SELECT df._expire(0)") == 2  # past the window: every finished one
        assert {r["id"] for r in await env.conn.fetch("SELECT id FROM df.instances")} == {waiting}
        assert await env.val("SELECT count(*) FROM pgdurable.history WHERE instance_id = ANY($1)", done) == 0
