"""Hostile tenants: every route a tenant or a client could take to act beyond its role fails,
and nothing of another tenant reaches what the attacker can read (results, errors, node rows, logs).

The runtime here logs in as a non-superuser worker role (``pgdurable.grant_worker``, and a member
of each tenant role so that it may run their SQL as them); ``alice`` and ``bob`` are df tenants
(``df.grant_usage``), ``client`` holds only ``pgdurable.grant_client``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.integration.test_dsl_security import as_user, login_roles
from tests.integration.test_dsl_sql import http_server

app = pgd.App()
SECRET = "bob-s-secret-7f3a"


@dataclass
class Tenants:
    runtime: pgd.Runtime
    admin: asyncpg.Connection
    alice: asyncpg.Connection
    bob: asyncpg.Connection
    client: asyncpg.Connection
    names: dict[str, str]

    async def run(self, conn: asyncpg.Connection, expr: str, *args: Any) -> tuple[str, str]:
        """df.start(expr) as ``conn``'s role; (instance id, final status)."""
        instance_id: str = await conn.fetchval(f"SELECT df.start({expr})", *args)
        return instance_id, await conn.fetchval("SELECT df.await_instance($1, 30)", instance_id)

    async def visible_to(self, conn: asyncpg.Connection, instance_id: str) -> str:
        """Everything ``conn`` can read about an instance, as one text (to look for leaks in)."""
        parts = [str(await conn.fetchrow("SELECT * FROM df.instances WHERE id = $1", instance_id))]
        parts += [str(r) for r in await conn.fetch("SELECT * FROM df.nodes WHERE instance_id = $1", instance_id)]
        parts.append(str(await conn.fetchrow("SELECT * FROM df.instance_info($1)", instance_id)))
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def tenants(dsn: str) -> AsyncIterator[Tenants]:
    suffix = uuid.uuid4().hex[:6]
    names = {k: f"{k}_{suffix}" for k in ("worker", "alice", "bob", "client")}
    w, a, b, c = names["worker"], names["alice"], names["bob"], names["client"]
    grants = (
        f"SELECT pgdurable.grant_worker('{w}')",
        f"SELECT pgdurable.grant_client('{c}')",
        f"SELECT df.grant_usage('{a}'), df.grant_usage('{b}')",
        f'GRANT "{a}", "{b}" TO "{w}"',
        f'GRANT CREATE ON SCHEMA public TO "{a}", "{b}"',
    )
    async with login_roles(dsn, tuple(names.values()), *grants):
        admin = await asyncpg.connect(dsn)
        conns = [await asyncpg.connect(as_user(dsn, names[k])) for k in ("alice", "bob", "client")]
        try:
            await conns[1].execute(f"CREATE TABLE bob_secret (s text); INSERT INTO bob_secret VALUES ('{SECRET}')")
            await conns[0].execute("CREATE TABLE alice_t (x text)")
            async with pgd.Runtime(app, as_user(dsn, w), migrate=False, sweep_interval=5) as runtime:
                yield Tenants(runtime, admin, *conns, names=names)
        finally:
            for conn in (admin, *conns):
                await conn.close()


async def _failed_without_leak(t: Tenants, expr: str) -> str:
    instance_id, status = await t.run(t.alice, expr)
    assert status == "failed", (expr, status)
    seen = await t.visible_to(t.alice, instance_id)
    assert SECRET not in seen, seen
    return seen


# -- 1. a SQL node cannot leave its role, by any route ---------------------------------------------
ROLE_ESCAPES = [
    # the reported hole: drop the role inside the statement, then read dynamically
    "$q$WITH r AS MATERIALIZED (SELECT set_config('role', 'none', true)) "
    "SELECT query_to_xml('SELECT s FROM bob_secret', true, true, '')::text::int FROM r$q$",
    "$q$SELECT set_config('role', 'none', false), (SELECT s FROM bob_secret)$q$",
    "$q$SET ROLE NONE$q$",
    "$q$RESET ROLE$q$",
    "$q$SET SESSION AUTHORIZATION DEFAULT$q$",
    "$q$DO $d$BEGIN EXECUTE 'SET ROLE NONE'; PERFORM (SELECT s FROM bob_secret); END $d$$q$",
    "$q$SELECT set_config('role', '{bob}', true), (SELECT s FROM bob_secret)::int$q$",
]


@pytest.mark.parametrize("escape", ROLE_ESCAPES)
async def test_a_sql_node_cannot_change_its_role(dsn: str, escape: str) -> None:
    async with tenants(dsn) as t:
        seen = await _failed_without_leak(t, escape.replace("{bob}", t.names["bob"]))
        assert "security-definer" in seen or "permission denied" in seen


async def test_a_function_the_tenant_wrote_cannot_change_the_role_either(dsn: str) -> None:
    async with tenants(dsn) as t:
        await t.alice.execute(
            "CREATE FUNCTION public.become_worker() RETURNS text LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM set_config('role', 'none', true); RETURN current_user; END$$"
        )
        await t.alice.execute(
            "CREATE FUNCTION public.become_worker_definer() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS "
            "$$BEGIN RESET ROLE; RETURN current_user; END$$"
        )
        await _failed_without_leak(t, "'SELECT public.become_worker()'")
        await _failed_without_leak(t, "'SELECT public.become_worker_definer()'")
        instance_id, status = await t.run(t.alice, "'INSERT INTO alice_t SELECT current_user RETURNING x'")
        assert status == "completed"
        assert await t.alice.fetchval("SELECT x FROM alice_t") == t.names["alice"]  # ran as alice, not the worker


# -- 2. another tenant's data and the engine's tables stay out of reach -------------------------------
@pytest.mark.parametrize("statement", [
    "'SELECT s FROM bob_secret'",
    "'INSERT INTO bob_secret VALUES (''x'')'",
    "'SELECT count(*) FROM pgdurable.work_queue'",
    "'UPDATE pgdurable.instances SET status = ''completed'''",
    "'SELECT payload::text FROM pgdurable.history'",
    "'DELETE FROM pgdurable.orchestrator_queue'",
])
async def test_other_tenants_tables_and_engine_tables_are_denied(dsn: str, statement: str) -> None:
    async with tenants(dsn) as t:
        seen = await _failed_without_leak(t, statement)
        assert "permission denied" in seen
        assert await t.bob.fetchval("SELECT count(*) FROM bob_secret") == 1


async def test_nothing_stays_behind_in_the_workers_session(dsn: str) -> None:
    async with tenants(dsn) as t:
        # temporary relations would shadow the worker's own tables; prepared statements could be read
        _, status = await t.run(
            t.alice, "'CREATE TEMP TABLE work_queue (id int)' ~> 'CREATE TEMP TABLE instances (id int)'"
            " ~> $$PREPARE alice_stmt AS SELECT 'alice-private'$$")
        assert status == "completed"
        leftover = await t.admin.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname LIKE 'pg\\_temp\\_%' AND c.relname IN ('work_queue', 'instances', 'pgdurable_node')")
        assert leftover == 0
        probes = [await t.run(t.bob, "'SELECT count(*) AS n FROM pg_prepared_statements WHERE from_sql'")
                  for _ in range(8)]
        for instance_id, status in probes:
            assert status == "completed"
            assert (await t.runtime.client.status(instance_id)).output["rows"] == [{"n": 0}]
        # and the worker itself still works: a code orchestration's turn uses the real tables
        assert await (await t.runtime.client.start(echo, 5)).result(timeout=20) == 5


# -- 3. instances and variables of another tenant ---------------------------------------------------------
async def test_another_tenants_instances_and_variables(dsn: str) -> None:
    async with tenants(dsn) as t:
        theirs = await t.bob.fetchval("SELECT df.start(df.wait_for_signal('go', 30))")
        for call in ("SELECT df.signal($1, 'go')", "SELECT df.cancel($1, 'mine now')"):
            with pytest.raises(asyncpg.PostgresError, match="not found or access denied"):
                await t.alice.execute(call, theirs)
        for read in ("SELECT df.status($1)", "SELECT df.result($1)", "SELECT id FROM df.instances WHERE id = $1"):
            assert await t.alice.fetchval(read, theirs) is None
        assert await t.alice.fetchval("SELECT count(*) FROM df.nodes WHERE instance_id = $1", theirs) == 0
        with pytest.raises(asyncpg.PostgresError, match="not found"):
            await t.alice.fetch("SELECT * FROM df.instance_nodes($1)", theirs)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # tenants are not clients of the engine
            await t.alice.execute("SELECT pgdurable.raise_event($1, 'go')", theirs)
        await t.bob.execute("SELECT df.setvar('table', 'bob_secret')")
        assert await t.alice.fetchval("SELECT count(*) FROM df.vars") == 0
        assert await t.alice.fetchval("UPDATE df.vars SET value = 'alice_t' RETURNING 1") is None
        with pytest.raises(asyncpg.PostgresError, match="row-level security"):
            await t.alice.execute("INSERT INTO df.vars (owner, name, value) VALUES ($1::regrole, 'x', 'y')",
                                  t.names["bob"])
        assert await t.bob.fetchval("SELECT df.getvar('table')") == "bob_secret"
        await t.bob.execute("SELECT df.signal($1, 'go')", theirs)
        assert await t.bob.fetchval("SELECT df.await_instance($1, 30)", theirs) == "completed"


# -- 4. df.http needs its grant, by every route --------------------------------------------------------
HTTP_NODE = '{"type": "http", "url": "http://127.0.0.1:9/", "method": "GET"}'


async def test_http_without_the_grant_by_any_route(dsn: str) -> None:
    async with tenants(dsn) as t:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await t.alice.execute("SELECT df.start(df.http('http://127.0.0.1:9/', 'GET'))")
        routes = [
            ("SELECT df.start($1)", HTTP_NODE),  # graph JSON in place of the node function
            ("SELECT df.start($1)", '{"type": "seq", "steps": ["SELECT 1", ' + HTTP_NODE + "]}"),
            ("SELECT df.start($1)", '{"type": "activity", "name": "pgdurable.graph.http", '
                                    '"input": {"url": "http://127.0.0.1:9/", "method": "GET"}}'),
            ("SELECT df.start($1)", '{"type": "activity", "name": "echo_activity", "input": 1}'),
            ("SELECT df.start(df.call('pgdurable.graph', jsonb_build_object('graph', $1::jsonb)))", HTTP_NODE),
        ]
        for call, graph in routes:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await t.alice.execute(call, graph)
        assert await t.admin.fetchval("SELECT count(*) FROM pgdurable.instances") == 0


async def test_a_revoked_http_grant_stops_the_graphs_later_http_nodes(
    dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
    with http_server() as (url, seen):
        async with tenants(dsn) as t:
            alice = t.names["alice"]
            await t.admin.execute(f"SELECT df.grant_usage('{alice}', include_http => true)")
            _, status = await t.run(t.alice, "df.http($1, 'GET')", f"{url}/granted")
            assert status == "completed" and [r["path"] for r in seen] == ["/granted"]
            # the grant is taken back while the graph sleeps before its request: the request is never made
            instance_id = await t.alice.fetchval("SELECT df.start(df.sleep(3) ~> df.http($1, 'GET'))", f"{url}/revoked")
            await t.admin.execute(
                f'REVOKE EXECUTE ON FUNCTION df.http(text, text, text, jsonb, integer) FROM "{alice}"')
            assert await t.alice.fetchval("SELECT df.await_instance($1, 30)", instance_id) == "failed"
            error = await t.alice.fetchval("SELECT error->>'message' FROM df.instances WHERE id = $1", instance_id)
            assert "may no longer use df.http" in error, error
            assert [r["path"] for r in seen] == ["/granted"]


# -- 5. a client role cannot reach the graph interpreter -------------------------------------------------
async def test_a_client_cannot_start_the_graph_interpreter(dsn: str) -> None:
    async with tenants(dsn) as t:
        bad = '{"graph": {"type": "sql", "query": "SELECT count(*) FROM pgdurable.work_queue"}, "role": "%s"}'
        for name in ("pgdurable.graph", "pgdurable.graph.sql", "pgdurable.graph.http"):
            for role in (t.names["alice"], t.names["worker"]):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="built-in"):
                    await t.client.fetchval("SELECT pgdurable.start($1, $2::jsonb)", name, bad % role)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # no df grant: no df.start either
            await t.client.fetchval("SELECT df.start('SELECT 1')")
        async with pgd.Client(as_user(dsn, t.names["client"])) as client:
            with pytest.raises(pgd.InvalidArgument, match="built-in"):
                await client.start("pgdurable.graph", {"graph": {"type": "sql", "query": "SELECT 1"}})
        assert await t.admin.fetchval("SELECT count(*) FROM pgdurable.instances") == 0


async def test_a_code_orchestration_cannot_start_the_interpreter_as_a_child(dsn: str) -> None:
    async with tenants(dsn) as t:
        handle = await t.runtime.client.start(smuggle, t.names["alice"])
        with pytest.raises(pgd.InstanceFailed, match="built-in orchestration"):
            await handle.result(timeout=20)


# -- 6. values cannot change statements --------------------------------------------------------------
async def test_bound_values_and_variables_cannot_change_a_statement(dsn: str) -> None:
    async with tenants(dsn) as t:
        evil = "x'); DROP TABLE alice_t; --"
        _, status = await t.run(
            t.alice, "$$SELECT $v$" + evil + "$v$ AS v$$ |=> 'r' ~> 'INSERT INTO alice_t VALUES ($r)'")
        assert status == "completed"
        assert await t.alice.fetchval("SELECT x FROM alice_t") == evil
        # variables are raw SQL text, but only ever the submitter's own: alice's cannot reach bob's SQL
        await t.alice.execute("SELECT df.setvar('target', 'bob_secret; DROP TABLE bob_secret')")
        _, status = await t.run(t.bob, "'SELECT count(*) AS n FROM {target}'")
        assert status == "failed"  # bob has no variable 'target': the braces stay and the SQL is invalid
        await _failed_without_leak(t, "'SELECT * FROM {target}'")  # alice's own variable, run as alice
        assert await t.bob.fetchval("SELECT count(*) FROM bob_secret") == 1


# -- 7. oversized and malformed graphs ---------------------------------------------------------------
@pytest.mark.parametrize("graph", [
    '{"type": 5}',
    '{"type": "sql"}',
    '{"type": "seq", "steps": {"not": "a list"}}',
    '{"type": "loop"}',
    '{"type": "sql", "query": ',
    '{"type": "wait_for_schedule", "cron": "99 * * * *"}',
])
async def test_malformed_graphs_fail_at_start(dsn: str, graph: str) -> None:
    async with tenants(dsn) as t:
        with pytest.raises(asyncpg.PostgresError):
            await t.alice.fetchval("SELECT df.start($1)", graph)
        assert await t.admin.fetchval("SELECT count(*) FROM pgdurable.instances") == 0


async def test_an_oversized_graph_is_refused(dsn: str) -> None:
    async with tenants(dsn) as t:
        huge = "SELECT '" + "x" * (5 * 1024 * 1024) + "'"
        with pytest.raises(asyncpg.PostgresError, match="too large"):
            await t.alice.fetchval("SELECT df.start($1)", huge)


# -- 8. the worker's role is the boundary, and it says so -------------------------------------------------
async def test_a_worker_that_may_not_act_as_the_submitter_fails_the_node_clearly(dsn: str) -> None:
    async with tenants(dsn) as t:
        await t.admin.execute(f'REVOKE "{t.names["bob"]}" FROM "{t.names["worker"]}"')
        instance_id, status = await t.run(t.bob, "'SELECT 1'")
        assert status == "failed"
        error = (await t.runtime.client.status(instance_id)).error
        assert "may not act as" in str(error) and f"GRANT {t.names['bob']}" in str(error)


async def test_nothing_of_the_secret_in_the_logs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pgdurable_async"):
        async with tenants(dsn) as t:
            for escape in ROLE_ESCAPES[:2]:
                await _failed_without_leak(t, escape)
            await anyio.sleep(0.2)
    assert SECRET not in caplog.text


@app.activity
async def echo_activity(ctx: pgd.ActivityContext, value: Any) -> Any:
    return value


@app.orchestration
async def echo(ctx: pgd.OrchestrationContext, value: Any) -> Any:
    return await ctx.call_activity(echo_activity, value)


@app.orchestration
async def smuggle(ctx: pgd.OrchestrationContext, role: str) -> Any:
    graph = {"type": "sql", "query": "SELECT count(*) FROM pgdurable.work_queue"}
    return await ctx.call_orchestration("pgdurable.graph", {"graph": graph, "role": role})


async def test_df_start_inside_a_security_definer_function_runs_as_its_owner(dsn: str) -> None:
    """As PostgreSQL defines it, and as pg_durable documents it: current_user there is the owner."""
    async with tenants(dsn) as t:
        bob = t.names["bob"]
        await t.bob.execute(
            "CREATE TABLE bob_log (who text);"
            "CREATE FUNCTION public.bob_logs() RETURNS text LANGUAGE sql SECURITY DEFINER AS "
            "$$SELECT df.start('INSERT INTO bob_log SELECT current_user')$$;"
            f"GRANT EXECUTE ON FUNCTION public.bob_logs() TO \"{t.names['alice']}\""
        )
        instance_id = await t.alice.fetchval("SELECT public.bob_logs()")
        assert await t.bob.fetchval("SELECT df.await_instance($1, 30)", instance_id) == "completed"
        assert await t.bob.fetchval("SELECT who FROM bob_log") == bob
        assert await t.bob.fetchval("SELECT submitted_by::text FROM df.instances WHERE id = $1", instance_id) == bob
        assert await t.alice.fetchval("SELECT df.status($1)", instance_id) is None  # bob's, not alice's


# -- the second session (dblink) carries only what was checked in the caller's --------------------------
async def test_nothing_reaches_the_second_session_unchecked(dsn: str) -> None:
    async with tenants(dsn) as t:
        await t.admin.execute("CREATE EXTENSION IF NOT EXISTS dblink")
        theirs = await t.bob.fetchval("SELECT df.start(df.wait_for_signal('go', 30))")
        bob = await t.admin.fetchval("SELECT $1::regrole::oid", t.names["bob"])
        for call in ("SELECT df.signal($1, 'go')", "SELECT df.cancel($1, 'mine now')"):
            with pytest.raises(asyncpg.PostgresError, match="not found or access denied"):
                await t.alice.execute(call, theirs)
        for kind in ("event_received", "cancel_requested"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a request cannot name another role
                await t.alice.execute("INSERT INTO df._requests (kind, instance_id, payload, requested_by)"
                                      " VALUES ($1, $2, '{\"name\": \"go\"}', $3)", kind, theirs, bob)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await t.alice.execute("INSERT INTO df._requests (kind, graph, payload, requested_by) VALUES"
                                  " ('start', '{\"type\": \"sql\", \"query\": \"SELECT s FROM bob_secret\"}',"
                                  " '{\"transaction_mode\": \"new\"}', $1)", bob)
        for helper in ("SELECT df._remote('SELECT 1')", "SELECT df._expire(0)",
                       "SELECT df._create_instance('{}', 'abcdef12', 10)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await t.alice.execute(helper)
        await anyio.sleep(1)
        assert await t.bob.fetchval("SELECT df.status($1)", theirs) == "running"  # nothing was delivered
        assert await t.admin.fetchval("SELECT count(*) FROM pgdurable.instances WHERE submitted_by = $1", bob) == 1
