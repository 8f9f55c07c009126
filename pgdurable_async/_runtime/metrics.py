"""Prometheus metrics: the process's counters and histograms, and the database-wide gauges.

The process-local metrics (attempts, durations, turns, replays, running activities) are
updated by :class:`~pgdurable_async._runtime.observer.Observer` as work happens.  The
database-wide gauges (queue depths and ages, instances per status, the oldest running
activity, lock waits, the WAL position) are read on scrape by :class:`DatabaseCollector`
from one query, at most once a second per process.  :func:`register` adds both to
``prometheus_client.REGISTRY`` once per process, however many runtimes ask
(``Runtime(metrics=True)``; the worker's ``--metrics-port``); :func:`serve` starts the
``/metrics`` endpoint.

One database per process: with several runtimes the gauges come from the most recently
started one still running (the counters add up over all of them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._base.errors import ConfigurationError
from .._base.types import Status
from .._store import Database
from .._store.ops_store import MetricsSnapshot, metrics_snapshot

log = logging.getLogger("pgdurable_async.metrics")

_SNAPSHOT_MAX_AGE = 1.0  # seconds: the database-wide gauges are read at most this often
_SCRAPE_TIMEOUT = 5.0
_QUEUES = ("orchestrator", "work", "timers")

ACTIVITY_ATTEMPTS = Counter(
    "pgdurable_activity_attempts", "Activity attempts this process finished, by outcome (completed, failed, retried)",
    ["activity", "outcome"], registry=None,
)
ACTIVITY_DURATION = Histogram(
    "pgdurable_activity_duration_seconds", "Run time of an activity attempt", ["activity"], registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf")),
)
ACTIVITIES_RUNNING = Gauge("pgdurable_activities_running", "Activities running now in this process", registry=None)
TURNS = Counter("pgdurable_turns", "Orchestration turns committed by this process", registry=None)
REPLAYS = Counter("pgdurable_replays", "Full replays of an instance's history (turn cache misses)", registry=None)
TURN_DURATION = Histogram(
    "pgdurable_turn_duration_seconds",
    "Time of a committed turn transaction (a batch of instances' turns shares one)", registry=None,
)
_PROCESS_METRICS = (ACTIVITY_ATTEMPTS, ACTIVITY_DURATION, ACTIVITIES_RUNNING, TURNS, REPLAYS, TURN_DURATION)


class Source:
    """A running runtime's database and event loop (the snapshot query runs there)."""

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop, local_oldest: Any) -> None:
        self.db = db
        self.loop = loop
        self.local_oldest = local_oldest  # () -> seconds the oldest activity of this runtime has run


class DatabaseCollector(Collector):
    """The database-wide gauges, read on scrape (at most once a second) from the newest source."""

    def __init__(self) -> None:
        self._sources: list[Source] = []
        self._lock = threading.Lock()
        self._snapshot: MetricsSnapshot | None = None
        self._taken = -float("inf")  # monotonic time of the snapshot
        self._refreshing: Any = None  # the pending refresh future, scheduled from the loop's own thread

    def add(self, source: Source) -> None:
        with self._lock:
            self._sources.append(source)

    def remove(self, source: Source) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None, 0.0))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            source = self._sources[-1] if self._sources else None
            snapshot = self._current(source)
        local = source.local_oldest() if source is not None else 0.0
        return list(self._families(snapshot, local))

    def _current(self, source: Source | None) -> MetricsSnapshot | None:
        """The snapshot, refreshed first when older than a second (under the lock)."""
        if source is None or time.monotonic() - self._taken < _SNAPSHOT_MAX_AGE:
            return self._snapshot
        future = self._refreshing
        if future is None or future.done():
            try:
                future = self._refreshing = asyncio.run_coroutine_threadsafe(self._read(source.db), source.loop)
            except RuntimeError:  # the loop has closed
                return self._snapshot
        if _on_loop(source.loop):
            # Scraped from the runtime's own event loop (a service's /metrics route): it cannot
            # wait for a query that needs this very loop, so it gets the last snapshot and the
            # refresh lands for the next scrape.
            return self._snapshot
        try:
            future.result(timeout=_SCRAPE_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            log.warning("the metrics query took longer than %g s; serving the previous figures", _SCRAPE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a scrape never fails for a database hiccup
            log.warning("the metrics query failed (%s); serving the previous figures", exc)
        return self._snapshot

    async def _read(self, db: Database) -> None:
        snapshot = await db.run(metrics_snapshot, transaction=False, retry_for=1.0)
        self._snapshot, self._taken = snapshot, time.monotonic()

    @staticmethod
    def _families(s: MetricsSnapshot | None, local_oldest: float) -> Iterator[Metric]:
        depth = GaugeMetricFamily("pgdurable_queue_depth", "Rows in the queue (ready, delayed or leased), "
                                  "database-wide", labels=["queue"])
        age = GaugeMetricFamily("pgdurable_queue_oldest_age_seconds", "Age of the oldest ready row of the queue "
                                "(checkpoint age); 0 when none is ready", labels=["queue"])
        flow = GaugeMetricFamily("pgdurable_flow_queue_depth", "Work items of a flow queue (pgd.Queue), "
                                 "database-wide", labels=["queue"])
        instances = GaugeMetricFamily("pgdurable_instances", "Instances per status", labels=["status"])
        oldest = GaugeMetricFamily("pgdurable_activity_oldest_running_seconds",
                                   "How long the longest-running activity has run, database-wide")
        locks = GaugeMetricFamily("pgdurable_lock_waits", "Sessions of this database waiting on a lock")
        wal = GaugeMetricFamily("pgdurable_wal_bytes", "The WAL position in bytes (rate() is WAL growth)")
        if s is not None:
            for queue in _QUEUES:
                depth.add_metric([queue], s.depths[queue])
                age.add_metric([queue], s.oldest_ages[queue])
            for name, n in sorted(s.flow_depths.items()):
                flow.add_metric([name], n)
            statuses = [status.value for status in Status]
            for status in [*statuses, *sorted(set(s.statuses) - set(statuses))]:
                instances.add_metric([status], s.statuses.get(status, 0))
            oldest.add_metric([], max(s.oldest_running, local_oldest))
            locks.add_metric([], s.lock_waits)
            wal.add_metric([], s.wal_bytes)
        yield from (depth, age, flow, instances, oldest, locks, wal)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


COLLECTOR = DatabaseCollector()
_registered = False
_register_lock = threading.Lock()


def register(db: Database, local_oldest: Any) -> Source:
    """Join ``prometheus_client.REGISTRY`` (once per process) and make ``db`` the gauges' source.

    Call it from the runtime's event loop; give the source back to :func:`unregister` at stop.
    """
    global _registered
    with _register_lock:
        if not _registered:
            done: list[Collector] = []
            collectors: tuple[Collector, ...] = (*_PROCESS_METRICS, COLLECTOR)
            try:
                for metric in collectors:
                    REGISTRY.register(metric)
                    done.append(metric)
            except ValueError as exc:  # a name taken by someone else's collector
                for metric in done:
                    REGISTRY.unregister(metric)
                raise ConfigurationError(f"cannot register the pgdurable metrics: {exc}") from None
            _registered = True
    source = Source(db, asyncio.get_running_loop(), local_oldest)
    COLLECTOR.add(source)
    return source


def unregister(source: Source) -> None:
    """A stopping runtime's database is no longer a source of the gauges."""
    COLLECTOR.remove(source)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``prometheus_client.REGISTRY`` at ``http://host:port/metrics`` (a daemon thread);
    returns the port it bound."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return int(server.server_port)
