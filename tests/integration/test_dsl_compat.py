"""pg_durable compatibility of results and variables (USER_GUIDE.md, its e2e tests), through ``df.start``."""

from __future__ import annotations

import pytest

import pgdurable_async as pgd
from pgdurable_async import dsl

from .test_dsl_sql import cell, environment, http_server


# -- result shape (USER_GUIDE "Result Format", e2e 21_typed_results) ---------------------------------
async def test_sql_result_shape(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("'SELECT 42 AS answer'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        assert await env.val("SELECT df.result($1)::jsonb->'rows'->0->>'answer'", instance_id) == "42"
        assert await env.val("SELECT df.result($1)::text", instance_id) == '{"rows": [{"answer": 42}], "row_count": 1}'
        out = await env.run(
            """$$SELECT 123456.78900000::numeric AS n, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
                 '2024-01-02 03:04:05+00'::timestamptz AS tz, '2024-01-02'::date AS d, '{"k": [1]}'::jsonb AS j,
                 'NaN'::float8 AS nan, 2.5::float8 AS f, true AS b, NULL::int AS z$$"""
        )
        assert out["rows"] == [{"n": "123456.78900000", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                                "tz": "2024-01-02T03:04:05+00:00", "d": "2024-01-02", "j": {"k": [1]},
                                "nan": None, "f": 2.5, "b": True, "z": None}]
        await env.conn.execute("CREATE TABLE t (id int, at timestamptz); INSERT INTO t VALUES (1, now()), (2, now())")
        assert await env.run("'UPDATE t SET id = id'") == {"rows": [], "row_count": 0}  # rows returned, not affected
        out = await env.run("'UPDATE t SET id = id + 10 RETURNING id' ~> 'SELECT 1'")
        assert out == {"rows": [{"?column?": 1}], "row_count": 1}


async def test_references_read_the_new_shape(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE t (id int, at timestamptz, price numeric)")
        await env.conn.execute("INSERT INTO t VALUES (1, now() - interval '1 day', 9.50), (2, now(), 1.25)")
        out = await env.run(  # $name.* keeps column types (timestamptz, numeric) without any metadata in sight
            "'SELECT * FROM t ORDER BY id' |=> 'all'"
            " ~> 'SELECT count(*) FILTER (WHERE at > now() - interval ''1 hour''), sum(price) FROM $all.*'"
        )
        assert out["rows"] == [{"count": 1, "sum": "10.75"}]
        out = await env.run("'SELECT price, id FROM t ORDER BY id' |=> 'p' ~> 'SELECT $p + 1 AS a, $p.id AS b'")
        assert out["rows"] == [{"a": "10.50", "b": 1}]  # $p: the first column of the first row
        out = await env.run(
            "'SELECT id FROM t WHERE id > 1' |=> 'r' ~> df.if_rows('r', 'SELECT ''yes''', 'SELECT ''no''')"
        )
        assert cell(out) == "yes"
        out = await env.run("'SELECT 1 AS a' & 'SELECT 2 AS b'")
        assert out == [{"rows": [{"a": 1}], "row_count": 1}, {"rows": [{"b": 2}], "row_count": 1}]
        last = await env.val("SELECT output::text FROM df.instances ORDER BY created_at DESC LIMIT 1")
        assert "_pgdurable" not in last  # the private column types stay out of df.result / df.instances


async def test_python_fan_out_over_a_result(dsn: str) -> None:
    graph = (dsl.sql("SELECT g AS n, g * 1.5 AS x FROM generate_series(1, 3) g").bind("items")
             >> dsl.fan_out(over="items", step="SELECT $item.n * 2 AS d, $item.x AS x"))
    async with environment(dsn) as env:
        out = await (await dsl.start(env.runtime.client, graph)).result(timeout=30)
        assert [r["rows"] for r in out] == [[{"d": 2, "x": "1.5"}], [{"d": 4, "x": "3.0"}], [{"d": 6, "x": "4.5"}]]


# -- {var} and system variables (USER_GUIDE "Variables") --------------------------------------------
async def test_configurable_etl_pipeline(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            "CREATE TABLE raw_orders (id int, amount numeric, at timestamptz);"
            "CREATE TABLE processed_orders (LIKE raw_orders);"
            "INSERT INTO raw_orders SELECT g, g * 1.25, now() FROM generate_series(1, 150) g"
        )
        await env.conn.execute("SELECT df.setvar('source_table', 'raw_orders')")
        await env.conn.execute("SELECT df.setvar('target_table', 'processed_orders')")
        await env.conn.execute("SELECT df.setvar('batch_size', '100')")
        instance_id = await env.start(
            """'SELECT * FROM {source_table} LIMIT {batch_size}::int' |=> 'batch'
    ~> 'INSERT INTO {target_table} SELECT * FROM $batch.*',
    'etl-pipeline'"""
        )
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        assert await env.val("SELECT count(*) FROM processed_orders") == 100
        assert await env.val("SELECT sum(amount) = (SELECT sum(amount) FROM raw_orders WHERE id IN"
                             " (SELECT id FROM processed_orders)) FROM processed_orders")


async def test_system_variables_for_logging(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            "CREATE TABLE audit_log (instance_id text, label text, action text, ts timestamptz);"
            "CREATE FUNCTION process_data() RETURNS int LANGUAGE sql AS 'SELECT 1'"
        )
        instance_id = await env.start(
            """'INSERT INTO audit_log (instance_id, label, action, ts)
     VALUES (''{sys_instance_id}'', ''{sys_label}'', ''started'', now())'
    ~> 'SELECT process_data()'
    ~> 'INSERT INTO audit_log (instance_id, label, action, ts)
        VALUES (''{sys_instance_id}'', ''{sys_label}'', ''completed'', now())',
    'audit-example'"""
        )
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        rows = await env.conn.fetch("SELECT instance_id, label, action FROM audit_log ORDER BY ts, action DESC")
        assert [tuple(r) for r in rows] == [(instance_id, "audit-example", "started"),
                                           (instance_id, "audit-example", "completed")]
        out = await env.run("'SELECT ''{sys_label}'' AS l, ''{unknown}'' AS u'")  # no label: ''; unknown: as written
        assert out["rows"] == [{"l": "", "u": "{unknown}"}]


# -- df.http: {var} URLs, 5xx fails the attempt ------------------------------------------------------
async def test_http_with_variables(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
    example = """df.http('{api_base}/users', 'GET', NULL, '{"Authorization": "Bearer {api_key}"}'::jsonb)
    ~> 'INSERT INTO playground.logs (msg) VALUES (''Fetched users'')',
    'fetch-users'"""
    with http_server() as (base, seen):
        async with environment(dsn) as env:
            await env.conn.execute("CREATE SCHEMA playground; CREATE TABLE playground.logs (msg text)")
            await env.conn.execute("SELECT df.setvar('api_base', $1)", base)
            await env.conn.execute("SELECT df.setvar('api_key', 'secret123')")
            instance_id = await env.start(example)
            assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
            assert [(r["path"], r["authorization"]) for r in seen] == [("/users", "Bearer secret123")]
            assert await env.val("SELECT msg FROM playground.logs") == "Fetched users"


async def test_http_url_variables_from_python(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
    with http_server() as (base, seen):
        async with environment(dsn) as env:
            graph = dsl.http("{api_base}/users", "GET", headers={"Authorization": "Bearer {api_key}"})
            client = env.runtime.client
            handle = await dsl.start(client, graph, vars={"api_base": base, "api_key": "k"})
            out = await handle.result(timeout=30)
            assert out["status"] == 200 and [(r["path"], r["authorization"]) for r in seen] == [("/users", "Bearer k")]
            with pytest.raises(pgd.InstanceFailed, match="not an http"):
                await (await dsl.start(client, graph, vars={"api_base": "ftp://x"})).result(timeout=30)


async def test_http_5xx_fails_the_attempt_and_retries(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
    with http_server([503, 404]) as (base, seen):
        async with environment(dsn) as env:
            out = await env.run(f"df.http('{base}/flaky', 'GET')")  # 503, retried: 404 completes (ok false)
            assert out["status"] == 404 and out["ok"] is False and len(seen) == 2
    with http_server([500, 500, 500]) as (base, seen):
        async with environment(dsn) as env:
            with pytest.raises(pgd.InstanceFailed, match="returned 500"):
                await env.run(f"df.http('{base}/down', 'GET')")
            assert len(seen) == 3  # the retry policy's attempts


# -- sleep result, truthiness -------------------------------------------------------------------------
async def test_sleep_result_and_condition_truthiness(dsn: str) -> None:
    async with environment(dsn) as env:
        assert await env.run("df.sleep(1)") == {"slept": True, "seconds": 1}
        for value, expected in [("off", "then"), ("n", "then"), ("no", "else"), ("0.0", "else"), ("", "else"),
                                ("t", "then"), ("2", "then")]:
            out = await env.run(f"'SELECT ''{value}''' ?> 'SELECT ''then''' !> 'SELECT ''else'''")
            assert cell(out) == expected, value
