"""The testing kit: a time-skipping Environment on real PostgreSQL, and the replayer (function and CLI)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import pgdurable_async as pgd
from pgdurable_async import testing
from tests.integration import replay_app
from tests.integration.test_cli import assert_one_error_line, cli, ok

pytestmark = pytest.mark.timeout(120)
app = pgd.App()
attempts: dict[str, int] = {}


@app.orchestration
async def monthly(ctx: pgd.OrchestrationContext, _: Any) -> list[str]:
    before = ctx.now()
    await ctx.sleep(timedelta(days=30))
    return [before.isoformat(), ctx.now().isoformat()]


@app.activity(retry=pgd.RetryPolicy(max_attempts=3, initial_interval=3600, backoff=2, max_interval=86400))
async def shaky(ctx: pgd.ActivityContext, key: str) -> int:
    attempts[key] = attempts.get(key, 0) + 1
    if ctx.attempt < 3:
        raise ConnectionError("try again in an hour")
    return ctx.attempt


@app.orchestration
async def patient(ctx: pgd.OrchestrationContext, key: str) -> int:
    return int(await ctx.call_activity(shaky, key))


@app.orchestration
async def approval(ctx: pgd.OrchestrationContext, _: Any) -> str:
    try:
        return str(await ctx.wait_for_event("approve", timeout=timedelta(days=7)))
    except pgd.TimeoutError:
        return "expired"


def _elapsed(result: list[str]) -> timedelta:
    before, after = (datetime.fromisoformat(t) for t in result)
    return after - before


async def test_a_30_day_sleep_takes_milliseconds(dsn: str) -> None:
    async with testing.Environment(app, dsn) as env:
        started = time.perf_counter()
        result = await (await env.client.start(monthly, None)).result(timeout=10)
        wall = time.perf_counter() - started
        elapsed = _elapsed(result)
        print(f"\n30-day sleep: {wall * 1000:.0f} ms of wall time, ctx.now() advanced {elapsed}")
        assert wall < 1.0
        assert timedelta(days=30) <= elapsed < timedelta(days=30, minutes=1)
        assert env.clock_offset >= timedelta(days=29, hours=23) and env.skips == 1


async def test_retry_backoff_and_event_timeouts_are_skipped(dsn: str) -> None:
    async with testing.Environment(app, dsn) as env:
        started = time.perf_counter()
        assert await (await env.client.start(patient, "k1")).result(timeout=10) == 3  # 1 h + 2 h of backoff
        assert await (await env.client.start(approval, None)).result(timeout=10) == "expired"  # a week
        assert time.perf_counter() - started < 5
        assert attempts["k1"] == 3
        assert env.clock_offset >= timedelta(days=7, hours=3) - timedelta(minutes=1)  # less the real time passed


async def test_without_time_skipping_time_is_real_until_advanced(dsn: str) -> None:
    async with testing.Environment(app, dsn, time_skipping=False) as env:
        handle = await env.client.start(monthly, None)
        with pytest.raises(pgd.TimeoutError):
            await handle.result(timeout=1)
        await env.advance(timedelta(days=30))
        assert _elapsed(await handle.result(timeout=10)) >= timedelta(days=30)


async def test_environment_starts_its_own_cluster() -> None:
    async with testing.Environment(app) as env:  # no DSN: a throwaway cluster from the local binaries
        dsn = env.dsn
        assert _elapsed(await (await env.client.start(monthly, None)).result(timeout=10)) >= timedelta(days=30)
    with pytest.raises(pgd.DatabaseError):
        async with pgd.Client(dsn) as client:
            client.db.retry_for = 0.5
            await client.list()


# -- replay -----------------------------------------------------------------------------
async def _asleep(handle: pgd.InstanceHandle) -> None:
    with anyio.fail_after(10):
        while "timer_created" not in [e.kind for e in await handle.history()]:
            await anyio.sleep(0.02)


async def test_replay_saved_histories_and_catch_a_reordered_step(dsn: str, tmp_path: Path) -> None:
    async with testing.Environment(replay_app.app, dsn, time_skipping=False) as env:
        done = await env.client.start("fulfil", {"id": 7}, instance_id="order-7")
        await _asleep(done)
        await env.advance(timedelta(days=2))
        assert await done.result(timeout=10) == ["charged 7", "shipped 7"]
        running = await env.client.start("fulfil", {"id": 8}, instance_id="order-8")
        await _asleep(running)  # a running instance, two days from its next step
        events = await running.history()
        for instance_id in ("order-7", "order-8"):
            (tmp_path / f"{instance_id}.json").write_text(await ok("history", instance_id, "--json", dsn=dsn))

    # Today's code replays both; the reordered code is caught, by the function and by the CLI.
    testing.replay(replay_app.app, tmp_path / "order-7.json")
    testing.replay(replay_app.app, events, instance_id="order-8")
    testing.replay(replay_app.app, (tmp_path / "order-8.json").read_text(), instance_id="order-8")
    with pytest.raises(pgd.NonDeterminismError, match="ship"):
        testing.replay(replay_app.reordered, tmp_path / "order-7.json")
    testing.replay(replay_app.app, events)  # the history names its instance: it seeds ctx.new_uuid()
    anonymous = [pgd.HistoryEvent(e.seq, e.kind, {k: v for k, v in e.data.items() if k != "instance_id"},
                                  e.recorded_at) for e in events]  # as older versions recorded it
    with pytest.raises(pgd.NonDeterminismError, match="give the instance id"):
        testing.replay(replay_app.app, anonymous)  # the idempotency key came from ctx.new_uuid()
    testing.replay(replay_app.app, anonymous, instance_id="order-8")

    files = [str(tmp_path / "order-7.json"), str(tmp_path / "order-8.json")]
    passed = await ok("replay", "--app", "tests.integration.replay_app:app", *files, dsn=dsn)
    assert passed.count(": ok (") == 2
    failed = await cli("replay", "--app", "tests.integration.replay_app:reordered", *files)
    line = assert_one_error_line(failed)
    assert "order-7.json: non-determinism:" in line and "ship" in line
    renamed = tmp_path / "renamed.json"
    renamed.write_text((tmp_path / "order-7.json").read_text())
    await ok("replay", "--app", "tests.integration.replay_app:app", str(renamed), dsn=dsn)  # its history says
    anonymous_file = tmp_path / "older.json"  # as older versions exported it: the start names no instance
    anonymous_file.write_text(orjson.dumps([{"seq": e.seq, "kind": e.kind, "data": e.data,
                                             "recorded_at": e.recorded_at} for e in anonymous]).decode())
    wrong = assert_one_error_line(await cli("replay", "--app", "tests.integration.replay_app:app",
                                            str(anonymous_file)))
    assert "older.json: non-determinism" in wrong and "give the instance id" in wrong
    await ok("replay", "--app", "tests.integration.replay_app:app", "--instance-id", "order-8",
             str(anonymous_file), dsn=dsn)
