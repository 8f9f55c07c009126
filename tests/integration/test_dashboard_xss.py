"""Ids, names and data are user input: every page escapes them (and a strict CSP backs that up)."""

from __future__ import annotations

from typing import Any

import anyio
import httpx

import pgdurable_async as pgd
from pgdurable_async.dashboard import create_app

SCRIPT = "<script>alert('{}')</script>"
HOSTILE_ID = "<img src=x onerror=alert(1)>\"><b>id</b>&amp;"

xss = pgd.App()


@xss.activity(name=SCRIPT.format("activity"))
async def act(ctx: pgd.ActivityContext, data: Any) -> Any:
    return data


@xss.orchestration(name=SCRIPT.format("name"))
async def orch(ctx: pgd.OrchestrationContext, data: dict[str, Any]) -> None:
    ctx.set_custom_status("<svg onload=alert('status')>")
    await ctx.call_activity(act, data)
    if data.get("wait"):
        await ctx.wait_for_event("<b>evt</b>")
    raise RuntimeError(SCRIPT.format("error"))


RAW = ["<script>", "<img src", "<svg onload", "<b>"]  # each payload opens with one of these


def _assert_escaped(page: str, where: str) -> None:
    for raw in RAW:
        assert raw not in page, (where, raw)


async def test_hostile_ids_names_and_data_are_escaped_everywhere(dsn: str) -> None:
    payload = {"html": "</pre><script>alert('input')</script>", "wait": True}
    async with pgd.Runtime(xss, dsn) as runtime:
        client = runtime.client
        await client.start(orch, payload, instance_id=HOSTILE_ID)
        failed = await client.start(orch, {"html": "</pre><b>x</b>"}, instance_id=HOSTILE_ID + "-2")
        try:
            await failed.result(timeout=20)
        except pgd.InstanceFailed:
            pass
        with anyio.fail_after(20):
            while not (await client.status(HOSTILE_ID)).waiting_on:
                await anyio.sleep(0.05)
        asgi = create_app(dsn, allow_actions=True, token="t")
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://d") as http:
                listed = (await http.get("/api/instances")).json()["instances"]
                assert {s["instance_id"] for s in listed} == {HOSTILE_ID, HOSTILE_ID + "-2"}  # the API is exact
                pages = {
                    "overview": "/", "list": "/instances", "search": "/instances?q=%3Cscript%3E",
                    "running": "/instances/" + _quote(HOSTILE_ID), "failed": "/instances/" + _quote(HOSTILE_ID + "-2"),
                    "unknown": "/instances/" + _quote(SCRIPT.format("unknown")),
                }
                for where, path in pages.items():
                    r = await http.get(path)
                    assert r.status_code in (200, 404), (where, r.status_code)
                    _assert_escaped(r.text, where)
                    assert "script-src 'self'" in r.headers["content-security-policy"]
                running = (await http.get(pages["running"])).text
                assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in running  # shown, as text
                assert "&lt;b&gt;evt&lt;/b&gt;" in running  # the event it waits on
                assert "&lt;/pre&gt;&lt;script&gt;" in running  # its input
                assert 'data-instance-id="&lt;img src=x onerror=alert(1)&gt;&#34;&gt;&lt;b&gt;id&lt;/b&gt;&amp;amp;"' \
                    in running  # an attribute: quotes escaped too
                assert "&lt;script&gt;alert(&#39;error&#39;)" in (await http.get(pages["failed"])).text
                assert "&lt;script&gt;alert(&#39;error&#39;)" in (await http.get("/")).text  # recent failures
        finally:
            await asgi.state.dashboard.close()


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
