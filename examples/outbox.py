"""Draining a transactional outbox on a cadence, in groups, with delivery checkpoints.

The business transaction writes its rows and its outbox messages together (one
commit: a message exists if and only if its order does).  A schedule drains the
outbox every second (``client.create_schedule("outbox-drain", "outbox.drain",
every=1)``, ``overlap="skip"``: a drain never starts while the previous one still
runs).  The drain graph, written with ``pgdurable_async.dsl``, loops:

    take the next group of 25 undelivered messages (SQL, bound as $group)
    → none left? break
    → publish each (a Python activity, 5 at a time, idempotent by message id)
    → checkpoint: mark the group delivered (SQL, exactly once)

A crash between publish and checkpoint re-publishes that group only, and the
broker drops the duplicates by message id: at-least-once delivery, exactly-once
effect.  (To drain at once instead, a business transaction can also start the
drain itself with ``df.start``, which runs if and only if that transaction commits.)

Run it: ``python -m pgdurable_async demo outbox``.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import asyncpg

import pgdurable_async as pgd
from pgdurable_async import dsl
from pgdurable_async._client.graphs import render_instance

app = pgd.App()
GROUP = 25
SCHEDULE = "outbox-drain"


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
    dsl.sql("SELECT id, topic, payload FROM pgdurable_demo.outbox"
            f" WHERE delivered_at IS NULL ORDER BY id LIMIT {GROUP}").bind("group")
    >> dsl.if_rows(
        "group",
        dsl.fan_out(over="group", step=dsl.activity(publish), limit=5)
        # the delivery checkpoint
        >> "UPDATE pgdurable_demo.outbox SET delivered_at = now() WHERE id IN (SELECT id FROM $group.*)",
        dsl.break_({"drained": True}),
    )
)
app.graph("outbox.drain", drain)

SETUP = """
CREATE SCHEMA IF NOT EXISTS pgdurable_demo;  -- the demos' own schema: they never touch yours
DROP TABLE IF EXISTS pgdurable_demo.outbox; DROP TABLE IF EXISTS pgdurable_demo.orders;
CREATE TABLE pgdurable_demo.orders (id serial PRIMARY KEY, item text NOT NULL);
CREATE TABLE pgdurable_demo.outbox (
    id bigserial PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz
);
"""


async def place_orders(conn: asyncpg.Connection, count: int) -> None:
    """One business transaction: the orders and their outbox messages."""
    async with conn.transaction():
        await conn.execute(
            "WITH o AS (INSERT INTO pgdurable_demo.orders (item)"
            "           SELECT 'item ' || g FROM generate_series(1, $1) g RETURNING id)"
            " INSERT INTO pgdurable_demo.outbox (topic, payload)"
            " SELECT 'order.placed', jsonb_build_object('order_id', id) FROM o",
            count,
        )


async def run(dsn: str, *, out: TextIO = sys.stdout, count: int = 110) -> dict[str, Any]:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SETUP)
            if SCHEDULE in {s.schedule_id for s in await client.list_schedules()}:
                await client.delete_schedule(SCHEDULE)  # a re-run of the demo on the same database
            await place_orders(conn, count)
            print(f"committed {count} orders + their outbox rows in one transaction", file=out)
            await client.create_schedule(SCHEDULE, "outbox.drain", every=1, overlap="skip")
            handle = await client.trigger_schedule(SCHEDULE)  # the first drain now, then one every second
            print(f"schedule {SCHEDULE}: a drain every second (overlap=skip); the first one now: "
                  f"{handle.instance_id}", file=out)
            result = await handle.result(timeout=60)
            await client.pause_schedule(SCHEDULE)
            delivered = await conn.fetchval("SELECT count(*) FROM pgdurable_demo.outbox WHERE delivered_at IS NOT NULL")
        finally:
            await conn.close()
        groups = sum(1 for e in await handle.history()
                     if e.kind == "activity_scheduled"
                     and str(e.data.get("input", {}).get("query", "")).startswith("UPDATE"))
        print(f"result: {result}; delivered {delivered}/{count} in {groups} checkpointed groups of <= {GROUP}; "
              f"broker holds {len(broker.messages)} messages from {broker.publishes} publishes", file=out)
        print(await render_instance(client, handle.instance_id, app), file=out)
    return {"result": result, "delivered": delivered, "groups": groups, "broker": len(broker.messages),
            "instance_id": handle.instance_id}
