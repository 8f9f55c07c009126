"""``python -m pgdurable_async dashboard``: mistakes are one line, before anything listens."""

from __future__ import annotations

from tests.integration.test_cli import UNREACHABLE, assert_one_error_line, cli


async def test_dashboard_errors_are_one_line(empty_dsn: str) -> None:
    line = assert_one_error_line(await cli("dashboard", "--port", "1", dsn=UNREACHABLE))
    assert "cannot reach PostgreSQL" in line
    line = assert_one_error_line(await cli("dashboard", dsn=empty_dsn))
    assert "not installed" in line and "migrate" in line
    assert_one_error_line(await cli("dashboard", "--port", "0", dsn=empty_dsn), code=2)
    assert_one_error_line(await cli("dashboard"), code=2)  # no database named
    proc = await cli("dashboard", "--help")
    assert proc.returncode == 0 and all(f in proc.stdout for f in ("--host", "--port", "--allow-actions", "--token"))
