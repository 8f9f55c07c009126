"""Cancel and terminate reach running children, recursively, in a real worker process.

The tree: ``p`` has a child ``p.done`` that finished long ago and a child ``p.c``
(asleep) whose own child ``p.c.c`` sleeps too.  Stopping ``p`` stops ``p.c`` and
``p.c.c`` (each history says so, naming its parent) and leaves ``p.done`` alone.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import pgdurable_async as pgd
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(90)
APP = "tests.integration.lifecycle_app:app"


async def _tree(client: pgd.Client, root: str) -> None:
    """Start the tree and wait until its deepest level is asleep."""
    await client.start("with_done_child", None, instance_id=root)
    with anyio.fail_after(30):
        while True:
            try:
                if "timer_created" in [e.kind for e in await client.history(f"{root}.c.c")]:
                    return
            except pgd.InstanceNotFound:
                pass
            await anyio.sleep(0.05)


async def _settled(client: pgd.Client, ids: list[str]) -> dict[str, pgd.Status]:
    with anyio.fail_after(30):
        while True:
            states = {i: (await client.status(i)).status for i in ids}
            if all(s.is_terminal for s in states.values()):
                return states
            await anyio.sleep(0.05)


async def test_cancel_cascades_two_levels(dsn: str, tmp_path: Path) -> None:
    worker = WorkerProcess(dsn, APP, tmp_path / "worker.log")
    try:
        await worker.ready()
        async with pgd.Client(dsn) as client:
            await _tree(client, "p")
            await client.cancel("p", reason="not needed")
            states = await _settled(client, ["p", "p.c", "p.c.c"])
            assert states == {i: pgd.Status.CANCELLED for i in ("p", "p.c", "p.c.c")}
            for instance_id, parent in (("p", None), ("p.c", "p"), ("p.c.c", "p.c")):
                events = await client.history(instance_id)
                cancels = [e.data for e in events if e.kind == "cancel_requested"]
                expected = {"reason": "not needed"} | ({"cascaded_from": parent} if parent else {})
                assert cancels == [expected], instance_id
                assert events[-1].kind == "orchestration_cancelled"
            done = await client.status("p.done")
            assert done.status is pgd.Status.COMPLETED and done.output == "early"
            assert "cancel_requested" not in [e.kind for e in await client.history("p.done")]
    finally:
        await worker.stop()


async def test_terminate_cascades_two_levels(dsn: str, tmp_path: Path) -> None:
    worker = WorkerProcess(dsn, APP, tmp_path / "worker.log")
    try:
        await worker.ready()
        async with pgd.Client(dsn) as client:
            await _tree(client, "t")
            await client.terminate("t", reason="ops")
            # One transaction: the whole tree is terminated when terminate() returns.
            assert {i: (await client.status(i)).status for i in ("t", "t.c", "t.c.c")} == {
                i: pgd.Status.TERMINATED for i in ("t", "t.c", "t.c.c")
            }
            for instance_id, parent in (("t", None), ("t.c", "t"), ("t.c.c", "t.c")):
                last = (await client.history(instance_id))[-1]
                assert last.kind == "orchestration_terminated"
                assert last.data == {"reason": "ops"} | ({"cascaded_from": parent} if parent else {})
            assert (await client.status("t.done")).status is pgd.Status.COMPLETED
            assert (await client.history("t.done"))[-1].kind == "orchestration_completed"
            await anyio.sleep(0.5)  # the worker must not revive any of them
            for instance_id in ("t", "t.c", "t.c.c"):
                assert (await client.history(instance_id))[-1].kind == "orchestration_terminated"
    finally:
        await worker.stop()
    assert "Traceback" not in worker.log()


async def test_cancel_of_a_child_leaves_its_parent_running(dsn: str) -> None:
    from tests.integration import lifecycle_app

    async with pgd.Runtime(lifecycle_app.app, dsn) as runtime:
        client = runtime.client
        await _tree(client, "q")
        await client.cancel("q.c.c")
        assert (await _settled(client, ["q.c.c"])) == {"q.c.c": pgd.Status.CANCELLED}
        # The middle level's ctx.all fails with the child's cancellation: it fails, its parent too.
        states = await _settled(client, ["q.c", "q"])
        assert states == {"q.c": pgd.Status.FAILED, "q": pgd.Status.FAILED}
        assert "cancel_requested" not in [e.kind for e in await client.history("q.c")]
