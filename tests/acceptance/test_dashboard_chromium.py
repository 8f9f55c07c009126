"""The dashboard in a real headless Chromium: `python -m pgdurable_async dashboard` serving a real workflow.

The DOM Chromium builds must hold the timeline SVG with one bar per activity, timer and
child, coloured by outcome; the screenshots go to ``$PGDURABLE_SCREENSHOTS`` (else the
test's tmp directory) for a person to look at.  Debian's ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

import pgdurable_async as pgd
from pgdurable_async.dashboard._timeline import COLOURS
from tests.acceptance.cdp import Browser
from tests.integration.dashboard_app import app, explode, pipeline, waiter

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"
TOKEN = "chromium-test-token"


class Elements(HTMLParser):
    """Every start tag of a document, with its attributes (what the tests look for)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, cls: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _chromium(*options: str, url: str) -> str:
    """Run headless Chromium once on ``url`` (a fresh profile each time); its stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="pgd-chromium-") as profile:
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   "--window-size=1280,1600", *options, url]
        with anyio.fail_after(120):
            done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


@contextlib.asynccontextmanager
async def _dashboard(dsn: str, log: Path) -> AsyncIterator[str]:
    """``python -m pgdurable_async dashboard`` on a free port, actions on; yields its base URL."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PGDURABLE_DASHBOARD_TOKEN": TOKEN}
    env.pop("PGDURABLE_DSN", None)
    command = [sys.executable, "-m", "pgdurable_async", "dashboard", "--dsn", dsn, "--port", str(port),
               "--allow-actions", "--app", "tests.integration.dashboard_app:app"]
    with log.open("wb") as sink:
        proc = await anyio.open_process(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)
    try:
        with anyio.fail_after(30):
            while "dashboard on http://127.0.0.1" not in log.read_text():
                assert proc.returncode is None, log.read_text()
                await anyio.sleep(0.1)
            while True:
                with contextlib.suppress(OSError):
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                await anyio.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            with anyio.move_on_after(20, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await proc.aclose()


@pytest.fixture
def shots(tmp_path: Path) -> Iterator[Path]:
    where = Path(os.environ.get("PGDURABLE_SCREENSHOTS") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    yield where


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
async def test_the_dashboard_in_headless_chromium(dsn: str, shots: Path, tmp_path: Path) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await (await client.start(pipeline, {"fail": "bad input"}, instance_id="p1")).result(timeout=30)
        await (await client.start("graph_flow", None, instance_id="g1")).result(timeout=30)
        with contextlib.suppress(pgd.InstanceFailed):
            await (await client.start(explode, "it broke", instance_id="x1")).result(timeout=30)
        await client.start(waiter, {"note": "waits for approve"}, instance_id="w1")
        await client.start(waiter, None, instance_id=HOSTILE)
        with anyio.fail_after(20):
            while len((await client.status("w1")).waiting_on) < 2 or not (await client.status(HOSTILE)).waiting_on:
                await anyio.sleep(0.05)

        async with _dashboard(dsn, tmp_path / "dashboard.log") as base:
            # The finished pipeline: 4 activities (2 fetch, flaky retried once, broken failed), a timer, a child.
            dom = Elements(await _chromium("--dump-dom", url=f"{base}/instances/p1"))
            assert dom.find("svg", id="timeline")
            bars = dom.find("rect", "bar")
            assert sorted(b["data-kind"] for b in bars) == ["activity"] * 4 + ["child", "timer"]
            by_name = {}
            for bar in bars:
                by_name.setdefault(bar["data-name"], []).append(bar)
                assert bar["fill"] == COLOURS[bar["data-outcome"]][0]
            assert [b["data-outcome"] for b in by_name["fetch"]] == ["completed", "completed"]
            assert by_name["broken"][0]["data-outcome"] == "failed" and by_name["broken"][0]["fill"] == "#e53935"
            assert by_name["flaky"][0]["data-attempts"] == "2" and "retried" in by_name["flaky"][0]["class"]
            assert by_name["child_flow"][0]["data-outcome"] == "completed"
            assert by_name["timer #4"][0]["data-outcome"] == "completed"
            assert all(float(b["width"]) >= 3 for b in bars)

            # The waiting instance: two running timers (one is the event's timeout), and what it waits on.
            dom = Elements(await _chromium("--dump-dom", url=f"{base}/instances/w1"))
            assert [(b["data-kind"], b["data-outcome"], b["fill"]) for b in dom.find("rect", "bar")] == \
                [("timer", "running", COLOURS["running"][0])] * 2
            assert sorted(r["data-kind"] for r in dom.find("tr") if "data-kind" in r and r.get("data-kind") in
                          ("timer", "event")) == ["event", "timer"]
            assert dom.find("section", "actions")  # --allow-actions shows the buttons

            # The graph workflow: every node drawn with its state.
            dom = Elements(await _chromium("--dump-dom", url=f"{base}/instances/g1"))
            states = [n["data-state"] for n in dom.find("span", "node")]
            assert len(states) == 6 and set(states) == {"completed"}

            # A hostile id is text in the page, never markup that runs.
            html = await _chromium("--dump-dom", url=f"{base}/instances/{quote(HOSTILE, safe='')}")
            dom = Elements(html)
            assert not dom.find("img") and "<title>pwned</title>" not in html  # no element, no handler ran
            assert dom.find("span", id="instance-id")

            pages = {"overview": "/", "instances": "/instances", "instance-pipeline": "/instances/p1",
                     "instance-waiting": "/instances/w1", "instance-graph": "/instances/g1"}
            for name, path in pages.items():
                png = shots / f"{name}.png"
                png.unlink(missing_ok=True)
                await _chromium(f"--screenshot={png}", url=base + path)
                data = png.read_bytes()
                assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
            overview = Elements(await _chromium("--dump-dom", url=base + "/"))
            counts = {c["data-status"] for c in overview.find("a", "card")}
            assert counts == {s.value for s in pgd.Status}
            assert overview.find("svg", id="chart-activities") and overview.find("table", id="queues")


def _click(browser: Browser, action: str, token: str, **fields: str) -> None:
    """Fill the token and a form's fields, then press its button (after this call returns: a
    ``confirm()`` would otherwise block the evaluation)."""
    script = [f"document.getElementById('token').value = {json.dumps(token)};",
              f"const form = document.querySelector('form[data-action=\"{action}\"]');",
              "document.getElementById('action-result').textContent = '';"]
    script += [f"form.elements[{json.dumps(k)}].value = {json.dumps(v)};" for k, v in fields.items()]
    script.append("setTimeout(() => form.querySelector('button').click(), 0); true")
    browser.evaluate("(() => {" + " ".join(script) + "})()")


def _buttons(chromium: str, base: str, shots: Path) -> list[str]:
    """Press the instance page's buttons as a person would; the result lines the page showed."""
    shown = []
    with tempfile.TemporaryDirectory(prefix="pgd-chromium-") as profile:
        browser = Browser(chromium, profile, "--window-size=1280,1000")
        try:
            result = "document.getElementById('action-result').textContent"
            browser.navigate(f"{base}/instances/b1")
            _click(browser, "cancel", "wrong")
            shown.append(browser.wait_for(result))
            _click(browser, "raise-event", TOKEN, name="approve", data='{"by": "chromium"}')
            shown.append(browser.wait_for(result))
            browser.screenshot(str(shots / "instance-action.png"))
            browser.navigate(f"{base}/instances/b2")
            _click(browser, "terminate", TOKEN, reason="pressed in chromium")
            shown.append(browser.accept_dialog())
            shown.append(browser.wait_for(result))
        finally:
            browser.close()
    return shown


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
async def test_the_action_buttons_in_chromium(dsn: str, shots: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        for name in ("b1", "b2"):
            await client.start(waiter, None, instance_id=name)
        with anyio.fail_after(20):
            while not all([(await client.status(n)).waiting_on for n in ("b1", "b2")]):
                await anyio.sleep(0.05)
        async with _dashboard(dsn, tmp_path / "dashboard.log") as base:
            shown = await anyio.to_thread.run_sync(_buttons, CHROMIUM, base, shots)
        assert shown[0] == "403: wrong token"
        assert shown[1].startswith("raise-event: requested")
        assert await client.wait("b1", timeout=20) == {"by": "chromium"}
        assert shown[2].startswith("Terminate now?") and shown[3].startswith("terminate: requested")
        state = await client.status("b2")
        assert state.status is pgd.Status.TERMINATED and state.error["message"] == "pressed in chromium"
