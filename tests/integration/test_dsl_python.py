"""The Python DSL end to end: app.graph, operators, binds, fan-out, signals, loops."""

from __future__ import annotations

import asyncpg
import pytest

import pgdurable_async as pgd
from pgdurable_async import dsl

app = pgd.App()
calls: list[dict[str, object]] = []


@app.activity
async def shout(ctx: pgd.ActivityContext, row: dict[str, object]) -> str:
    calls.append(row)
    return str(row["name"]).upper()


app.graph(
    "docs_batch",
    dsl.sql("SELECT id FROM documents WHERE NOT processed ORDER BY id LIMIT $input.limit").bind("batch")
    >> "UPDATE documents SET processed = true WHERE id IN (SELECT id FROM $batch.*)",
)
app.graph(
    "people",
    dsl.sql("SELECT id, name FROM people ORDER BY id").bind("people")
    >> dsl.fan_out(over="people", step=dsl.activity(shout), limit=2),
)
app.graph(
    "quotes",
    dsl.sql("SELECT $input.text AS t").bind("q")
    >> dsl.sql("INSERT INTO notes (body) VALUES ($q.t) RETURNING body"),
)
app.graph(
    "parallel",
    (dsl.sql("SELECT 1 AS a") & "SELECT 2 AS b").bind("both")
    >> dsl.if_("SELECT 1 > 0", "SELECT 'yes' AS answer", "SELECT 'no' AS answer"),
)
app.graph(
    "approve",
    dsl.wait_for_signal("approval", timeout=30).bind("approval")
    >> "SELECT $approval.timed_out AS timed_out, $approval.data AS data",
)
app.graph(
    "counter",
    dsl.loop("UPDATE counters SET n = n + 1 WHERE id = 1", "SELECT n < 5 FROM counters WHERE id = 1")
    >> "SELECT n FROM counters WHERE id = 1",
)

attempts: dict[str, int] = {}


@app.activity(retry=pgd.RetryPolicy(max_attempts=1))
async def flaky(ctx: pgd.ActivityContext, n: object) -> str:
    attempts[ctx.instance_id] = attempts.get(ctx.instance_id, 0) + 1
    if attempts[ctx.instance_id] % 2:
        raise RuntimeError("odd attempt")
    return "even"


app.graph("child_graph", dsl.sql("SELECT $input.n * 2 AS doubled"))
app.graph(
    "control",
    dsl.race(dsl.sleep(30), dsl.sql("SELECT 'fast' AS who")).bind("winner")
    >> dsl.call("child_graph", {"n": 21}).bind("child")
    >> dsl.loop(dsl.activity(flaky) >> dsl.break_("escaped"), continue_on_failure=True).bind("looped")
    >> "SELECT $winner.who AS winner, $child.doubled AS child, $looped AS looped",
)


async def _setup(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            CREATE TABLE documents (id int PRIMARY KEY, processed bool NOT NULL DEFAULT false);
            INSERT INTO documents SELECT g, false FROM generate_series(1, 10) g;
            CREATE TABLE people (id int PRIMARY KEY, name text);
            INSERT INTO people VALUES (1, 'ada'), (2, 'bob'), (3, 'cy');
            CREATE TABLE notes (body text);
            CREATE TABLE counters (id int PRIMARY KEY, n int);
            INSERT INTO counters VALUES (1, 0);
            """
        )
    finally:
        await conn.close()


async def test_python_graphs(dsn: str) -> None:
    await _setup(dsn)
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        out = await (await client.start("docs_batch", {"limit": 4})).result(timeout=30)
        assert out == {"rows": [], "row_count": 0}  # pg_durable: an UPDATE without RETURNING returns no rows
        out = await (await client.start("people")).result(timeout=30)
        assert out == ["ADA", "BOB", "CY"]
        assert sorted(c["id"] for c in calls) == [1, 2, 3]  # type: ignore[type-var]
        evil = "x'); DROP TABLE documents; --"
        out = await (await client.start("quotes", {"text": evil})).result(timeout=30)
        assert [list(r.values()) for r in out["rows"]] == [[evil]]
        out = await (await client.start("parallel")).result(timeout=30)
        assert [list(r.values()) for r in out["rows"]] == [["yes"]]
        handle = await client.start("approve")
        await handle.raise_event("approval", {"ok": True})
        out = await handle.result(timeout=30)
        assert sorted(out["rows"][0].values(), key=str) == [False, {"ok": True}]
        out = await (await client.start("counter")).result(timeout=30)
        assert [list(r.values()) for r in out["rows"]] == [[5]]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM documents WHERE processed") == 4
    finally:
        await conn.close()


def test_invalid_graphs_are_rejected_at_registration() -> None:
    other = pgd.App()
    with pytest.raises(dsl.GraphError, match=r"\$missing"):
        other.graph("bad", dsl.sql("SELECT $missing"))
    with pytest.raises(dsl.GraphError, match="cron"):
        other.graph("bad_cron", dsl.wait_for_schedule("61 * * * *"))
    with pytest.raises(dsl.GraphError, match="unknown node type"):
        other.graph("bad_type", {"type": "nope"})


async def test_graph_command_prints_mermaid_with_states(dsn: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    await _setup(dsn)
    root = Path(__file__).resolve().parents[2]
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start("docs_batch", {"limit": 2})
        await handle.result(timeout=30)
        conn = await asyncpg.connect(dsn)
        try:
            sql_started = await conn.fetchval(
                "SELECT df.start(df.sleep(0) ~> ('SELECT true' ?> 'SELECT 1' !> 'SELECT 2'))"
            )
            assert await conn.fetchval("SELECT df.await_instance($1)", sql_started) == "completed"
        finally:
            await conn.close()

    def graph(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgdurable_async", "graph", *args, "--dsn", dsn],
                              cwd=root, capture_output=True, text=True, timeout=60)

    proc = graph(sql_started)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("flowchart TD")
    assert 'n0_1_1["sql: SELECT 1<br/><i>completed</i>"]:::completed' in proc.stdout
    assert 'n0_1_2["sql: SELECT 2<br/><i>skipped</i>"]:::skipped' in proc.stdout
    proc = graph(handle.instance_id)
    assert proc.returncode == 1 and "--app" in proc.stderr
    proc = graph(handle.instance_id, "--app", "tests.integration.test_dsl_python:app")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(":::completed") == 4  # seq, bind and its sql, the update


async def test_race_call_break_and_adhoc_graphs(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        out = await (await runtime.client.start("control")).result(timeout=30)
        assert sorted(map(str, out["rows"][0].values())) == ["42", "escaped", "fast"]
        adhoc = dsl.sql("SELECT 'there' AS x").bind("hello") >> "SELECT '{who}' || ' ' || $hello.x AS greeting"
        handle = await dsl.start(runtime.client, adhoc, vars={"who": "hi"})
        assert (await handle.result(timeout=30))["rows"] == [{"greeting": "hi there"}]
        with pytest.raises(dsl.GraphError):
            await dsl.start(runtime.client, "SELECT $nope")
