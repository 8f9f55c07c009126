"""What a pg_durable user sees of a graph: node states as recorded, loops, explain, its graph JSON, settings.

Each test starts graphs from SQL (``df.start``) against a real database and a worker in this
process, and reads them back the way pg_durable's monitoring SQL does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import asyncpg
import pytest

from pgdurable_async._base import events as ev
from pgdurable_async._client.graphs import render_instance
from pgdurable_async._graph.mermaid import graph_for, node_states
from tests.integration.test_dsl_sql import cell, environment, http_server


async def nodes(conn: asyncpg.Connection, instance_id: str) -> dict[str, asyncpg.Record]:
    """df.instance_nodes' rows (8-hex ids, as pg_durable names nodes) keyed by each node's graph path."""
    public = {r["node_id"]: r for r in await conn.fetch("SELECT * FROM df.instance_nodes($1)", instance_id)}
    paths = dict(await conn.fetch("SELECT node_id, path FROM df._node_rows($1)", instance_id))
    assert public.keys() == paths.keys()
    return {paths[node_id]: row for node_id, row in public.items()}


def hex_id(rows: dict[str, asyncpg.Record], path: str) -> str:
    return str(rows[path]["node_id"])


# -- node states are recorded facts -------------------------------------------------------------
async def test_node_states_come_from_recorded_facts(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start(
            "'SELECT 41 AS answer' |=> 'a' ~> df.sleep(0)"
            " ~> df.if('SELECT $a > 40', 'SELECT ''big''', 'SELECT ''small''')")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        history = await env.runtime.client.history(instance_id)
        facts = [e.data for e in history if e.kind == ev.GRAPH_NODE]
        assert {"node": "n0.0", "state": "running"} in facts
        assert [f["state"] for f in facts if f["node"] == "n0.2.2"] == []  # the branch not taken never ran
        rows = await nodes(env.conn, instance_id)
    # the name sits on the SQL node itself, with its result; no separate row for the binding
    assert rows["n0"]["node_type"] == "THEN" and rows["n0"]["status"] == "completed"
    assert rows["n0.0"]["node_type"] == "SQL" and rows["n0.0"]["result_name"] == "a"
    assert json.loads(rows["n0.0"]["result"]) == {"rows": [{"answer": 41}], "row_count": 1}
    assert rows["n0.1"]["node_type"] == "SLEEP" and rows["n0.1"]["query"] == "0"
    assert rows["n0.2"]["node_type"] == "IF"
    assert json.loads(rows["n0.2"]["query"]) == {"condition_node": hex_id(rows, "n0.2.0")}
    assert rows["n0.2"]["left_node"] == hex_id(rows, "n0.2.1") and rows["n0.2"]["right_node"] == hex_id(rows, "n0.2.2")
    assert json.loads(rows["n0.2"]["result"])["rows"] == [{"?column?": "big"}]  # an IF carries its branch's result
    assert rows["n0.2.2"]["status"] == "pending" and rows["n0.2.2"]["inferred_status"] == "skipped"
    assert rows["n0.2.2"]["inferred_status_from_ancestor_id"] == hex_id(rows, "n0.2")
    assert json.loads(rows["n0.0"]["status_details"]) == {"execution_id": f"{instance_id}::1"}


async def test_mermaid_and_df_nodes_read_the_same_truth(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("'SELECT 1' ~> ('SELECT 2' | df.sleep(30)) ~> df.if('SELECT false', 'SELECT 3')")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        client = env.runtime.client
        state = await client.status(instance_id)
        tree = graph_for(state)
        assert tree is not None
        python_side = node_states(state, await client.history(instance_id), tree)
        sql_side = {path: r["inferred_status"] for path, r in (await nodes(env.conn, instance_id)).items()}
        picture = await render_instance(client, instance_id)
    assert python_side == sql_side
    assert sql_side["n0.1.1"] == "skipped"  # the race's losing sleep
    assert "n0_1_1[" in picture and ":::skipped" in picture


async def test_what_an_instance_is_waiting_on(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start(
            "df.wait_for_signal('go', 300) & df.wait_for_schedule('0 0 1 1 *') & df.sleep(300)")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            waits = await env.conn.fetch(
                "SELECT n.node_type, n.query, n.inferred_status FROM df.instance_nodes($1) n"
                " WHERE n.node_type IN ('SIGNAL', 'WAIT_SCHEDULE', 'SLEEP') AND n.inferred_status = 'running'",
                instance_id)
            if len(waits) == 3:
                break
            await asyncio.sleep(0.1)
        found = {r["node_type"]: r["query"] for r in waits}
        assert json.loads(found["SIGNAL"]) == {"signal_name": "go", "timeout_seconds": 300}
        assert json.loads(found["WAIT_SCHEDULE"]) == {"cron_expr": "0 0 1 1 *"}
        assert found["SLEEP"] == "300"
        assert await env.val("SELECT n.query::jsonb->>'signal_name' FROM df.instance_nodes($1) n"
                             " WHERE n.node_type = 'SIGNAL' AND n.inferred_status = 'running'", instance_id) == "go"
        await env.val("SELECT df.cancel($1, 'enough')", instance_id)
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "cancelled"


# -- node ids ----------------------------------------------------------------------------------------
async def test_node_ids_are_eight_hex_digits_unique_stable_and_referenced_by_id(dsn: str) -> None:
    graph = ("'SELECT 1' ~> df.join3('SELECT 2', 'SELECT 3', df.seq('SELECT 7', 'SELECT 8', 'SELECT 9'))"
             " ~> df.if('SELECT true', 'SELECT 5', 'SELECT 6') ~> df.loop('SELECT 10', 'SELECT false')")
    async with environment(dsn) as env:
        first, second = await env.start(graph), await env.start(graph)
        for instance_id in (first, second):
            assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        rows = await nodes(env.conn, first)
        again = await nodes(env.conn, first)
        other = await nodes(env.conn, second)
        root = await env.val("SELECT root_node FROM df.instances WHERE id = $1", first)
        relation = {r["id"] for r in await env.conn.fetch("SELECT id FROM df.nodes WHERE instance_id = $1", first)}
    ids = {path: str(r["node_id"]) for path, r in rows.items()}
    assert all(len(i) == 8 and set(i) <= set("0123456789abcdef") for i in ids.values())
    assert len(set(ids.values())) == len(ids) == 16 and relation == set(ids.values())
    assert {p: str(r["node_id"]) for p, r in again.items()} == ids  # the same on every read
    assert not set(ids.values()) & {str(r["node_id"]) for r in other.values()}  # another instance, other ids
    assert root == ids["n0"]
    # every reference to another node names it by its id
    join, seq, if_, loop = (json.loads(rows[p]["query"]) for p in ("n0.1", "n0.1.2", "n0.2", "n0.3"))
    assert rows["n0.1"]["left_node"] == ids["n0.1.0"] and rows["n0.1"]["right_node"] == ids["n0.1.1"]
    assert join == {"extra_nodes": [ids["n0.1.2"]]}
    assert seq == {"steps": [ids["n0.1.2.0"], ids["n0.1.2.1"], ids["n0.1.2.2"]]}
    assert if_ == {"condition_node": ids["n0.2.0"]} and rows["n0.2"]["left_node"] == ids["n0.2.1"]
    assert loop == {"condition_node": ids["n0.3.1"]} and rows["n0.3"]["left_node"] == ids["n0.3.0"]
    assert rows["n0.2.2"]["inferred_status"] == "skipped"
    assert rows["n0.2.2"]["inferred_status_from_ancestor_id"] == ids["n0.2"]


async def test_two_nodes_whose_ids_would_collide_get_distinct_ids(dsn: str) -> None:
    # For instance c0111de0, md5("c0111de0:n0.880") and md5("c0111de0:n0.28083") share their first
    # 8 hex digits (found by search): in a sequence of 28,084 steps one of them gets another id.
    def key(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()[:8]

    assert key("c0111de0:n0.880") == key("c0111de0:n0.28083")
    graph = {"type": "seq", "steps": [{"type": "sql", "query": "SELECT 1"}] * 28084}
    conn = await asyncpg.connect(dsn)
    try:
        ids = json.loads(await conn.fetchval("SELECT df._node_ids('c0111de0', $1::jsonb)", json.dumps(graph)))
    finally:
        await conn.close()
    assert len(ids) == 28085 and len(set(ids.values())) == 28085
    assert ids["n0.28083"] == key("c0111de0:n0.28083")  # the first of the two as text keeps its digits
    assert ids["n0.880"] == key("c0111de0:n0.880#2")


# -- loops ----------------------------------------------------------------------------------------
async def test_loop_states_results_and_break_in_the_condition(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE ticks (n int)")
        broken = await env.start(
            "'SELECT 0' ~> df.loop('INSERT INTO ticks VALUES (1)', 'SELECT 1' ~> df.break('done'))")
        assert await env.val("SELECT df.await_instance($1)", broken) == "completed"
        assert await env.val("SELECT df.result($1)", broken) == '"done"'
        rows = await nodes(env.conn, broken)
        loop = rows["n0.1"]
        assert loop["node_type"] == "LOOP" and loop["status"] == loop["inferred_status"] == "completed"
        assert loop["result"] == '"done"' and json.loads(loop["query"]) == {"condition_node": hex_id(rows, "n0.1.1")}
        # a while loop that ends because its condition is false returns its body's last result
        counted = await env.start("df.loop('SELECT count(*) AS n FROM ticks', 'SELECT false') |=> 'c' ~> 'SELECT $c.n'")
        assert await env.val("SELECT df.await_instance($1)", counted) == "completed"
        assert cell(json.loads(await env.val("SELECT df.result($1)", counted))) == 1


async def test_a_name_bound_in_the_loop_body_is_usable_after_the_loop(dsn: str) -> None:
    async with environment(dsn) as env:
        out = await env.run(
            "df.loop(('SELECT 7 AS v' |=> 'last') ~> ('SELECT true' ?> df.break() !> df.sleep(1)))"
            " ~> 'SELECT $last.v * 2 AS twice'")
        assert cell(out) == 14


async def test_a_loop_without_a_real_wait_is_paced(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE spins (at timestamptz DEFAULT clock_timestamp())")
        instance_id = await env.start("df.loop('INSERT INTO spins DEFAULT VALUES' ~> df.sleep(0))")
        deadline = time.monotonic() + 10
        while await env.val("SELECT count(*) FROM spins") == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        first = time.monotonic()
        while time.monotonic() - first < 3.5:
            await env.val("SELECT pg_sleep(0.25)")
        count = await env.val("SELECT count(*) FROM spins")
        await env.val("SELECT df.cancel($1)", instance_id)
        assert 2 <= count <= 6  # about one iteration a second, not hundreds


async def test_a_loop_that_loses_a_race_ends_failed_with_the_reason(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE after_the_race (n int)")
        instance_id = await env.start(
            "(df.sleep(1) | df.loop(df.sleep(2) ~> 'INSERT INTO after_the_race VALUES (1)')) ~> df.sleep(3)")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        loop = (await nodes(env.conn, instance_id))["n0.0.1"]
        assert loop["status"] == loop["inferred_status"] == "failed"
        assert await env.val("SELECT error FROM df.nodes WHERE instance_id = $1 AND id = $2",
                             instance_id, loop["node_id"]) == "cancelled: lost the race to branch 1"
        # stamped by the parent for the branch's loop child: its scope (named by its 8-hex id), first generation
        assert json.loads(loop["status_details"])["execution_id"] == f"{instance_id}::1::{loop['node_id']}::1"
        assert await env.val("SELECT count(*) FROM after_the_race") == 0  # the loser stopped: it ran on before


async def test_a_failed_instance_shows_its_error_as_output(dsn: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start("df.loop('SELECT 1/0') & 'SELECT 1'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "failed"
        assert "division by zero" in await env.val("SELECT output FROM df.instance_info($1)", instance_id)
        loop = await env.conn.fetchrow("SELECT * FROM df.nodes WHERE instance_id = $1 AND node_type = 'LOOP'",
                                       instance_id)
        assert loop["status"] == "failed" and "division by zero" in loop["error"]


# -- df.explain ------------------------------------------------------------------------------------
async def test_explain_dry_run_and_live(dsn: str) -> None:
    async with environment(dsn) as env:
        outline = await env.val(
            "SELECT df.explain('SELECT 1' |=> 'a' ~> df.race('SELECT 2', df.sleep(30))"
            " ~> df.if('SELECT $a = 1', 'SELECT 3', 'SELECT 4') ~> df.wait_for_signal('ok', 60))")
        assert outline.splitlines() == [
            "SQL |=> 'a': SELECT 1",
            "→ RACE (2)",
            "    ║ branch 1:",
            "      SQL: SELECT 2",
            "    ║ branch 2:",
            "      SLEEP 30s",
            "→ IF",
            "    ? condition:",
            "      SQL: SELECT $a = 1",
            "    ✓ then:",
            "      SQL: SELECT 3",
            "    ✗ else:",
            "      SQL: SELECT 4",
            "→ SIGNAL 'ok' (60s)",
        ]
        assert await env.val("SELECT df.explain('SELECT 1')") == "SQL: SELECT 1"
        instance_id = await env.start("df.race('SELECT ''fast''', df.sleep(30)), 'explained'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        live = (await env.val("SELECT df.explain($1)", instance_id)).splitlines()
        assert live[:2] == [f"Instance: {instance_id} (explained)", "Status:   ✓ completed"]
        assert live[-5:] == ["RACE (2) ✓", "    ║ branch 1:", "      SQL: SELECT 'fast' ✓", "    ║ branch 2:",
                             "      SLEEP 30s ⊘"]  # the loser was left behind: skipped


# -- pg_durable's own graph JSON ---------------------------------------------------------------------
async def test_pg_durable_graph_json_is_accepted(dsn: str) -> None:
    graph = {
        "node_type": "THEN",
        "left_node": {"node_type": "SQL", "query": "SELECT 5 AS n", "result_name": "five"},
        "right_node": {"node_type": "IF", "condition_node": {"node_type": "SQL", "query": "SELECT $five > 1"},
                       "left_node": {"node_type": "SQL", "query": "SELECT 'yes' AS a"},
                       "right_node": {"node_type": "SQL", "query": "SELECT 'no' AS a"}},
    }
    async with environment(dsn) as env:
        assert cell(await env.run("$1::text", json.dumps(graph))) == "yes"
        join = {"node_type": "JOIN", "left_node": {"node_type": "SQL", "query": "SELECT 1"},
                "right_node": {"node_type": "SLEEP", "query": "0"},
                "extra_nodes": [{"node_type": "SQL", "query": "SELECT 3"}]}
        assert len(await env.run("$1::text", json.dumps(join))) == 3


@pytest.mark.parametrize(("graph", "message"), [
    ({"node_type": "NOPE"}, "Unknown node_type 'NOPE'"),
    ({"node_type": "IF", "left_node": {"node_type": "SQL", "query": "SELECT 1"},
      "right_node": {"node_type": "SQL", "query": "SELECT 2"}, "condition_node": 7},
     "condition_node must be a Durofut JSON object"),
    ({"node_type": "LOOP", "left_node": {"node_type": "SQL", "query": "SELECT 1"},
      "query": '{"condition_node": {"node_type": "SQL", "query": "SELECT true"}}'},
     "condition_node in LOOP must be a first-class Durofut field"),
    ({"node_type": "JOIN", "left_node": {"node_type": "SQL", "query": "SELECT 1"},
      "right_node": {"node_type": "SQL", "query": "SELECT 2"}, "extra_nodes": ["abc"]},
     "extra_nodes entries must be Durofut JSON objects"),
    ({"node_type": "SQL", "query": "SELECT 1", "condition_node": {"node_type": "SQL", "query": "SELECT 1"}},
     "condition_node is not valid for SQL nodes"),
])
async def test_pg_durable_graph_json_errors(dsn: str, graph: dict[str, Any], message: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
            await conn.fetchval("SELECT df.start($1::text)", json.dumps(graph))
        explained = await conn.fetchval("SELECT df.explain($1::text)", json.dumps(graph))
        assert explained.startswith("Invalid durable function graph: ") and message in explained
        assert await conn.fetchval("SELECT count(*) FROM pgdurable.instances") == 0
    finally:
        await conn.close()


async def test_graphs_deeper_than_256_levels_are_refused(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # a sequence counts as pg_durable's chain of binary `~>` nodes: 256 of them are allowed
        deep = "df.seq(VARIADIC ARRAY(SELECT 'SELECT ' || k FROM generate_series(1, {}) k))"
        assert "Invalid" not in await conn.fetchval(f"SELECT df.explain({deep.format(257)})")
        refused = await conn.fetchval(f"SELECT df.explain({deep.format(258)})")
        assert "maximum nesting depth of 256" in refused
        with pytest.raises(asyncpg.InvalidParameterValueError, match="maximum nesting depth of 256"):
            await conn.fetchval(f"SELECT df.start({deep.format(258)})")
        nested = {"node_type": "SQL", "query": "SELECT 1"}
        for _ in range(257):
            nested = {"node_type": "LOOP", "left_node": nested}
        with pytest.raises(asyncpg.InvalidParameterValueError, match="maximum nesting depth of 256"):
            await conn.fetchval("SELECT df.start($1::text)", json.dumps(nested))
    finally:
        await conn.close()


# -- settings and guards ------------------------------------------------------------------------------
async def test_list_instances_reads_its_max_limit_setting(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetch("SELECT * FROM df.list_instances(NULL, 1000)")
        with pytest.raises(asyncpg.RaiseError, match=r"list_instances_max_limit \(1000\)"):
            await conn.fetch("SELECT * FROM df.list_instances(NULL, 1001)")
        await conn.execute("SET pg_durable.list_instances_max_limit = 3")
        await conn.fetch("SELECT * FROM df.list_instances(NULL, 3, NULL)")
        with pytest.raises(asyncpg.RaiseError, match=r"list_instances_max_limit \(3\)"):
            await conn.fetch("SELECT * FROM df.list_instances(NULL, 4, NULL)")
    finally:
        await conn.close()


@pytest.mark.parametrize("statement", [
    "SELECT df.setvar(''v'', ''x'')", "SELECT df.clearvars()", "SELECT df.await_instance(''abcdef12'')",
    "SELECT df.start(''SELECT 1'', NULL, NULL, ''new'')",
])
async def test_what_a_workflow_may_not_call(dsn: str, statement: str) -> None:
    async with environment(dsn) as env:
        instance_id = await env.start(f"'{statement}'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "failed"
        error = await env.val("SELECT error FROM df.nodes WHERE instance_id = $1 AND status = 'failed'", instance_id)
        assert "cannot be called inside a workflow" in error


async def test_binary_columns_are_refused_before_the_statement_runs(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE blobs (b bytea)")
        instance_id = await env.start("'INSERT INTO blobs VALUES (''\\x01'') RETURNING b'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "failed"
        error = await env.val("SELECT error FROM df.nodes WHERE instance_id = $1", instance_id)
        assert "Unsupported column type 'bytea'" in error
        assert await env.val("SELECT count(*) FROM blobs") == 0


async def test_http_multipart(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDURABLE_HTTP_ALLOW", "127.0.0.1")
    with http_server() as (base, seen):
        async with environment(dsn) as env:
            out = await env.run(
                f"df.http_multipart('{base}/upload', 'POST',"
                " '[{\"name\": \"file\", \"filename\": \"a.txt\", \"content_type\": \"text/plain\","
                " \"data_b64\": \"aGVsbG8=\"}, {\"name\": \"note\", \"data_b64\": \"aGk=\"}]'::jsonb)")
            assert out["status"] == 200 and out["ok"] is True
            with pytest.raises(asyncpg.RaiseError, match="POST, PUT or PATCH"):
                await env.val(f"SELECT df.http_multipart('{base}/x', 'GET', '[]'::jsonb)")
    body = seen[-1]["body"]
    assert 'name="file"; filename="a.txt"' in body and "hello" in body and 'name="note"' in body
