"""``worker --processes N``: a supervisor that runs N worker processes and drains them on SIGTERM.

Each child is ``python -m pgdurable_async`` with the supervisor's own command line and
``--processes 1`` appended (argparse keeps the last value), in a process group of its own: a
terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM to every child, so each
drains once (a second signal is forwarded too: the children then exit at once, as a lone worker
does).  On Linux a child also gets SIGTERM if the supervisor itself dies.

A child that exits on its own is started again after a pause, unless it failed within
``STARTUP_GRACE`` seconds of its start (a bad ``--app`` or DSN would fail every time): then the
supervisor stops the others and exits with that child's code.  It exits 0 once every child has
drained and exited 0 after a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import anyio

log = logging.getLogger("pgdurable_async.cli")

STARTUP_GRACE = 10.0  # seconds: a child failing sooner is a configuration error, not a crash
RESTART_DELAY = 1.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor goes away (Linux' PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class Supervisor:
    """Runs ``count`` copies of ``argv`` (a worker command line) and drains them on a signal."""

    def __init__(self, argv: Sequence[str], count: int) -> None:
        self.argv = [sys.executable, "-m", "pgdurable_async", *argv, "--processes", "1"]
        self.count = count
        self.children: dict[int, asyncio.subprocess.Process] = {}  # slot -> running child
        self.stopping = False
        self.failure: int | None = None  # exit code of a child that failed at start

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(  # asyncio's, for preexec_fn (the runtime runs on asyncio)
            *self.argv, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.info("supervisor: worker process %d started (pid %d)", slot, child.pid)
        return child

    async def _run_slot(self, slot: int) -> None:
        """Keep one worker process running until the supervisor stops."""
        while not self.stopping:
            started = time.monotonic()
            child = await self._spawn(slot)
            self.children[slot] = child
            if self.stopping:  # the signal came while it was starting
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
            code = await child.wait()
            self.children.pop(slot, None)
            if self.stopping:
                if code != 0:
                    log.warning("supervisor: worker process %d (pid %d) exited %d while draining", slot, child.pid,
                                code)
                    self.failure = self.failure or code
                return
            if code != 0 and time.monotonic() - started < STARTUP_GRACE:
                log.error("supervisor: worker process %d exited %d at start; stopping", slot, code)
                self.failure = code
                self.request_stop()
                return
            log.warning("supervisor: worker process %d (pid %d) exited %d; starting it again", slot, child.pid, code)
            await anyio.sleep(RESTART_DELAY)

    def request_stop(self) -> None:
        """Ask every child to drain (SIGTERM); idempotent."""
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for child in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    async def run(self) -> int:
        """Until SIGTERM/SIGINT: then drain every child; returns the exit code."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._watch, signals)
                async with anyio.create_task_group() as slots:  # each returns once stopping and its child is gone
                    for slot in range(self.count):
                        slots.start_soon(self._run_slot, slot)
                outer.cancel_scope.cancel()
        log.info("supervisor stopped")
        return self.failure or 0

    async def _watch(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.stopping:
                log.info("supervisor: %s received: draining %d worker processes", name, len(self.children))
                self.request_stop()
            else:
                log.warning("supervisor: second %s: the workers exit without finishing", name)
                self._signal_all(signal.SIGTERM)


async def supervise(argv: Sequence[str], count: int) -> int:
    """Run ``count`` worker processes of the command line ``argv`` until a signal; their exit code."""
    log.info("supervisor %d: %d worker processes", os.getpid(), count)
    return await Supervisor(argv, count).run()
