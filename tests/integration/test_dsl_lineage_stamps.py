"""pg_durable's lineage stamps in ``df.nodes.status_details``: the scope a node ran in, then its generation.

A stamp is the instance id and the node's execution, then ``::<node id>::<generation>`` for each
JOIN or RACE branch and each loop off the root spine around the node; node ids are pg_durable's
8 hex digits (the tests read them back as graph paths to say which node is meant).  Each test starts a graph
from SQL (``df.start``) against a real database and a worker in this process, and reads every
node's stamp back from ``df.instance_nodes``.
"""

from __future__ import annotations

import json
import re

import asyncpg

from tests.integration.test_dsl_sql import environment

# a loop whose body runs twice: the condition breaks out on the second iteration
TWICE = ("df.loop('INSERT INTO ticks VALUES (1)'"
         " ~> ('SELECT count(*) >= 2 FROM ticks' ?> df.break() !> df.sleep(0)))")


async def stamps(conn: asyncpg.Connection, instance_id: str) -> dict[str, str | None]:
    """Node path -> its execution stamp (None for a node that never ran), the stamp's ids read as paths.

    The stamps and ids are df.instance_nodes' (8 hex digits per node, as in pg_durable); each scope
    token of a stamp must be the id of a node of the instance, and is shown here as that node's path.
    """
    rows = await conn.fetch("SELECT node_id, status_details FROM df.instance_nodes($1)", instance_id)
    path_of = {r["node_id"]: r["path"] for r in await conn.fetch("SELECT node_id, path FROM df._node_rows($1)",
                                                                 instance_id)}
    got: dict[str, str | None] = {}
    for r in rows:
        assert re.fullmatch("[0-9a-f]{8}", r["node_id"])
        if r["status_details"] is None:
            got[path_of[r["node_id"]]] = None
            continue
        tokens = json.loads(r["status_details"])["execution_id"].split("::")
        assert tokens[0] == instance_id and len(tokens) % 2 == 0
        for k in range(2, len(tokens), 2):  # instance::execution then node id::generation per scope
            assert re.fullmatch("[0-9a-f]{8}", tokens[k]), tokens
            tokens[k] = path_of[tokens[k]]
        got[path_of[r["node_id"]]] = "::".join(tokens)
    return got


async def test_a_loop_in_a_join_branch_is_its_own_scope_and_its_body_shares_it(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE ticks (n int)")
        instance_id = await env.start(f"{TWICE} & 'SELECT 1'")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        got = await stamps(env.conn, instance_id)
    i = instance_id
    assert got["n0"] == f"{i}::1"  # the JOIN itself runs in the instance's scope
    assert got["n0.0"] == f"{i}::1::n0.0::2"  # the loop branch: one scope, in its second generation
    assert got["n0.0.0.0"] == got["n0.0.0.1.1"] == f"{i}::1::n0.0::2"  # its body, in the last iteration
    assert got["n0.0.0.1.2"] == f"{i}::1::n0.0::1"  # the sleep ran in the first iteration only
    assert got["n0.1"] == f"{i}::1::n0.1::1"  # the sibling branch: a scope of its own


async def test_a_loop_in_a_race_branch_and_the_loser_have_their_own_scopes(dsn: str) -> None:
    async with environment(dsn) as env:
        await env.conn.execute("CREATE TABLE ticks (n int)")
        instance_id = await env.start(f"df.race({TWICE}, df.sleep(30))")
        assert await env.val("SELECT df.await_instance($1)", instance_id) == "completed"
        got = await stamps(env.conn, instance_id)
    i = instance_id
    assert got["n0"] == f"{i}::1"
    assert got["n0.0"] == got["n0.0.0.0"] == f"{i}::1::n0.0::2"
    assert got["n0.1"] == f"{i}::1::n0.1::1"  # the losing sleep, stamped running before the race ended
    # as pg_durable's own check reads them: three scopes (the race, the loop child, the sibling child)
    assert {s.rsplit("::", 1)[0] for s in got.values() if s is not None} == {i, f"{i}::1::n0.0", f"{i}::1::n0.1"}


async def test_a_loop_inside_a_branch_nests_a_scope_and_spine_loops_add_none(dsn: str) -> None:
    async with environment(dsn) as env:
        nested = await env.start("('SELECT 1' ~> df.loop('SELECT 2' ~> df.break())) & 'SELECT 3'")
        spine = await env.start("'SELECT 1' ~> df.loop('SELECT 2' ~> df.break())")
        assert await env.val("SELECT df.await_instance($1)", nested) == "completed"
        assert await env.val("SELECT df.await_instance($1)", spine) == "completed"
        got = await stamps(env.conn, nested)
        on_spine = await stamps(env.conn, spine)
    assert got["n0.0"] == got["n0.0.0"] == f"{nested}::1::n0.0::1"  # the branch and the step before the loop
    assert got["n0.0.1"] == got["n0.0.1.0.0"] == f"{nested}::1::n0.0::1::n0.0.1::1"  # the loop in the branch
    # a loop that is a step of the root sequence continues the instance as new: no scope of its own
    assert set(on_spine.values()) == {f"{spine}::1"}
