"""Retention: purge finished instances not updated for a window, in small batches, at each sweep.

Each batch is one short transaction: up to :data:`BATCH` finished instances (the
oldest first, rows a turn holds skipped rather than waited for), each with its
finished descendants and all their history.  Batches are paced (a pause as long
as the batch took), and a sweep runs at most :data:`MAX_BATCHES` of them, so a
large backlog is worked off over several sweeps instead of competing with turns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

import anyio

from .._base.errors import ConfigurationError, DatabaseError
from .._store import Database, instance_store
from .loops import guarded
from .wakeup import Wakeup

log = logging.getLogger("pgdurable_async.retention")

BATCH = 100  # finished instances (each with its finished descendants) per transaction
MAX_BATCHES = 50  # per sweep


class Retention:
    """Purges the database's finished instances older than ``window`` whenever :meth:`due` is called."""

    def __init__(self, db: Database, window: timedelta, *, batch: int = BATCH, max_batches: int = MAX_BATCHES) -> None:
        if not isinstance(window, timedelta) or window <= timedelta(0):
            raise ConfigurationError("retention must be a positive timedelta")
        self.db = db
        self.window = window
        self.batch = batch
        self.max_batches = max_batches
        self.purged = 0  # instances purged by this runtime
        self.max_batch_seconds = 0.0  # the longest purge transaction so far
        self.refused = False  # the database role may not purge (history is the owner's to delete)
        self._due = Wakeup()

    def due(self) -> None:
        """Ask for a sweep (the runtime calls it at each safety sweep)."""
        self._due.set()

    async def run(self, stopping: Callable[[], bool]) -> None:
        while not stopping() and not self.refused:
            seen = self._due.generation
            await guarded("retention", lambda: self.sweep(stopping))
            await self._due.wait(seen)

    async def _batch(self) -> int:
        try:
            return await self.db.run(lambda conn: instance_store.purge_finished(
                conn, older_than=self.window, status=None, limit=self.batch))
        except DatabaseError as exc:
            if getattr(exc, "sqlstate", None) != "42501":  # insufficient_privilege
                raise
            self.refused = True
            log.error("retention is off: this runtime's database role may not purge (%s); purging deletes "
                      "history, which only the schema's owner may: run retention as the owner, or "
                      "`purge --older-than` from the owner's schedule", exc)
            return 0

    async def sweep(self, stopping: Callable[[], bool] = lambda: False) -> int:
        """Purge batches until none is left (or :attr:`max_batches` ran); returns the instances purged."""
        total = 0
        for _ in range(self.max_batches):
            if stopping():
                break
            started = time.perf_counter()
            purged = await self._batch()
            took = time.perf_counter() - started
            self.max_batch_seconds = max(self.max_batch_seconds, took)
            total += purged
            if not purged:
                break
            await anyio.sleep(took)  # paced: a backlog takes at most half of the database's time
        if total:
            self.purged += total
            log.info("retention purged %d finished instances older than %s", total, self.window)
        return total
