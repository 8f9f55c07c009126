"""``python -m pgdurable_async worker`` as a real child process, for tests that kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg

ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """A worker process serving ``app`` (``module:attr``), logging to ``log_path``."""

    def __init__(
        self, dsn: str, app: str, log_path: Path, *extra: str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("PGDURABLE_DSN", None)
        with log_path.open("ab") as log:
            # A prefix (faketime) runs the worker as its child: signals go to the process group, so
            # the worker itself gets them (and is not left running once the test is over).
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "pgdurable_async", "worker", "--app", app, "--dsn", dsn, *extra],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=bool(prefix),
            )
        self.pid = self.proc.pid
        self._group = bool(prefix)

    def _running(self) -> bool:
        """The worker is still running (with a prefix: anything of its process group)."""
        if self.proc.poll() is None:
            return True
        if not self._group:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _signal(self, signum: int) -> None:
        if self._group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 60) -> None:
        """Wait until the worker logged that it is serving."""
        with anyio.fail_after(timeout):
            while " ready: " not in self.log():
                assert self.proc.poll() is None, f"worker exited early:\n{self.log()}"
                await anyio.sleep(0.05)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, whatever it was doing."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def stop(self, timeout: float = 40) -> int:
        """SIGTERM (graceful drain, which flushes pending acks); returns the exit code."""
        if self.proc.poll() is None:
            self.thaw()
            self._signal(signal.SIGTERM)
            with anyio.move_on_after(timeout):
                while self._running():
                    await anyio.sleep(0.05)
        return self.close()

    def close(self) -> int:
        """Reap the process, killing it if it is still running."""
        if self.proc.poll() is None:
            self.thaw()
            self._signal(signal.SIGKILL)
        code = self.proc.wait(timeout=10)
        if self._group:  # the prefix has exited: whatever of its group is left goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code


@contextlib.contextmanager
def reaped() -> Iterator[list[WorkerProcess]]:
    """A list to put started workers in: each is reaped (killed if still running) at the end."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.close()


async def sql_rows(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """``query``'s rows, on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()
