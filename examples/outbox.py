"""Draining a transactional outbox in groups, with delivery checkpoints.

The business transaction writes its rows and its outbox messages together, and
starts the drain graph in the same transaction (``df.start`` in the caller's
transaction: it runs if and only if that transaction commits; no polling
relay).  The graph, written with ``pgdurable_async.dsl``, loops:

    take the next group of 25 undelivered messages (SQL, bound as $group)
    → none left? break
    → publish each (a Python activity, 5 at a time, idempotent by message id)
    → checkpoint: mark the group delivered (SQL, exactly once)

A crash between publish and checkpoint re-publishes that group only, and the
broker drops the duplicates by message id: at-least-once delivery, exactly-once
effect.

Run it: ``python -m pgdurable_async demo outbox``.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import asyncpg
import orjson

import pgdurable_async as pgd
from pgdurable_async import dsl
from pgdurable_async._client.graphs import render_instance

app = pgd.App()
GROUP = 25


class Broker:
    """A stand-in message broker that de-duplicates by message id."""

    def __init__(self) -> None:
        self.messages: dict[int, dict[str, Any]] = {}
        self.publishes = 0

    def publish(self, message: dict[str, Any]) -> bool:
        self.publishes += 1
        fresh = message["id"] not in self.messages
        self.messages.setdefault(message["id"], message)
        return fresh


broker = Broker()


@app.activity(name="outbox.publish")
async def publish(ctx: pgd.ActivityContext, message: dict[str, Any]) -> dict[str, Any]:
    return {"id": message["id"], "fresh": broker.publish(message)}


drain = dsl.loop(
    dsl.sql(f"SELECT id, topic, payload FROM outbox WHERE delivered_at IS NULL ORDER BY id LIMIT {GROUP}").bind("group")
    >> dsl.if_rows(
        "group",
        dsl.fan_out(over="group", step=dsl.activity(publish), limit=5)
        >> "UPDATE outbox SET delivered_at = now() WHERE id IN (SELECT id FROM $group.*)",  # delivery checkpoint
        dsl.break_({"drained": True}),
    )
)

SETUP = """
DROP TABLE IF EXISTS outbox; DROP TABLE IF EXISTS orders;
CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL);
CREATE TABLE outbox (
    id bigserial PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz
);
"""


async def place_orders(conn: asyncpg.Connection, count: int, graph: dict[str, Any]) -> str:
    """One business transaction: the orders, their outbox messages and the drain's start."""
    async with conn.transaction():
        await conn.execute(
            "WITH o AS (INSERT INTO orders (item) SELECT 'item ' || g FROM generate_series(1, $1) g RETURNING id)"
            " INSERT INTO outbox (topic, payload) SELECT 'order.placed', jsonb_build_object('order_id', id) FROM o",
            count,
        )
        instance_id: str = await conn.fetchval("SELECT df.start($1::text, 'outbox-drain')",
                                               orjson.dumps(graph).decode())
    return instance_id


async def run(dsn: str, *, out: TextIO = sys.stdout, count: int = 110) -> dict[str, Any]:
    async with pgd.Runtime(app, dsn) as runtime:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            instance_id = await place_orders(conn, count, dsl.compile(drain))
            print(f"committed {count} orders + outbox rows and started drain {instance_id} in one transaction",
                  file=out)
            result = await runtime.client.wait(instance_id, timeout=60)
            delivered = await conn.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL")
        finally:
            await conn.close()
        groups = sum(1 for e in await runtime.client.history(instance_id)
                     if e.kind == "activity_scheduled"
                     and str(e.data.get("input", {}).get("query", "")).startswith("UPDATE"))
        print(f"result: {result}; delivered {delivered}/{count} in {groups} checkpointed groups of <= {GROUP}; "
              f"broker holds {len(broker.messages)} messages from {broker.publishes} publishes", file=out)
        print(await render_instance(runtime.client, instance_id), file=out)
    return {"result": result, "delivered": delivered, "groups": groups, "broker": len(broker.messages)}
