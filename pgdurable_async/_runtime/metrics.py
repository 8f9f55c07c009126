"""Prometheus metrics: the process's counters and histograms, and the database-wide gauges.

The process-local metrics (attempts, durations, turns, replays, running activities) are
updated by :class:`~pgdurable_async._runtime.observer.Observer` as work happens.  The
database-wide gauges (queue depths and ages, instances per status, the oldest running
activity, lock waits, the WAL position) are read on scrape by :class:`DatabaseCollector`
from one query, at most once a second per process, on a connection and thread of its own.  :func:`register` adds both to
``prometheus_client.REGISTRY`` once per process, however many runtimes ask
(``Runtime(metrics=True)``; the worker's ``--metrics-port``); :func:`serve` starts the
``/metrics`` endpoint.

One database per process: with several runtimes the gauges come from the most recently
started one still running (the counters add up over all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
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
_counted: weakref.WeakSet[Any] = weakref.WeakSet()  # observers of metrics=True runtimes: .running()


def count_running(observer: Any) -> None:
    """Add ``observer.running()`` (its runtime's running attempts) to pgdurable_activities_running,
    read at scrape time: nothing to update per attempt."""
    _counted.add(observer)


ACTIVITIES_RUNNING.set_function(lambda: sum(o.running() for o in list(_counted)))
_PROCESS_METRICS = (ACTIVITY_ATTEMPTS, ACTIVITY_DURATION, ACTIVITIES_RUNNING, TURNS, REPLAYS, TURN_DURATION)


class Source:
    """A running runtime's database, read from a thread of its own.

    The snapshot query runs on a daemon thread with its own event loop and one connection,
    so a scrape waits for it from any thread, the runtime's own event loop included (a
    service's ``/metrics`` route): nothing it waits for needs the loop it blocks.
    """

    def __init__(self, db: Database, local_oldest: Callable[[], float]) -> None:
        self.local_oldest = local_oldest  # seconds the oldest attempt of this runtime has run
        self._dsn, self._schema, self._pooled = db.dsn, db.schema, db.pooled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: Database | None = None

    def snapshot(self, timeout: float) -> MetricsSnapshot:
        """Run the snapshot query (blocking the calling thread, at most ``timeout`` seconds)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=_serve, args=(self._loop,), name="pgdurable-metrics", daemon=True).start()
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise

    async def _read(self) -> MetricsSnapshot:
        if self._db is None:
            self._db = Database(self._dsn, schema=self._schema, min_size=1, max_size=1, pooled=self._pooled)
        return await self._db.run(metrics_snapshot, transaction=False, retry_for=1.0)

    async def close(self) -> None:
        """Close the connection and end the thread (from any event loop)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(db.close(), loop))
        loop.call_soon_threadsafe(loop.stop)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


class DatabaseCollector(Collector):
    """The database-wide gauges, read on scrape (at most once a second) from the newest source."""

    def __init__(self) -> None:
        self._sources: list[Source] = []
        self._lock = threading.Lock()
        self._snapshot: MetricsSnapshot | None = None
        self._taken = -float("inf")  # monotonic time of the snapshot

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
        with self._lock:  # one query at a time, however many scrapes
            source = self._sources[-1] if self._sources else None
            if source is not None and time.monotonic() - self._taken >= _SNAPSHOT_MAX_AGE:
                try:
                    self._snapshot, self._taken = source.snapshot(_SCRAPE_TIMEOUT), time.monotonic()
                except FutureTimeout:
                    log.warning("the metrics query took longer than %g s; serving the last figures", _SCRAPE_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - a scrape never fails for a database hiccup
                    log.warning("the metrics query failed (%s); serving the last figures", exc)
            snapshot = self._snapshot
        local = source.local_oldest() if source is not None else 0.0
        return list(self._families(snapshot, local))

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


COLLECTOR = DatabaseCollector()
_registered = False
_register_lock = threading.Lock()


def register(db: Database, local_oldest: Callable[[], float]) -> Source:
    """Join ``prometheus_client.REGISTRY`` (once per process) and make ``db`` the gauges' source
    (an opened database: its pooling mode is known); give the source to :func:`unregister` at stop.
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
    source = Source(db, local_oldest)
    COLLECTOR.add(source)
    return source


async def unregister(source: Source) -> None:
    """A stopping runtime's database is no longer a source of the gauges."""
    COLLECTOR.remove(source)
    await source.close()


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``prometheus_client.REGISTRY`` at ``http://host:port/metrics`` (a daemon thread);
    returns the port it bound."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return int(server.server_port)
