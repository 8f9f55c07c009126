"""``InstanceState.waiting_on`` on a real runtime: activities, timers, events and children, then nothing."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import anyio
import orjson

import pgdurable_async as pgd
from tests.integration.test_cli import REPO, _env

app = pgd.App()
_released = anyio.Event()


@app.activity
async def blocked(ctx: pgd.ActivityContext, _: Any) -> str:
    await _released.wait()
    return "done"


@app.orchestration
async def held(ctx: pgd.OrchestrationContext, _: Any) -> Any:
    return await ctx.wait_for_event("release")


@app.orchestration
async def everything(ctx: pgd.OrchestrationContext, _: Any) -> list[Any]:
    return await ctx.all([
        ctx.call_activity(blocked, None),
        ctx.sleep(timedelta(hours=1)),
        ctx.wait_for_event("go", timeout=timedelta(hours=2)),
        ctx.call_orchestration(held, None, instance_id=f"{ctx.instance_id}-child"),
        ctx.wait_for_event("free"),
    ])


async def _waits(client: pgd.Client, instance_id: str, count: int) -> list[dict[str, Any]]:
    with anyio.fail_after(20):
        while True:
            state = await client.status(instance_id)
            if len(state.waiting_on) == count:
                return state.waiting_on
            await anyio.sleep(0.05)


async def test_waiting_on_every_kind_then_nothing(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await client.start(everything, None, instance_id="w")
        waits = await _waits(client, "w", 5)
        by_name = {w["name"]: w for w in waits}
        created = (await client.status("w")).created_at
        assert {(w["kind"], w["name"]) for w in waits} == {
            ("activity", "blocked"), ("timer", "timer #2"), ("event", "go"), ("child", "held"), ("event", "free")}
        assert by_name["timer #2"]["until"] - by_name["timer #2"]["since"] == timedelta(hours=1)
        assert by_name["go"]["until"] - by_name["go"]["since"] == timedelta(hours=2)  # its timeout timer folded in
        assert "until" not in by_name["free"] and by_name["held"]["instance_id"] == "w-child"
        assert all(w["since"] >= created for w in waits)
        child = await _waits(client, "w-child", 1)
        assert [(w["kind"], w["name"]) for w in child] == [("event", "release")]
        assert [s.waiting_on for s in await client.list(name="held")] == [child]

        await client.raise_event("w", "go", 1)
        assert "go" not in {w["name"] for w in await _waits(client, "w", 4)}
        _released.set()
        assert "blocked" not in {w["name"] for w in await _waits(client, "w", 3)}

        proc = await anyio.run_process([sys.executable, "-m", "pgdurable_async", "status", "w", "--dsn", dsn],
                                       cwd=REPO, env=_env(), check=False)
        text = proc.stdout.decode()
        assert proc.returncode == 0, proc.stderr
        assert "waiting_on" in text and "child held (w-child) since" in text and "event free since" in text
        proc = await anyio.run_process([sys.executable, "-m", "pgdurable_async", "status", "w", "--json", "--dsn", dsn],
                                       cwd=REPO, env=_env(), check=False)
        assert {w["kind"] for w in orjson.loads(proc.stdout)["waiting_on"]} == {"timer", "child", "event"}

        await client.terminate("w")
        assert (await client.status("w")).waiting_on == []
