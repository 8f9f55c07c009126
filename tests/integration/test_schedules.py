"""Schedules in one process: the client API and its errors, firing, overlap and catch-up.

(tests/acceptance/test_flow_processes.py fires schedules from two worker processes and kills one.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()
ID_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@app.orchestration
async def tick(ctx: pgd.OrchestrationContext, data: Any) -> Any:
    return data


@app.orchestration
async def slow_tick(ctx: pgd.OrchestrationContext, seconds: float) -> None:
    await ctx.sleep(seconds)


async def _fired(dsn: str, schedule_id: str) -> list[datetime]:
    """Fire times of the instances a schedule started, from their ids, in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT instance_id FROM pgdurable.instances WHERE instance_id LIKE $1 || '@%'"
                                " ORDER BY instance_id", schedule_id)
    finally:
        await conn.close()
    return [datetime.strptime(r["instance_id"].split("@", 1)[1], ID_FORMAT).replace(tzinfo=UTC) for r in rows]


async def _db_now(dsn: str) -> datetime:
    conn = await asyncpg.connect(dsn)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        return now
    finally:
        await conn.close()


async def _until(predicate: Any, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.05)


async def test_the_client_api_and_its_errors(dsn: str) -> None:
    async with pgd.Client(dsn) as client:
        created = await client.create_schedule("nightly", "tick", {"n": 1}, cron="0 3 * * *", timezone="Europe/Paris")
        assert created.next_fire_at.astimezone(UTC).hour in (1, 2)  # 03:00 in Paris
        await client.create_schedule("poll", "tick", every=timedelta(seconds=30), overlap="allow", catchup="all")
        with pytest.raises(pgd.ScheduleAlreadyExists):
            await client.create_schedule("nightly", "tick", cron="0 4 * * *")
        for bad in ("not a cron", "61 * * * *", "0 0 30 2 *", "* * *"):
            with pytest.raises(pgd.InvalidArgument):
                await client.create_schedule("bad", "tick", cron=bad)
        for kwargs in ({}, {"cron": "* * * * *", "every": 5}, {"every": 0.5}, {"every": 5, "overlap": "queue"},
                       {"every": 5, "catchup": "some"}, {"cron": "* * * * *", "timezone": "Mars/Olympus"}):
            with pytest.raises(pgd.InvalidArgument):
                await client.create_schedule("bad", "tick", **kwargs)
        with pytest.raises(pgd.InvalidArgument):
            await client.create_schedule("bad", "pgdurable.graph", every=5)

        listed = await client.list_schedules()
        assert [s.schedule_id for s in listed] == ["nightly", "poll"]
        nightly, poll = listed
        assert (nightly.orchestration, nightly.input, nightly.cron, nightly.every, nightly.timezone) == (
            "tick", {"n": 1}, "0 3 * * *", None, "Europe/Paris")
        assert (nightly.overlap, nightly.catchup, nightly.paused, nightly.last_instance_id) == (
            "skip", "latest", False, None)
        assert (poll.every, poll.cron, poll.overlap, poll.catchup, poll.input) == (
            timedelta(seconds=30), None, "allow", "all", None)
        assert isinstance(poll, pgd.ScheduleInfo)

        await client.pause_schedule("poll")
        assert (await client.get_schedule("poll")).paused
        await client.resume_schedule("poll")
        assert not (await client.get_schedule("poll")).paused

        handle = await client.trigger_schedule("nightly")  # no worker runs: the instance waits
        assert handle.instance_id.startswith("nightly@") and handle.instance_id.endswith("Z")
        assert isinstance(handle, pgd.InstanceHandle) and handle == handle.instance_id  # also the id, a str
        assert (await client.status(handle)).instance_id == handle
        assert (await client.status(handle.instance_id)).status is pgd.Status.PENDING
        assert (await client.get_schedule("nightly")).last_instance_id == handle.instance_id

        await client.delete_schedule("nightly")
        assert [s.schedule_id for s in await client.list_schedules()] == ["poll"]
        assert (await client.status(handle.instance_id)).status is pgd.Status.PENDING  # kept
        for call in (client.pause_schedule, client.resume_schedule, client.trigger_schedule, client.delete_schedule,
                     client.get_schedule):
            with pytest.raises(pgd.ScheduleNotFound):
                await call("nightly")


@pytest.mark.timeout(60)
async def test_an_interval_schedule_fires_once_per_time(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        info = await runtime.client.create_schedule("every-1", tick, {"hello": "world"}, every=1)
        first = info.next_fire_at
        assert first.microsecond == 0
        await _until(lambda: _count(dsn, "every-1", 3))
        fired = await _fired(dsn, "every-1")
        assert fired[:3] == [first, first + timedelta(seconds=1), first + timedelta(seconds=2)]
        latest = (await runtime.client.get_schedule("every-1")).last_instance_id
        assert latest is not None
        assert await runtime.client.wait(latest, timeout=10) == {"hello": "world"}
        assert runtime.schedules.fired >= 3


async def _count(dsn: str, schedule_id: str, n: int) -> bool:
    return len(await _fired(dsn, schedule_id)) >= n


@pytest.mark.timeout(60)
async def test_a_cron_schedule_does_not_fire_at_creation(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        info = await runtime.client.create_schedule("even-seconds", tick, cron="*/2 * * * * *")
        now = await _db_now(dsn)
        assert now < info.next_fire_at <= now + timedelta(seconds=2) and info.next_fire_at.second % 2 == 0
        await _until(lambda: _count(dsn, "even-seconds", 2))
        fired = await _fired(dsn, "even-seconds")
        assert fired[0] == info.next_fire_at
        assert all(t.second % 2 == 0 for t in fired) and all(b - a == timedelta(seconds=2)
                                                               for a, b in zip(fired, fired[1:], strict=False))


@pytest.mark.timeout(60)
async def test_overlap_skip_waits_for_the_running_instance_and_allow_does_not(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.create_schedule("skipping", slow_tick, 2.5, every=1)
        await runtime.client.create_schedule("allowing", slow_tick, 2.5, every=1, overlap="allow")
        await anyio.sleep(5.5)
        await runtime.client.pause_schedule("skipping")
        await runtime.client.pause_schedule("allowing")
    skipped, allowed = await _fired(dsn, "skipping"), await _fired(dsn, "allowing")
    assert len(allowed) >= 4
    assert 1 <= len(skipped) <= 2
    assert all(b - a >= timedelta(seconds=3) for a, b in zip(skipped, skipped[1:], strict=False)), skipped


async def _downtime(dsn: str, schedule_id: str, catchup: str) -> tuple[datetime, list[datetime]]:
    """Create a 1 s schedule while no worker runs its orchestration, wait 3.5 s, start one, let it run 2.5 s.

    Returns when the worker began watching (by the database's clock) and the fire times.
    """
    async with pgd.Client(dsn) as client:
        created = await client.create_schedule(schedule_id, "tick", every=1, catchup=catchup)
    await anyio.sleep(3.5)
    async with pgd.Runtime(app, dsn) as runtime:
        await anyio.sleep(2.5)
        back = runtime.schedules.watching_since
    assert back is not None
    fired = await _fired(dsn, schedule_id)
    assert fired and fired[0] >= created.next_fire_at
    return back, fired


@pytest.mark.timeout(60)
@pytest.mark.parametrize("catchup", ["all", "latest", "none"])
async def test_catchup_after_downtime(dsn: str, catchup: str) -> None:
    back, fired = await _downtime(dsn, f"down-{catchup}", catchup)
    missed = [t for t in fired if t < back]
    assert len(missed) == {"all": len(missed) if len(missed) >= 3 else -1, "latest": 1, "none": 0}[catchup], fired
    if catchup == "latest":
        assert back - missed[0] < timedelta(seconds=1)  # the most recent missed time
    assert len([t for t in fired if t >= back]) >= 1  # then on time again
    assert len(set(fired)) == len(fired)
    if catchup == "all":  # one after another, none skipped
        assert all(b - a == timedelta(seconds=1) for a, b in zip(missed, missed[1:], strict=False)), missed


@pytest.mark.timeout(60)
async def test_paused_schedules_do_not_fire_and_resume_skips_the_pause(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await runtime.client.create_schedule("paused", tick, every=1)
        await runtime.client.pause_schedule("paused")
        await anyio.sleep(2.5)
        assert await _fired(dsn, "paused") == []
        triggered = await runtime.client.trigger_schedule("paused")  # works while paused
        assert await triggered.result(timeout=10) is None
        resumed_at = await _db_now(dsn)
        await runtime.client.resume_schedule("paused")
        await _until(lambda: _count(dsn, "paused", 2))
    fired = await _fired(dsn, "paused")
    trigger_time = datetime.strptime(triggered.instance_id.split("@")[1], ID_FORMAT).replace(tzinfo=UTC)
    assert trigger_time in fired
    assert all(t > resumed_at for t in fired if t != trigger_time), (resumed_at, fired)  # no backfill of the pause
