"""Regression (found by the chaos run): a sweep must not delete a live worker's fresh registration.

``release_dead_leases`` deletes ``workers`` rows whose backend is not in
``pg_stat_activity``.  When a worker re-registers (``register_worker`` upsert)
while another runtime's sweep is deleting its *old, dead* row, the DELETE waits
for the upsert's row lock and then re-checks the row under READ COMMITTED
(EvalPlanQual).  The re-check reuses the anti-join's original empty match from
``pg_stat_activity``, so the *new* row (a live backend) is deleted too, and the
live worker's leases are released.  The worker never re-registers (it only does
so on reconnect), so it is invisible to the dead-worker sweep from then on.

Seen in the chaos harness after ``pg_terminate_backend`` of every LISTEN session
(and after PostgreSQL restarts): all workers reconnect and sweep at once, and 1-2
of 3 workers lost their ``workers`` row in a third of the trials.
"""

from __future__ import annotations

import anyio
import asyncpg

from pgdurable_async._store.sql_loader import q

SETTINGS = {"search_path": "pgdurable"}


async def test_sweep_racing_a_reregistration_keeps_the_live_worker(dsn: str) -> None:
    admin = await asyncpg.connect(dsn, server_settings=SETTINGS)
    old = await asyncpg.connect(dsn, server_settings=SETTINGS)
    new = await asyncpg.connect(dsn, server_settings=SETTINGS)
    sweeper = await asyncpg.connect(dsn, server_settings=SETTINGS)
    try:
        # Worker A registered its LISTEN session, which then died.
        await old.execute(q("register_worker"), "vm:1:a")
        await admin.execute("SELECT pg_terminate_backend(backend_pid) FROM workers")
        # A holds a lease on a running activity.
        await admin.execute(
            "INSERT INTO work_queue (instance_id, execution_id, task_id, orchestration, name, visible_at,"
            " lease_token, lease_owner) VALUES ('i', 1, 1, 'o', 'act', now() + interval '30 s',"
            " gen_random_uuid(), 'vm:1:a')")
        # A reconnects and re-registers; its upsert has not committed yet ...
        tx = new.transaction()
        await tx.start()
        await new.execute(q("register_worker"), "vm:1:a")
        # ... while another runtime's sweep reaches A's (old, dead) row and waits for the lock.
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sweep, sweeper)
            with anyio.fail_after(10):
                while await admin.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                                           sweeper.get_server_pid()) != "Lock":
                    await anyio.sleep(0.01)
            await tx.commit()
        live = await admin.fetchval(
            "SELECT count(*) FROM workers w JOIN pg_stat_activity a ON a.pid = w.backend_pid"
            " WHERE w.worker_id = 'vm:1:a'")
        lease_kept = await admin.fetchval("SELECT visible_at > now() FROM work_queue WHERE lease_owner = 'vm:1:a'")
        assert live == 1, "the live worker's registration was deleted by the sweep"
        assert lease_kept, "the live worker's lease was released as if it had died"
    finally:
        for conn in (admin, old, new, sweeper):
            await conn.close()


async def _sweep(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.fetch(q("release_dead_leases"))
