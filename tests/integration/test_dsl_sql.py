"""pg_durable's documented examples (docs/grammar.md, docs/api-reference.md, USER_GUIDE.md),
run unchanged through ``df.start`` on the plain-SQL ``df`` layer with our worker.

Where an example cannot run as printed (a 24-hour timer, an external URL), the
change is named in the test.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async._graph import interpreter

app = pgd.App()


@app.orchestration
async def double(ctx: pgd.OrchestrationContext, x: Any) -> Any:
    return {"doubled": (x or {}).get("n", 0) * 2}


@dataclass
class Env:
    conn: asyncpg.Connection
    runtime: pgd.Runtime

    async def start(self, expr: str, *args: Any) -> str:
        instance_id: str = await self.conn.fetchval(f"SELECT df.start({expr})", *args)
        assert len(instance_id) == 8 and int(instance_id, 16) >= 0
        return instance_id

    async def run(self, expr: str, *args: Any, timeout: float = 30) -> Any:
        return await self.runtime.client.wait(await self.start(expr, *args), timeout=timeout)

    async def val(self, query: str, *args: Any) -> Any:
        return await self.conn.fetchval(query, *args)


@contextlib.asynccontextmanager
async def environment(dsn: str) -> AsyncIterator[Env]:
    """A runtime and a plain connection (the runtime lives in the test's own task)."""
    async with pgd.Runtime(app, dsn, sweep_interval=5) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            yield Env(conn, runtime)
        finally:
            await conn.close()


def cell(out: dict[str, Any]) -> Any:
    """The only value of a one-column result (pg_durable's shape: rows of objects)."""
    (value,) = out["rows"][0].values()
    return value


# -- grammar.md: sequence, join, race --------------------------------------------------------
async def test_sequence_operator_and_functions(dsn: str) -> None:
    async with environment(dsn) as env:
        assert cell(await env.run("'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3'")) == 3
        assert cell(await env.run("df.seq(df.seq('SELECT 1', 'SELECT 2'), 'SELECT 3')")) == 3
        assert cell(await env.run("df.seq('SELECT 1', 'SELECT 2', 'SELECT 3', 'SELECT 4')")) == 4  # variadic form
        assert cell(await env.run("df.sql('SELECT 1') ~> df.sql('SELECT 2')")) == 2
        assert cell(await env.run("'SELECT 1'")) == 1  # auto-wrapped


async def test_parallel_join_runs_branches_at_once(dsn: str) -> None:
    async with environment(dsn) as env:
        started = time.monotonic()
        out = await env.run("'SELECT pg_sleep(1)' & 'SELECT pg_sleep(2)'")
        assert len(out) == 2
        assert time.monotonic() - started < 2.9  # 1 s and 2 s side by side, not 3 s in a row
        out = await env.run("df.join3('SELECT 1', 'SELECT 2', 'SELECT 3')")
        assert [cell(o) for o in out] == [1, 2, 3]
        out = await env.run("df.join('SELECT count(*) FROM pg_class', 'SELECT 2')")
        assert cell(out[1]) == 2


async def test_race_first_wins(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("df.sleep(10) | df.wait_for_signal('cancel')")
        await env.conn.execute("SELECT df.signal($1, 'cancel')", instance_id)
        out = await env.runtime.client.wait(instance_id, timeout=30)
        assert out["signal_name"] == "cancel" and out["timed_out"] is False
        out = await env.run("df.race(df.sleep(0.2), df.wait_for_signal('never'))")
        assert out == {"slept": True, "seconds": 0.2}  # the timer won


# -- binding with every reference form --------------------------------------------------------
async def test_bind_and_reference_forms(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            """CREATE TABLE users (id int PRIMARY KEY, email text, active bool);
               INSERT INTO users VALUES (7, 'a@x', true), (8, 'b@x', false);
               CREATE TABLE orders (id int, user_id int, amount numeric);
               INSERT INTO orders VALUES (1, 7, 10), (2, 7, 5), (3, 8, 1);"""
        )
        out = await env.run(
            "'SELECT id FROM users LIMIT 1' |=> 'user_id'\n"
            "~> 'SELECT * FROM orders WHERE user_id = $user_id'"
        )
        assert [r["id"] for r in out["rows"]] == [1, 2] and out["row_count"] == 2
        # $name.column
        out = await env.run("df.as('SELECT id, email FROM users ORDER BY id', 'u') ~> 'SELECT $u.email'")
        assert cell(out) == "a@x"
        out = await env.run(
            "'SELECT id FROM users WHERE false' |=> 'none' ~> 'SELECT $none? IS NULL AS a, $none.id? IS NULL AS b'"
        )
        assert out["rows"] == [{"a": True, "b": True}]  # $name? / $name.column?: NULL on no rows
        out = await env.run(
            "'SELECT id, active FROM users ORDER BY id' |=> 'all_users'"
            " ~> 'SELECT sum(id) AS s, count(*) FILTER (WHERE active) AS a FROM $all_users.*'"
        )
        assert out["rows"] == [{"s": 15, "a": 1}]  # $name.*: a typed row set
        with pytest.raises(pgd.InstanceFailed, match="no rows"):
            await env.run("'SELECT id FROM users WHERE false' |=> 'none' ~> 'SELECT $none'")


async def test_bound_values_are_parameters_never_spliced(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            "CREATE TABLE notes (body text); CREATE TABLE victims (id int); INSERT INTO victims VALUES (1)"
        )
        evil = "x'); DROP TABLE victims; --"
        out = await env.run(
            "$q$SELECT 'x''); DROP TABLE victims; --' AS v$q$ |=> 'v'"
            " ~> 'INSERT INTO notes VALUES ($v) RETURNING body'"
            " ~> 'SELECT count(*) FROM victims'"
        )
        assert cell(out) == 1
        assert await env.val("SELECT body FROM notes") == evil
        await env.conn.execute("SELECT df.setvar('sku', $1)", "W' OR '1'='1")
        await env.conn.execute("CREATE TABLE products (sku text); INSERT INTO products VALUES ('WIDGET-001')")
        out = await env.run("'SELECT count(*) FROM products WHERE sku = ''{sku}'''")
        assert cell(out) == 1  # {var} is raw SQL text, as in pg_durable: the variable's quotes are SQL
        await env.conn.execute("SELECT df.setvar('sku', 'WIDGET-001')")
        assert cell(await env.run("'SELECT count(*) FROM products WHERE sku = ''{sku}'''")) == 1
        assert await env.val("SELECT df.getvar('sku')") == "WIDGET-001"
        await env.conn.execute("SELECT df.unsetvar('sku'); SELECT df.clearvars()")
        assert await env.val("SELECT df.getvar('sku')") is None


# -- conditionals ---------------------------------------------------------------------------------
async def test_if_else_operators_and_function(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            """CREATE TABLE users (id int); CREATE TABLE accounts (id int, balance numeric, status text);
               INSERT INTO accounts VALUES (1, 150, NULL)"""
        )
        out = await env.run(
            "'SELECT count(*) > 0 FROM users'\n    ?> 'SELECT ''has users'''\n    !> 'SELECT ''no users'''"
        )
        assert cell(out) == "no users"
        await env.conn.execute("INSERT INTO users VALUES (1)")
        out = await env.run("'SELECT count(*) > 0 FROM users' ?> 'SELECT ''has users''' !> 'SELECT ''no users'''")
        assert cell(out) == "has users"
        await env.run(
            """df.if(
                'SELECT balance > 100 FROM accounts WHERE id = 1',
                'UPDATE accounts SET status = ''gold'' WHERE id = 1',
                'UPDATE accounts SET status = ''standard'' WHERE id = 1'
            )"""
        )
        assert await env.val("SELECT status FROM accounts WHERE id = 1") == "gold"
        example = "df.if('SELECT count(*) > 0 FROM q', 'SELECT ''yes''', 'SELECT ''no''')"
        out = await env.run(example.replace(" q'", " users'"))  # the api-reference example, on table users
        assert cell(out) == "yes"


async def test_if_rows(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            """CREATE SCHEMA playground;
               CREATE TABLE playground.orders (id int, status text);
               CREATE TABLE playground.logs (msg text);
               INSERT INTO playground.orders VALUES (1, 'pending'), (2, 'done')"""
        )
        example = """
        $$SELECT id FROM playground.orders WHERE status = 'pending'$$ |=> 'pending'
        ~> df.if_rows(
            'pending',
            $$UPDATE playground.orders SET status = 'processing' WHERE id = $pending.id$$,
            $$INSERT INTO playground.logs (msg) VALUES ('No pending orders')$$
        ), 'check-pending'"""
        await env.run(example)
        assert await env.val("SELECT status FROM playground.orders WHERE id = 1") == "processing"
        await env.run(example)
        assert await env.val("SELECT msg FROM playground.logs") == "No pending orders"
        assert await env.val("SELECT count(*) FROM df.list_instances() WHERE label = 'check-pending'") == 2


# -- loops ---------------------------------------------------------------------------------------------
async def test_while_loop_and_break(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            """CREATE TABLE queue (id int); INSERT INTO queue SELECT generate_series(1, 3);
               CREATE TABLE done_items (id int);
               CREATE FUNCTION process_item() RETURNS int LANGUAGE sql AS
                 'WITH d AS (DELETE FROM queue WHERE id = (SELECT min(id) FROM queue) RETURNING id)
                  INSERT INTO done_items SELECT id FROM d RETURNING id';
               CREATE TABLE batches (n int); INSERT INTO batches VALUES (0);
               CREATE FUNCTION process_batch() RETURNS jsonb LANGUAGE sql AS
                 'UPDATE batches SET n = n + 1 RETURNING jsonb_build_object(''done'', n >= 2)';"""
        )
        await env.run(
            """df.loop(
                'SELECT process_item()',
                'SELECT count(*) > 0 FROM queue'  -- while queue has items
            )"""
        )
        assert await env.val("SELECT array_agg(id ORDER BY id) FROM done_items") == [1, 2, 3]
        out = await env.run(
            """df.loop(
                'SELECT process_batch()' |=> 'batch'
                ~> (
                    '$batch.done'
                        ?> df.break('{"status": "complete"}')  -- exit with value
                        !> df.sleep(5)
                )
            )""",
            timeout=60,
        )
        assert out == {"status": "complete"}
        assert await env.val("SELECT n FROM batches") == 2


async def test_forever_loop_escaped_by_race_and_schedule(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute(
            """CREATE TABLE runs (at timestamptz DEFAULT now());
               CREATE PROCEDURE process_queue() LANGUAGE sql AS 'INSERT INTO runs DEFAULT VALUES';
               CREATE TABLE heartbeats (at timestamptz)"""
        )
        instance_id = await env.start(
            """@> (
                'CALL process_queue()'
                ~> df.sleep(60)
            ) | df.wait_for_signal('shutdown')"""
        )
        for _ in range(100):
            if await env.val("SELECT count(*) FROM runs"):
                break
            await env.conn.execute("SELECT pg_sleep(0.1)")
        await env.conn.execute("SELECT df.signal($1, 'shutdown')", instance_id)
        out = await env.runtime.client.wait(instance_id, timeout=30)
        assert out["signal_name"] == "shutdown"
        assert await env.val("SELECT count(*) FROM runs") == 1
        heartbeat = await env.start(
            """@> (
                df.wait_for_schedule('*/5 * * * *')
                ~> 'INSERT INTO heartbeats VALUES (now())'
            )"""
        )
        await env.conn.execute("SELECT pg_sleep(0.5)")
        assert await env.val("SELECT df.status($1)", heartbeat) == "running"  # waiting for the next */5 minute
        await env.conn.execute("SELECT df.cancel($1, 'test over')", heartbeat)
        with pytest.raises(pgd.Cancelled):
            await env.runtime.client.wait(heartbeat, timeout=30)


# -- sleep, signals, sub-workflows --------------------------------------------------------------------
async def test_sleep(dsn: str) -> None:
    async with environment(dsn) as env:
        started = time.monotonic()
        assert cell(await env.run("df.sleep(1) ~> 'SELECT 2'")) == 2  # the docs' df.sleep(10), shortened
        assert time.monotonic() - started >= 1.0


async def test_signal_with_timeout(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text, status text)")
        example = """'INSERT INTO orders VALUES (DEFAULT, ''book'') RETURNING id' |=> 'order_id'
            ~> df.wait_for_signal('approval', {timeout})  -- 1 hour timeout
            ~> 'UPDATE orders SET status = CASE
        WHEN $approval.timed_out THEN ''expired''
        ELSE ''approved''
    END WHERE id = $order_id'"""
        instance_id = await env.start(example.format(timeout=3600))
        await env.conn.execute("SELECT df.signal($1, 'approval', '{\"approved\": true}')", instance_id)
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        await env.start(example.format(timeout=1))  # the timeout path, with 1 s instead of an hour
        for _ in range(100):
            if await env.val("SELECT count(*) FROM orders WHERE status IS NOT NULL") == 2:
                break
            await env.conn.execute("SELECT pg_sleep(0.1)")
        assert [r[0] for r in await env.conn.fetch("SELECT status FROM orders ORDER BY id")] == ["approved", "expired"]


async def test_sub_workflow_call(dsn: str) -> None:
    async with environment(dsn) as env:
        out = await env.run("""'SELECT 21 AS n' |=> 'x' ~> df.call('double', '{"n": 21}')""")
        assert out == {"doubled": 42}
        inner = await env.val("SELECT df.seq('SELECT 1', 'SELECT 5')")
        # The graph interpreter itself is not callable: a child graph would run SQL nobody checked.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is a built-in"):
            await env.start("df.call('pgdurable.graph', jsonb_build_object('graph', $1::text::jsonb))", inner)


# -- control: status/result/list/cancel; caller vs new transaction ------------------------------------
async def test_status_result_list(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("'SELECT 42 AS answer', 'my-job'")
        assert await env.val("SELECT df.await_instance($1, 30)", instance_id) == "completed"
        assert await env.val("SELECT df.status($1)", instance_id) == "completed"
        assert await env.val("SELECT df.result($1)::jsonb->'rows'->0->>'answer'", instance_id) == "42"
        assert await env.val("SELECT df.result($1)::text", instance_id) == '{"rows": [{"answer": 42}], "row_count": 1}'
        assert await env.val("SELECT df.status('nope')") is None
        row = await env.conn.fetchrow("SELECT * FROM df.list_instances() WHERE label = 'my-job'")
        assert row["instance_id"] == instance_id and row["status"] == "completed"
        assert await env.val("SELECT submitted_by FROM df.instances WHERE id = $1", instance_id) == await env.val(
            "SELECT current_user"
        )


async def test_start_in_caller_transaction_or_new(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE audit_log (message text); CREATE TABLE employees (id int, name text)")
        async with env.conn.transaction():
            kept = await env.start("'INSERT INTO audit_log (message) VALUES (''caller'')'")
        tx = env.conn.transaction()
        await tx.start()
        dropped = await env.start("'INSERT INTO audit_log (message) VALUES (''rolled back'')'")
        await tx.rollback()
        assert await env.val("SELECT df.await_instance($1)", kept) == "completed"
        assert await env.val("SELECT df.status($1)", dropped) is None
        if not await env.val("SELECT count(*) FROM pg_available_extensions WHERE name = 'dblink'"):
            pytest.skip("the dblink extension is not available on this server")
        tx = env.conn.transaction()
        await tx.start()
        await env.conn.execute("INSERT INTO employees (id, name) VALUES (999, 'Test User')")
        with pytest.raises(asyncpg.PostgresError, match="dblink"):
            await env.conn.fetchval(
                "SELECT df.start('INSERT INTO audit_log (message) VALUES (''x'')', 'audit', transaction_mode => 'new')"
            )
        await tx.rollback()
        await env.conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
        tx = env.conn.transaction()
        await tx.start()
        await env.conn.execute("INSERT INTO employees (id, name) VALUES (999, 'Test User')")
        survivor = await env.conn.fetchval(
            "SELECT df.start('INSERT INTO audit_log (message) VALUES (''x'')', 'audit', transaction_mode => 'new')"
        )
        await tx.rollback()  # the employees insert is undone; the durable function still runs
        assert await env.val("SELECT df.await_instance($1)", survivor) == "completed"
        assert await env.val("SELECT count(*) FROM employees") == 0
        assert await env.val("SELECT count(*) FROM audit_log WHERE message = 'x'") == 1
        with pytest.raises(asyncpg.PostgresError, match="transaction_mode"):
            await env.conn.fetchval("SELECT df.start('SELECT 1', NULL, transaction_mode => 'sideways')")


async def test_cancel(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("df.wait_for_signal('never')")
        await env.conn.execute("SELECT df.cancel($1, 'Manual stop')", instance_id)
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "cancelled"


# -- validation at start ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("'SELECT $missing'", "before it is bound"),
        ("'SELECT 1' |=> 'a' ~> 'SELECT $b'", "before it is bound"),
        ("('SELECT 1' |=> 'a' | 'SELECT 2') ~> 'SELECT $a'", "before it is bound"),
        ("df.wait_for_schedule('61 * * * *')", "cron"),
        ("df.wait_for_schedule('* * *')", "cron"),
        ("'{\"type\": \"teleport\"}'", "unknown node type"),
        ("'SELECT 1' !> 'SELECT 2'", "needs a condition"),
        ("'SELECT $1'", "positional"),
        ("df.if_rows('nothing', 'SELECT 1')", "not bound"),
    ],
)
async def test_invalid_graphs_fail_at_start(dsn: str, expr: str, message: str) -> None:
    async with environment(dsn) as env:
        with pytest.raises(asyncpg.PostgresError, match=message):
            await env.conn.fetchval(f"SELECT df.start({expr})")
        assert await env.val("SELECT count(*) FROM df.instances") == 0


async def test_raw_start_and_events_for_code_orchestrations(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.val("SELECT pgdurable.start('double', '{\"n\": 4}')")
        assert await env.runtime.client.wait(instance_id, timeout=30) == {"doubled": 8}
        assert await env.val("SELECT pgdurable.start('double', '{}', 'fixed-id')") == "fixed-id"
        with pytest.raises(asyncpg.UniqueViolationError):
            await env.val("SELECT pgdurable.start('double', '{}', 'fixed-id')")
        with pytest.raises(asyncpg.PostgresError, match="not found"):
            await env.conn.execute("SELECT pgdurable.raise_event('nope', 'x', NULL)")


# -- df.http, behind the allow-list ------------------------------------------------------------------
@contextlib.contextmanager
def http_server(statuses: list[int] | None = None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local JSON server; it answers with the next of ``statuses`` (then 200) and records each request."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, Any]] = []
    pending = list(statuses or [])

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            seen.append({"method": self.command, "path": self.path, "authorization": self.headers.get("authorization"),
                         "body": self.rfile.read(length).decode() if length else None})
            status = pending.pop(0) if pending else 200
            body = json.dumps({"path": self.path, "n": len(seen), "status": status}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


async def test_http_node(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with http_server() as (base, seen):
        async with environment(dsn) as env:
            await env.conn.execute("CREATE TABLE api_data (doc jsonb)")
            # grammar.md's "Bind HTTP response" with a local URL; denied until the host is allowed
            example = f"df.http('{base}/data') |=> 'response' ~> 'INSERT INTO api_data VALUES ($response::jsonb)'"
            with pytest.raises(pgd.InstanceFailed, match="not allowed"):
                await env.run(example)
            assert seen == []
            monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
            await env.run(example)
            doc = await env.val("SELECT doc::text FROM api_data")
            assert '"status": 200' in doc and '"ok": true' in doc
            out = await env.run(  # api-reference.md's envelope example
                f"df.http('{base}/thing', 'GET') |=> 'resp'"
                " ~> df.if('SELECT $resp.ok', 'SELECT ''hooray''', 'SELECT ''oh no''')"
            )
            assert cell(out) == "hooray"
            await env.run(
                "'SELECT 42 AS id' |=> 'order_id'"
                f" ~> df.http('{base}/webhook', 'POST', '{{\"event\": \"completed\", \"id\": $order_id}}',"
                " '{\"Content-Type\": \"application/json\"}'::jsonb, 30)"
            )
            assert seen[-1] == {"method": "POST", "path": "/webhook", "authorization": None,
                                "body": '{"event": "completed", "id": 42}'}


async def test_forever_loop_keeps_history_bounded(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 120 iterations, unpaced here (pg_durable's 1 s floor per iteration has its own test)
    monkeypatch.setattr(interpreter, "MIN_LOOP_ITERATION", 0.0)
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE counter (n int); INSERT INTO counter VALUES (0)")
        instance_id = await env.start(
            "'SELECT 1 AS setup' |=> 's'"
            " ~> df.loop('UPDATE counter SET n = n + $s', 'SELECT n < 120 FROM counter')"
        )
        assert await env.val("SELECT df.await_instance($1, 60)", instance_id) == "completed"
        assert await env.val("SELECT n FROM counter") == 120
        assert await env.val("SELECT execution_count FROM df.instances WHERE id = $1", instance_id) == 3
        longest = await env.val(
            "SELECT max(c) FROM (SELECT count(*) AS c FROM pgdurable.history WHERE instance_id = $1"
            " GROUP BY execution_id) t", instance_id)
        # per iteration: the loop's iteration fact, and per node two facts and two activity events
        assert longest < 500


async def test_operator_precedence_as_documented(dsn: str) -> None:
    async with environment(dsn) as env:
        # An open ?> takes what follows into its then-branch, as in grammar.md (?> binds looser than ~>).
        assert cell(await env.run("'SELECT true' ?> 'SELECT 1' ~> 'SELECT 2' !> 'SELECT 3'")) == 2
        assert cell(await env.run("'SELECT false' ?> 'SELECT 1' ~> 'SELECT 2' !> 'SELECT 3'")) == 3
        # cond_expr ::= sequence_expr ?> ...: a sequence on the left is the condition
        assert cell(await env.run("'SELECT 0' ~> 'SELECT true' ?> 'SELECT ''y''' !> 'SELECT ''n'''")) == "y"
        # @> applies to its operand only: loop | signal is a race (grammar.md's escape-by-race)
        graph = await env.val("SELECT (@> 'SELECT 1' | df.wait_for_signal('stop'))::jsonb->>'type'")
        assert graph == "race"
        assert await env.val("SELECT ('SELECT 1' |=> 'a' ~> 'SELECT $a')::jsonb->>'type'") == "seq"


async def test_monitoring_functions(dsn: str) -> None:
    async with environment(dsn) as env:
        ids = [await env.start(f"'SELECT {i}', 'batch'") for i in range(3)]
        for instance_id in ids:
            assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        info = await env.conn.fetchrow("SELECT * FROM df.instance_info($1)", ids[0])
        assert info["label"] == "batch" and info["status"] == "completed" and info["current_execution_id"] == 1
        page = await env.conn.fetch("SELECT * FROM df.list_instances(NULL, 2, 'batch')")
        assert len(page) == 2 and page[0]["next_cursor"] is not None
        rest = await env.conn.fetch("SELECT * FROM df.list_instances(NULL, 2, 'batch', $1)", page[0]["next_cursor"])
        assert len(rest) == 1 and rest[0]["next_cursor"] is None
        assert {r["instance_id"] for r in [*page, *rest]} == set(ids)
        metrics = await env.conn.fetchrow("SELECT * FROM df.metrics()")
        assert metrics["total_instances"] == metrics["completed_instances"] == 3
        outline = await env.val("SELECT df.explain('SELECT 1' |=> 'a' ~> df.sleep(1))")
        assert outline.splitlines() == ["SQL |=> 'a': SELECT 1", "→ SLEEP 1s"]
        assert "SQL: SELECT 0 ✓" in await env.val("SELECT df.explain($1)", ids[0])
