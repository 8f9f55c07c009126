"""The ``df`` SQL surface against pg_durable's own DDL: volatility, result types, argument
names, return strings, relation columns, role names that are not plain identifiers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

import pgdurable_async as pgd

from .test_dsl_security import login_roles

app = pgd.App()

# pg_durable's argument lists (its catalog), for the functions we install under its names.
PG_DURABLE_ARGS = {
    "as": "fut text, name text",
    "await_instance": "instance_id text, timeout_seconds double precision DEFAULT 30",  # integer there
    "break": "value text DEFAULT NULL::text",
    "cancel": "instance_id text, reason text DEFAULT 'Cancelled by user'::text",
    "clearvars": "",
    "explain": "input text",
    "getvar": "name text",
    "grant_usage": "p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false",
    "http": "url text, method text DEFAULT 'POST'::text, body text DEFAULT NULL::text, "
    "headers jsonb DEFAULT NULL::jsonb, timeout_seconds integer DEFAULT 30",
    "instance_executions": "instance_id text, limit_count integer DEFAULT 5",
    "join": "a text, b text",
    "join3": "a text, b text, c text",
    "race": "a text, b text",
    "result": "instance_id text",
    "revoke_usage": "p_role text",
    "setvar": "name text, value text",
    "signal": "instance_id text, signal_name text, signal_data text DEFAULT '{}'::text",
    "sql": "query text",
    "start": "fut text, label text DEFAULT NULL::text, database text DEFAULT NULL::text, "
    "transaction_mode text DEFAULT 'caller'::text",
    "status": "instance_id text",
    "unsetvar": "name text",
    "wait_for_schedule": "cron_expr text",
}


async def test_signatures_volatility_and_strictness(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, pg_get_function_arguments(p.oid) AS args, pg_get_function_result(p.oid) AS result,"
            " p.provolatile::text AS volatile, p.proisstrict AS strict"
            " FROM pg_proc p WHERE p.pronamespace = 'df'::regnamespace AND p.proname !~ '^_'"
        )
        by_name = {r["proname"]: r for r in rows}
        for name, args in PG_DURABLE_ARGS.items():
            assert by_name[name]["args"] == args, name
        assert by_name["if"]["args"].startswith("condition text, then_branch text, else_branch text")
        assert by_name["if_rows"]["args"].startswith("result_name text, then_branch text, else_branch text")
        assert by_name["wait_for_signal"]["args"].startswith("name text, timeout_seconds ")
        assert by_name["instance_nodes"]["args"] == "instance_id_param text"
        for name in ("cancel", "result", "setvar", "unsetvar", "clearvars", "signal", "status", "getvar"):
            assert by_name[name]["result"] == "text", name
        # everything that reads or writes state is VOLATILE (builders are pure)
        for r in rows:
            if r["proname"] in ("status", "result", "getvar", "list_instances", "instance_info", "instance_nodes",
                                "instance_executions", "metrics", "explain", "await_instance", "cancel", "signal",
                                "setvar", "start"):
                assert r["volatile"] == "v", r["proname"]
        for name in ("sql", "seq", "join", "race", "as", "status", "result", "explain", "cancel", "signal"):
            assert any(r["strict"] for r in rows if r["proname"] == name), name
        assert await conn.fetchval("SELECT df.sql(NULL) IS NULL AND df.seq(NULL, 'SELECT 1') IS NULL") is True
        assert await conn.fetchval("SELECT df.status(NULL) IS NULL AND df.result(NULL) IS NULL") is True
    finally:
        await conn.close()


async def test_state_reads_see_what_await_instance_waited_for(dsn: str) -> None:
    async with pgd.Runtime(app, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            instance_id = await conn.fetchval("SELECT df.start('SELECT pg_sleep(0.5), 42 AS answer', 'slow')")
            row = await conn.fetchrow(
                "SELECT df.await_instance($1, 30) AS awaited, df.status($1) AS status, df.result($1) AS result,"
                " left(df.result($1), 40) AS head",
                instance_id,
            )
            assert row["awaited"] == row["status"] == "completed"
            assert isinstance(row["result"], str) and "42" in row["result"] and row["head"]
            # named arguments, as pg_durable spells them
            assert await conn.fetchval(
                "SELECT df.await_instance(instance_id => $1, timeout_seconds => 5)", instance_id) == "completed"

            listed = await conn.fetchrow("SELECT * FROM df.list_instances() WHERE instance_id = $1", instance_id)
            assert listed["execution_count"] == 1 and isinstance(listed["output"], str)
            paged = await conn.fetchrow("SELECT * FROM df.list_instances(NULL, 10, 'slow')")
            assert paged["instance_id"] == instance_id and isinstance(paged["output"], str)
            with pytest.raises(asyncpg.PostgresError, match="exceeds"):
                await conn.fetch("SELECT * FROM df.list_instances(NULL, 1001)")
            with pytest.raises(asyncpg.PostgresError, match="exceeds"):
                await conn.fetch("SELECT * FROM df.list_instances(NULL, 5000, NULL)")
            with pytest.raises(asyncpg.PostgresError, match="at least 1"):
                await conn.fetch("SELECT * FROM df.list_instances(NULL, 0)")

            info = await conn.fetchrow("SELECT * FROM df.instance_info($1)", instance_id)
            assert list(info.keys()) == ["instance_id", "label", "function_name", "function_version",
                                         "current_execution_id", "status", "output"]
            assert info["current_execution_id"] == 1 and info["status"] == "completed" and "42" in info["output"]
            runs = await conn.fetch(
                "SELECT * FROM df.instance_executions(instance_id => $1, limit_count => 3)", instance_id)
            assert len(runs) == 1 and runs[0]["execution_id"] == 1 and runs[0]["status"] == "Completed"
            assert runs[0]["event_count"] >= 2 and runs[0]["duration_ms"] >= 0 and "42" in runs[0]["output"]
            assert await conn.fetch("SELECT * FROM df.instance_executions('00000000')") == []
            metrics = await conn.fetch("SELECT * FROM df.metrics()")
            assert len(metrics) == 1 and list(metrics[0].keys()) == [
                "total_instances", "running_instances", "completed_instances", "failed_instances",
                "total_executions", "total_events"]
            assert metrics[0]["completed_instances"] >= 1 and metrics[0]["total_events"] >= 2

            cols = await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
                " WHERE attrelid = $1::regclass AND attnum > 0 ORDER BY attnum", "df.instances")
            assert [(c["attname"], c["type"]) for c in cols][:9] == [
                ("id", "character varying(8)"), ("label", "text"), ("root_node", "character varying(8)"),
                ("status", "text"), ("submitted_by", "regrole"), ("database", "text"),
                ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
                ("completed_at", "timestamp with time zone")]
            inst = await conn.fetchrow("SELECT * FROM df.instances WHERE id = $1", instance_id)
            root = await conn.fetchval("SELECT node_id FROM df._node_rows($1) WHERE path = 'n0'", instance_id)
            assert inst["root_node"] == root and inst["database"] == await conn.fetchval("SELECT current_database()")
            types = dict(await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'df.nodes'::regclass AND attnum > 0"))
            for name, type_ in [("id", "text"), ("instance_id", "character varying(8)"), ("result", "jsonb"),
                                ("error", "text"), ("submitted_by", "regrole"), ("database", "text"),
                                ("created_at", "timestamp with time zone"), ("status_details", "jsonb")]:
                assert types[name] == type_, name
            node = await conn.fetchrow(
                "SELECT * FROM df.nodes WHERE instance_id = $1 AND node_type = 'SQL'", instance_id)
            assert node["status"] == "completed" and node["error"] is None and "42" in node["result"]
            nodes = await conn.fetch("SELECT * FROM df.instance_nodes(instance_id_param => $1)", instance_id)
            assert len(nodes) == 1

            # df.explain: an unknown id, a DSL expression given as text, a plain SQL statement
            assert await conn.fetchval("SELECT df.explain('0000abcd')") == "Instance '0000abcd' not found"
            assert "✓ completed" in await conn.fetchval("SELECT df.explain($1)", instance_id)
            outline = await conn.fetchval("SELECT df.explain($$ df.sql('SELECT 1') ~> df.sleep(60) $$)")
            assert outline.splitlines() == ["SQL: SELECT 1", "→ SLEEP 60s"]
            assert (await conn.fetchval("SELECT df.explain('SELECT 2')")).splitlines() == ["SQL: SELECT 2"]
        finally:
            await conn.close()


async def test_control_functions_return_pg_durables_strings(dsn: str) -> None:
    async with pgd.Runtime(app, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            waiting = await conn.fetchval(
                "SELECT df.start(df.wait_for_signal(name => 'go', timeout_seconds => 60)"
                " ~> df.if(condition => 'SELECT true', then_branch => 'SELECT 1', else_branch => 'SELECT 2'))")
            assert await conn.fetchval("SELECT df.signal($1, 'go', '{\"ok\": true}')", waiting) == "OK"
            assert await conn.fetchval("SELECT df.await_instance($1, 30)", waiting) == "completed"
            stuck = await conn.fetchval("SELECT df.start(df.wait_for_signal('never'))")
            cancelled = await conn.fetchval("SELECT df.cancel($1)", stuck)
            assert cancelled == f"Instance {stuck} cancelled: Cancelled by user"
            assert await conn.fetchval("SELECT df.await_instance($1, 30)", stuck) == "cancelled"
            other = await conn.fetchval("SELECT df.start(df.wait_for_signal('never'))")
            assert await conn.fetchval(
                "SELECT df.cancel(instance_id => $1, reason => 'Manual stop')", other
            ) == f"Instance {other} cancelled: Manual stop"
            assert await conn.fetchval("SELECT df.await_instance($1, 30)", other) == "cancelled"
            broken = await conn.fetchval("SELECT df.start('SELECT 1/0')")
            assert await conn.fetchval("SELECT df.await_instance($1, 30)", broken) == "failed"
            error = await conn.fetchval("SELECT error FROM df.nodes WHERE instance_id = $1", broken)
            assert "division by zero" in error
            assert await conn.fetchval("SELECT df.result($1)", broken) is None
            with pytest.raises(asyncpg.PostgresError, match="not found"):
                await conn.fetchval("SELECT df.cancel('0000abcd')")
            with pytest.raises(asyncpg.PostgresError, match="not found"):
                await conn.fetchval("SELECT df.signal('0000abcd', 'go')")
            assert await conn.fetchval("SELECT df.setvar('k', 'v')") == "OK"
            assert await conn.fetchval("SELECT df.unsetvar('k')") == "OK"
            assert await conn.fetchval("SELECT df.clearvars()") == "OK"
            # a URL may start with a variable, substituted when the node runs
            node = await conn.fetchval("SELECT df.http('{api_base}/users', 'GET', timeout_seconds => 5)")
            assert '"url": "{api_base}/users"' in node and '"timeout": 5' in node
            with pytest.raises(asyncpg.PostgresError, match="not an http"):
                await conn.fetchval("SELECT df.http('ftp://example.com/x')")
            if_rows = await conn.fetchval(
                "SELECT df.if_rows(result_name => 'r', then_branch => 'SELECT 1', else_branch => 'SELECT 2')")
            assert '"type": "if_rows"' in if_rows
        finally:
            await conn.close()


@pytest.fixture
async def odd_roles(dsn: str) -> AsyncIterator[tuple[str, ...]]:
    """Roles whose names are not plain identifiers: a space, upper case."""
    suffix = uuid.uuid4().hex[:6]
    names = (f"Audit Quoted {suffix}", f"labUser{suffix}")
    grant = f"SELECT df.grant_usage(p_role => '{names[0]}'), df.grant_usage('{names[1]}')"
    async with login_roles(dsn, names, grant) as created:
        yield created


async def test_role_names_that_need_quoting(dsn: str, odd_roles: tuple[str, ...]) -> None:
    async with pgd.Runtime(app, dsn):
        for name in odd_roles:
            conn = await asyncpg.connect(dsn, user=name)
            try:
                assert await conn.fetchval("SELECT df.setvar('who', 'me')") == "OK"
                assert await conn.fetchval("SELECT df.getvar('who')") == "me"
                assert await conn.fetchval("SELECT count(*) FROM df.vars") == 1
                instance_id = await conn.fetchval("SELECT df.start('SELECT current_user AS u, ''{who}'' AS w')")
                assert await conn.fetchval("SELECT df.await_instance($1, 30)", instance_id) == "completed"
                result = await conn.fetchval("SELECT df.result($1)", instance_id)
                assert name in result and "me" in result  # ran as the role, with its variable
                assert await conn.fetchval(
                    "SELECT submitted_by::oid = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
                    " FROM df.instances WHERE id = $1", instance_id) is True
                assert await conn.fetchval("SELECT count(*) FROM df.list_instances()") == 1
                assert await conn.fetchval("SELECT df.unsetvar('who')") == "OK"
                assert await conn.fetchval("SELECT df.getvar('who')") is None
                await conn.execute("SELECT df.setvar('a', '1'), df.setvar('b', '2')")
                assert await conn.fetchval("SELECT df.clearvars()") == "OK"
                assert await conn.fetchval("SELECT count(*) FROM df.vars") == 0
            finally:
                await conn.close()
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute("SELECT df.revoke_usage(p_role => $1)", odd_roles[0])
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn, user=odd_roles[0])
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT df.start('SELECT 1')")
        finally:
            await conn.close()
