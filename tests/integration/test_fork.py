"""Fork: re-run an instance from a point of its history with today's code, completed work not repeated."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd
from tests.integration import lifecycle_app
from tests.integration.test_cli import ok
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)
APP = "tests.integration.lifecycle_app:app"


async def _runs(dsn: str, instance_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT name, count(*) AS n FROM public.runs WHERE instance_id = $1 GROUP BY name",
                                instance_id)
        return {r["name"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def _prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(lifecycle_app.RUNS_TABLE)
    finally:
        await conn.close()


async def test_fork_a_failed_instance_after_the_fix(dsn: str, tmp_path: Path) -> None:
    """Deploy 1 has the bug: step three fails (twice: its retry).  Deploy 2 (another worker
    process) has the fix; the fork replays one and two from history, runs three and four."""
    await _prepare(dsn)
    buggy = WorkerProcess(dsn, APP, tmp_path / "buggy.log", env={"LIFECYCLE_FAIL": "1"})
    try:
        await buggy.ready()
        async with pgd.Client(dsn) as client:
            source = await client.start("pipeline", None, instance_id="src")
            with pytest.raises(pgd.InstanceFailed, match="the bug"):
                await source.result(timeout=30)
            failure = next(e for e in await client.history("src") if e.kind == "activity_failed")
            assert failure.data["attempts"] == 2
    finally:
        await buggy.stop()
    assert await _runs(dsn, "src") == {"one": 1, "two": 1}

    fixed = WorkerProcess(dsn, APP, tmp_path / "fixed.log")
    try:
        await fixed.ready()
        async with pgd.Client(dsn) as client:
            src_events = await client.history("src")
            failed_at = next(e.seq for e in src_events if e.kind == "activity_failed")
            fork = await client.fork("src", new_instance_id="src-fixed")
            assert fork.instance_id == "src-fixed"
            assert await fork.result(timeout=30) == ["one done", "two done", "three fixed", "four done"]
            events = await fork.history()
            prefix = failed_at - 1
            assert [(e.seq, e.kind, e.data) for e in events[:prefix]] == [
                (e.seq, e.kind, e.data) for e in src_events[:prefix]
            ]
            assert events[prefix].kind == "forked_from"
            assert events[prefix].data["instance_id"] == "src" and events[prefix].data["at_seq"] == prefix
            assert events[-1].kind == "orchestration_completed"
            assert await fork.get_value("stage") == "finished"
            assert (await client.status("src")).status is pgd.Status.FAILED  # the source is left as it was
            assert (await client.history("src"))[-1].kind == "orchestration_failed"
    finally:
        await fixed.stop()
    # Completed activities were not repeated: one and two ran once, for the source only.
    assert await _runs(dsn, "src-fixed") == {"four": 1}
    assert await _runs(dsn, "src") == {"one": 1, "two": 1}


# -- in-process cases ---------------------------------------------------------------------
app = pgd.App()
reordered = pgd.App()


@app.activity
async def note(ctx: pgd.ActivityContext, value: Any) -> Any:
    return value


@app.activity(retry=pgd.RetryPolicy(max_attempts=1))
async def refuse(ctx: pgd.ActivityContext, value: Any) -> Any:
    raise ValueError(f"refused {value}")


@app.orchestration
async def chain(ctx: pgd.OrchestrationContext, fail: bool) -> list[Any]:
    a = await ctx.call_activity(note, "a")
    await ctx.sleep(timedelta(milliseconds=200))
    kid = await ctx.call_orchestration(leaf, str(ctx.new_uuid()))  # a generated child id, a seeded input
    b = await ctx.call_activity(refuse if fail else note, "b")
    return [a, kid, b]


@app.orchestration
async def leaf(ctx: pgd.OrchestrationContext, value: str) -> str:
    return f"leaf {value[:4]}"


@reordered.activity(name="note")
async def note2(ctx: pgd.ActivityContext, value: Any) -> Any:
    return value


@reordered.orchestration(name="chain")
async def chain2(ctx: pgd.OrchestrationContext, fail: bool) -> list[Any]:
    await ctx.sleep(timedelta(milliseconds=200))  # the sleep now comes first
    return [await ctx.call_activity(note2, "a")]


def _seq(events: list[pgd.HistoryEvent], kind: str) -> int:
    return next(e.seq for e in events if e.kind == kind)


async def test_fork_default_point_and_generated_children(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        with pytest.raises(pgd.InstanceFailed, match="refused b"):
            await (await client.start(chain, True, instance_id="c1")).result(timeout=30)
        source = await client.history("c1")
        # The fork replays a, the timer and the child (the
        # source's child id and the source's ctx.new_uuid() stream), then runs b again.
        again = await client.fork("c1")
        with pytest.raises(pgd.InstanceFailed, match="refused b"):  # same code: it fails again, at b
            await again.result(timeout=30)
        forked = await again.history()
        assert forked[_seq(source, "activity_failed") - 1].kind == "forked_from"
        leaf_id = next(e.data["instance_id"] for e in source if e.kind == "sub_orchestration_scheduled")
        assert leaf_id.startswith("c1:")  # no new child: the copy's child result is reused
        assert [s.instance_id for s in await client.list(name="leaf")] == [leaf_id]


async def test_fork_reissues_what_the_prefix_left_open(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        done = await (await client.start(chain, False, instance_id="c2")).result(timeout=30)
        source = await client.history("c2")
        # Cut right after each command (the fork must issue it again itself), and right after a
        # completion (the code runs on past the copy at once, its next command after forked_from).
        for kind in ("activity_scheduled", "timer_created", "sub_orchestration_scheduled", "activity_completed"):
            at = _seq(source, kind)
            fork = await client.fork("c2", at_seq=at, new_instance_id=f"c2-{kind}")
            assert await fork.result(timeout=30) == done
            events = await fork.history()
            assert events[at].kind == "forked_from"
            assert [e.kind for e in events[: at]] == [e.kind for e in source[:at]]
            assert sum(e.kind == kind for e in events) == sum(e.kind == kind for e in source)  # not re-recorded
        # Each fork ran its own child (the source's child belongs to the source), also the fork
        # whose copy ends with the child scheduled: it is issued again under the fork's id.
        task = _seq_task(source)
        kids = {s.instance_id for s in await client.list(name="leaf")}
        assert kids == {f"c2:1:{task}"} | {f"c2-{k}:1:{task}" for k in ("activity_scheduled", "timer_created",
                                                                        "sub_orchestration_scheduled",
                                                                        "activity_completed")}
        fork_of_fork = await client.fork("c2-timer_created", new_instance_id="c2-again")
        assert await fork_of_fork.result(timeout=30) == done  # a fork's fork keeps the original's seed


def _seq_task(events: list[pgd.HistoryEvent]) -> int:
    return int(next(e.data["task_id"] for e in events if e.kind == "sub_orchestration_scheduled"))


async def test_fork_with_code_that_disagrees_fails_with_nondeterminism(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        with pytest.raises(pgd.InstanceFailed):
            await (await runtime.client.start(chain, True, instance_id="c3")).result(timeout=30)
    async with pgd.Runtime(reordered, dsn) as runtime:
        fork = await runtime.client.fork("c3", new_instance_id="c3-new")
        with pytest.raises(pgd.InstanceFailed) as failed:
            await fork.result(timeout=30)
        assert failed.value.error["type"] == "NonDeterminismError"
        kinds = [e.kind for e in await fork.history()]
        assert kinds[-2:] == ["forked_from", "orchestration_failed"]


async def test_fork_errors(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await (await client.start(chain, False, instance_id="c4")).result(timeout=30)
        length = len(await client.history("c4"))
        with pytest.raises(pgd.InstanceNotFound):
            await client.fork("no-such")
        with pytest.raises(pgd.InvalidArgument, match="out of range"):
            await client.fork("c4", at_seq=length)  # would copy its ending
        with pytest.raises(pgd.InvalidArgument):
            await client.fork("c4", at_seq=0)
        await client.fork("c4", at_seq=2, new_instance_id="c4-x")
        with pytest.raises(pgd.InstanceAlreadyExists):
            await client.fork("c4", at_seq=2, new_instance_id="c4-x")
        # No failure: the default copies everything before the end.
        whole = await client.fork("c4")
        events = await whole.history()
        assert events[length - 1].kind == "forked_from" and events[length - 1].data["at_seq"] == length - 1
        with anyio.fail_after(30):
            assert await whole.result() == await client.wait("c4")


async def test_fork_from_the_command_line(dsn: str, tmp_path: Path) -> None:
    await _prepare(dsn)
    async with pgd.Runtime(lifecycle_app.app, dsn) as runtime:
        await (await runtime.client.start("pipeline", None, instance_id="cli-src")).result(timeout=30)
        new_id = (await ok("fork", "cli-src", "--at-seq", "3", "--id", "cli-fork", dsn=dsn)).strip()
        assert new_id == "cli-fork"
        assert len(await runtime.client.wait("cli-fork", timeout=30)) == 4
        events = await runtime.client.history("cli-fork")
        assert events[3].data == {"instance_id": "cli-src", "at_seq": 3}
        assert events[0].data == {"name": "pipeline", "input": None, "instance_id": "cli-src", "execution_id": 1}


async def test_fork_of_a_history_recorded_by_an_older_version(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before this version, orchestration_started did not name its execution: the fork's
    forked_from then carries the source's seed, so the copied uuids still replay."""
    from pgdurable_async._runtime import turns

    monkeypatch.setattr(turns, "_fact", lambda row, message: (message.kind, message.payload))
    async with pgd.Runtime(app, dsn) as runtime:
        with pytest.raises(pgd.InstanceFailed):
            await (await runtime.client.start(chain, True, instance_id="legacy")).result(timeout=30)
        assert "instance_id" not in (await runtime.client.history("legacy"))[0].data
        monkeypatch.undo()
        fork = await runtime.client.fork("legacy", new_instance_id="legacy-fork")
        with pytest.raises(pgd.InstanceFailed, match="refused b"):  # replayed the copy, failed at b again
            await fork.result(timeout=30)
        marker = next(e for e in await fork.history() if e.kind == "forked_from")
        assert marker.data["seed"] == "legacy/1"
