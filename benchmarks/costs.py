"""What a benchmark phase cost: this process's CPU, PostgreSQL's statement time and backend CPU.

``Meter`` snapshots, before and after a phase, on one scratch database:

* this process's user+sys CPU (the engine's Python side, or the floor's driver), plus that of
  ``extra_pids`` (the extra worker processes of ``bench --processes N``);
* ``pg_stat_statements`` (when the server preloads it): total statement execution
  time and calls in this database, and the statements that took most of it;
* the CPU of the server's backends connected to this database, read from
  ``/proc/<pid>/stat`` when the server runs on this machine (else left out).

The figures are divided by the phase's activity count by the caller.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any

import asyncpg

__all__ = ["Meter", "Snapshot", "cpu_seconds", "peak_rss_mb", "current_rss_mb"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds() -> float:
    """CPU time of this process (user + system), children excluded."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident set so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return float("nan")


def _proc_cpu(pid: int) -> float | None:
    """utime+stime of a local process in seconds (None: not on this machine or gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Snapshot:
    """One reading of a database's costs."""

    cpu: float
    statements: dict[int, tuple[str, int, float]] = field(default_factory=dict)  # queryid -> (text, calls, ms)
    backends: dict[int, float] = field(default_factory=dict)  # backend pid -> CPU seconds
    backends_readable: bool = False


class Meter:
    """Reads :class:`Snapshot` s of one database over a connection of its own."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements_available = False
        self.extra_pids: list[int] = []  # local processes whose CPU counts as ours (extra workers)

    @classmethod
    async def open(cls, conn: asyncpg.Connection) -> Meter:
        """A meter on ``conn``'s database; loads ``pg_stat_statements`` there if the server preloads it."""
        meter = cls(conn)
        preload = str(await conn.fetchval("SHOW shared_preload_libraries"))
        if "pg_stat_statements" in preload:
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
                await conn.fetchval("SELECT count(*) FROM public.pg_stat_statements")
                meter.statements_available = True
            except asyncpg.PostgresError:
                meter.statements_available = False
        return meter

    async def snapshot(self) -> Snapshot:
        snap = Snapshot(cpu=cpu_seconds() + sum(_proc_cpu(pid) or 0.0 for pid in self.extra_pids))
        if self.statements_available:
            rows = await self.conn.fetch(
                "SELECT queryid, query, calls, total_exec_time FROM public.pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND queryid IS NOT NULL"
            )
            snap.statements = {int(r["queryid"]): (r["query"], int(r["calls"]), float(r["total_exec_time"]))
                               for r in rows}
        pids = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        readable = False
        for r in pids:
            cpu = _proc_cpu(int(r["pid"]))
            if cpu is not None:
                snap.backends[int(r["pid"])] = cpu
                readable = True
        snap.backends_readable = readable or not pids
        return snap

    @staticmethod
    def costs(before: Snapshot, after: Snapshot, items: int, *, top: int = 6) -> dict[str, Any]:
        """Per-item costs between two snapshots (µs), and the statements that took the most time."""
        found: dict[str, Any] = {"cpu_us_per_activity": 1e6 * (after.cpu - before.cpu) / items}
        if after.statements:
            deltas: list[tuple[float, int, str]] = []
            for qid, (text, calls, ms) in after.statements.items():
                _, calls0, ms0 = before.statements.get(qid, (text, 0, 0.0))
                if calls > calls0 and "pg_stat_" not in text:  # not the meter's own reads
                    deltas.append((ms - ms0, calls - calls0, text))
            total_ms = sum(d[0] for d in deltas)
            found["pg_statement_us_per_activity"] = 1000 * total_ms / items
            found["pg_statements_per_activity"] = sum(d[1] for d in deltas) / items
            deltas.sort(reverse=True)
            found["pg_top_statements"] = [
                {"us_per_activity": 1000 * ms / items, "calls": calls, "query": " ".join(text.split())[:160]}
                for ms, calls, text in deltas[:top]
            ]
        if after.backends_readable:
            used = sum(cpu - before.backends.get(pid, 0.0) for pid, cpu in after.backends.items())
            found["pg_backend_cpu_us_per_activity"] = 1e6 * used / items
        return found
