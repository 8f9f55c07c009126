"""A turn held by a worker that dies: its messages are picked up at once, not at the next sweep.

A worker killed in the middle of a turn leaves its instance's row lock with its session; when
the server ends that session nothing sends a NOTIFY.  The other workers, who found the instance
locked, look again after a moment.
"""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

pytestmark = pytest.mark.timeout(60)
app = pgd.App()


@app.orchestration
async def echo(ctx: pgd.OrchestrationContext, value: str) -> str:
    return value


async def test_a_turn_whose_holder_dies_is_taken_over_before_the_sweep(dsn: str) -> None:
    async with pgd.Runtime(app, dsn):
        pass  # registers echo, so a client may start it with no runtime running
    async with pgd.Client(dsn) as client:
        await client.start(echo, "hello", instance_id="held")
    holder = await asyncpg.connect(dsn)  # stands in for a worker in the middle of this instance's turn
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM pgdurable.instances WHERE instance_id = 'held' FOR UPDATE")
        # The sweep (every 60 s here) would find it too: the test proves it is not needed.
        async with pgd.Runtime(app, dsn, sweep_interval=60) as runtime:
            deadline = time.monotonic() + 20
            while not runtime.turns.stats["held"]:  # its claim found the instance locked
                assert time.monotonic() < deadline, "the runtime never tried to claim the held instance"
                await anyio.sleep(0.05)
            holder_pid = holder.get_server_pid()
            killer = await asyncpg.connect(dsn)
            try:  # the holder's session ends as a killed worker's does: no commit, no NOTIFY
                assert await killer.fetchval("SELECT pg_terminate_backend($1)", holder_pid)
            finally:
                await killer.close()
            assert await runtime.client.wait("held", timeout=15) == "hello"
    finally:
        holder.terminate()
