"""The dashboard's JSON API and pages through httpx against the ASGI app, on a real database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest

import pgdurable_async as pgd
from pgdurable_async.dashboard import create_app
from tests.integration.dashboard_app import app, pipeline, waiter
from tests.integration.test_roles import roles  # noqa: F401 - a fixture: a worker and a client role

TOKEN = "s3cret-token"


@contextlib.asynccontextmanager
async def web(dsn: str, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a fresh dashboard app (closing the app's own client afterwards)."""
    asgi = create_app(dsn, app=app, **options)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://dashboard") as http:
            yield http
    finally:
        await asgi.state.dashboard.close()


def _iso(value: Any) -> datetime:
    assert isinstance(value, str)
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


async def test_instance_history_and_pages_of_a_finished_workflow(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        output = await (await runtime.client.start(pipeline, {"fail": "bad"}, instance_id="p1")).result(timeout=30)
    async with web(dsn) as http:
        r = await http.get("/api/instances/p1")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert {"instance_id", "name", "status", "input", "output", "error", "custom_status", "created_at",
                "updated_at", "waiting_on"} <= set(body)
        assert (body["instance_id"], body["name"], body["status"], body["output"]) == ("p1", "pipeline", "completed",
                                                                                        output)
        assert body["custom_status"] == {"stage": "done"} and body["waiting_on"] == []
        assert _iso(body["created_at"]) <= _iso(body["updated_at"])

        events = (await http.get("/api/instances/p1/history")).json()["events"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert {"seq", "kind", "data", "recorded_at"} <= set(events[0]) and events[0]["kind"] == "orchestration_started"
        assert all(_iso(e["recorded_at"]) for e in events) and events[-1]["kind"] == "orchestration_completed"
        completed = [e["data"] for e in events if e["kind"] == "activity_completed"]
        assert {"task_id": 3, "attempts": 2, "result": "ok after 2 attempts"} in completed  # the retried one

        for path in ("/api/instances/nope", "/api/instances/nope/history", "/api/instances/" + "x" * 300):
            r = await http.get(path)
            assert r.status_code == 404 and "error" in r.json(), path
        r = await http.get("/instances/nope")
        assert r.status_code == 404 and "text/html" in r.headers["content-type"]

        for path in ("/", "/instances", "/instances/p1", "/instances/p1-child", "/static/dashboard.css"):
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text[:500])
        page = (await http.get("/instances/p1")).text
        assert page.count('class="bar bar-activity') == 4 and page.count('class="bar bar-timer') == 1
        assert page.count('class="bar bar-child') == 1 and 'data-attempts="2"' in page
        assert "default-src 'none'" in r.headers["content-security-policy"]


async def _waiting(http: httpx.AsyncClient, instance_id: str, count: int) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            body: dict[str, Any] = (await http.get(f"/api/instances/{instance_id}")).json()
            if len(body.get("waiting_on", [])) == count:
                return body
            await anyio.sleep(0.05)


async def test_waiting_on_in_the_api_and_on_the_page(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime, web(dsn) as http:
        await runtime.client.start(waiter, None, instance_id="w1")
        body = await _waiting(http, "w1", 2)
        assert body["status"] == "running"
        by_kind = {w["kind"]: w for w in body["waiting_on"]}
        assert by_kind["event"]["name"] == "approve" and by_kind["timer"]["name"] == "timer #2"
        for wait in body["waiting_on"]:
            assert _iso(wait["since"]) < _iso(wait["until"])
        page = (await http.get("/instances/w1")).text
        assert 'id="waiting-on"' in page and "timeout of approve" in page and 'data-outcome="running"' in page
        listed = (await http.get("/api/instances", params={"status": "running"})).json()["instances"]
        assert [(s["instance_id"], len(s["waiting_on"])) for s in listed] == [("w1", 2)]


async def test_keyset_pagination_and_filters(dsn: str) -> None:
    client = pgd.Client(dsn, app=app)  # no runtime: the instances stay pending
    async with client:
        for i in range(7):
            await client.start(pipeline, {"n": i}, instance_id=f"page-{i}")
        await client.start(waiter, None, instance_id="other")
    async with web(dsn) as http:
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": "3", "name": "pipeline", **({"cursor": cursor} if cursor else {})}
            body = (await http.get("/api/instances", params=params)).json()
            seen += [s["instance_id"] for s in body["instances"]]
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
        assert pages == 3 and seen == [f"page-{i}" for i in range(6, -1, -1)]  # newest first, each once

        async def ids(**params: str) -> list[str]:
            return [s["instance_id"] for s in (await http.get("/api/instances", params=params)).json()["instances"]]

        assert await ids(q="GE-3") == ["page-3"]  # case-insensitive substring of the id ...
        assert await ids(q="wait") == ["other"]  # ... or of the name
        assert await ids(q="%") == [] and await ids(q="_") == []  # LIKE wildcards are literal
        assert len(await ids(status="pending")) == 8 and await ids(status="failed") == []
        for params in ({"status": "bogus"}, {"cursor": "not-a-cursor"}, {"limit": "0"}, {"limit": "x"}):
            r = await http.get("/api/instances", params=params)
            assert r.status_code == 400 and "error" in r.json(), params
        html = (await http.get("/instances", params={"limit": "3", "name": "pipeline"})).text
        assert 'id="next-page"' in html and "page-6" in html and "page-3" not in html


async def test_actions_are_refused_unless_enabled_and_authorised(dsn: str) -> None:
    with pytest.raises(pgd.PgDurableError, match="token"):
        create_app(dsn, allow_actions=True)
    async with pgd.Runtime(app, dsn) as runtime:
        for name in ("a1", "a2", "a3"):
            await runtime.client.start(waiter, None, instance_id=name)
        with anyio.fail_after(20):  # a1 has run its first turn (so "nothing happened" below can be told apart)
            while (await runtime.client.status("a1")).status is not pgd.Status.RUNNING:
                await anyio.sleep(0.05)
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with web(dsn) as http:  # read-only: refused whatever the token
            for action in ("cancel", "terminate", "raise-event"):
                for headers in ({}, good):
                    r = await http.post(f"/api/instances/a1/{action}", json={"name": "approve"}, headers=headers)
                    assert r.status_code == 403, (action, headers)
            assert "Cancel</button>" not in (await http.get("/instances/a1")).text
        async with web(dsn, allow_actions=True, token=TOKEN) as http:
            assert "Cancel</button>" in (await http.get("/instances/a1")).text
            for action in ("cancel", "terminate", "raise-event"):
                r = await http.post(f"/api/instances/a1/{action}", json={})
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), action
                r = await http.post(f"/api/instances/a1/{action}", json={}, headers={"Authorization": "Basic eA=="})
                assert r.status_code == 401, action
                r = await http.post(f"/api/instances/a1/{action}", json={},
                                    headers={"Authorization": "Bearer wrong"})
                assert r.status_code == 403, action
            assert (await runtime.client.status("a1")).status is pgd.Status.RUNNING  # nothing happened

            r = await http.post("/api/instances/a1/raise-event", json={"name": "approve", "data": {"ok": 1}},
                                headers=good)
            assert r.status_code == 200 and r.json()["ok"] is True
            assert await runtime.client.wait("a1", timeout=20) == {"ok": 1}
            r = await http.post("/api/instances/a2/cancel", json={"reason": "from the dashboard"}, headers=good)
            assert r.status_code == 200
            with pytest.raises(pgd.Cancelled):
                await runtime.client.wait("a2", timeout=20)
            r = await http.post("/api/instances/a3/terminate", json={"reason": "stop"}, headers=good)
            assert r.status_code == 200 and r.json()["status"] == "terminated"
            r = await http.post("/api/instances/a3/cancel", headers=good)
            assert r.status_code == 200 and "nothing to do" in r.json()["note"]

            assert (await http.post("/api/instances/nope/cancel", headers=good)).status_code == 404
            r = await http.post("/api/instances/a1/raise-event", json={"data": 1}, headers=good)
            assert r.status_code == 400
            r = await http.post("/api/instances/a1/terminate", content=b"{not json", headers=good)
            assert r.status_code == 400
            r = await http.post("/api/instances/a1/terminate", json={"reason": 5}, headers=good)
            assert r.status_code == 400


async def test_a_client_role_sees_instances_but_not_queues(roles: tuple[str, str]) -> None:  # noqa: F811
    worker_dsn, client_dsn = roles
    async with pgd.Runtime(app, worker_dsn) as runtime:
        await runtime.client.start(waiter, None, instance_id="r1")
        async with web(client_dsn) as http:
            await _waiting(http, "r1", 2)  # waiting_on needs only instances and history
            overview = (await http.get("/")).text
            assert "may not read the queues" in overview and 'data-status="running"' in overview
            assert (await http.get("/instances/r1")).status_code == 200
        async with web(worker_dsn) as http:
            assert 'data-queue="timers"' in (await http.get("/")).text


async def test_the_overview_lists_flow_queues_with_their_limits(dsn: str) -> None:
    flow = pgd.App()
    limited = pgd.Queue("dash-q", concurrency=3, rate_limit=pgd.RateLimit(5, per=2), key_concurrency=1)

    @flow.activity(queue=limited)
    async def call_api(ctx: pgd.ActivityContext, n: int) -> int:
        return n

    @flow.orchestration
    async def calls(ctx: pgd.OrchestrationContext, n: int) -> int:
        return await ctx.call_activity(call_api, n, key="tenant-a")

    async with pgd.Runtime(flow, dsn) as runtime:  # upserts its queues at start
        assert await (await runtime.client.start(calls, 7)).result(timeout=20) == 7
    async with web(dsn) as http:
        page = (await http.get("/")).text
    row = page.split('data-flow-queue="dash-q">', 1)[1].split("</tr>", 1)[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells == ["dash-q", "3", "5 per 2.0 s", "1", "0", "0", "0"]
