"""Chaos driver: real worker processes, random faults, then an invariant check.

K ``python -m pgdurable_async worker`` processes run :mod:`tests.chaos.chaos_app`
while the driver starts M ``mixed`` instances, raises the events they wait for
and, at moments drawn from a seeded RNG, injects faults:

* SIGKILL of a worker (at a random moment, or aimed mid-turn, mid-activity or
  mid-ack), which is then restarted;
* ``pg_ctl restart -m immediate`` of the PostgreSQL server;
* ``pg_terminate_backend`` of every worker's LISTEN session.

When every instance has finished, the ``check_*`` functions below (one per
invariant) read a snapshot of the database, and a one-line summary is printed
and appended to ``tests/chaos/RESULTS.md``.  Run it alone with
``python -m tests.chaos.harness --preset full`` (it starts its own cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import orjson
from anyio.abc import TaskGroup

import pgdurable_async as pgd
from pgdurable_async._store.cluster import EmbeddedCluster
from pgdurable_async._store.database import is_transient
from tests.chaos import chaos_app

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
APP_SPEC = "tests.chaos.chaos_app:app"
TERMINAL = ("completed", "failed", "cancelled", "terminated")
TASK_EVENTS = frozenset({
    "activity_scheduled", "activity_completed", "activity_failed", "timer_created", "timer_fired",
    "sub_orchestration_scheduled", "sub_orchestration_completed", "sub_orchestration_failed",
})
TERMINAL_EVENTS = frozenset({
    "orchestration_completed", "orchestration_failed", "orchestration_cancelled", "orchestration_terminated",
    "continued_as_new",
})
KILL_MODES = ("anytime", "mid-turn", "mid-activity", "mid-ack")
RECOVERY_TIMEOUT = 90.0  # seconds a surviving worker gets to show it works again
T = TypeVar("T")


@dataclass
class ChaosConfig:
    """What to run and which faults to inject (counts are exact; moments are random)."""

    seed: int = 1
    workers: int = 3
    instances: int = 10
    kills: int = 10
    pg_restarts: int = 2
    listen_kills: int = 2
    window: float = 60.0  # faults, starts and events are spread over this many seconds
    fanout: tuple[int, int] = (200, 1000)
    concurrency: int = 16
    lease_seconds: float = 3.0
    sweep_interval: float = 2.0
    finish_timeout: float = 600.0  # after the window, for every instance to finish
    results: Path | None = RESULTS_PATH
    command: str = ""
    log_dir: Path | None = None


@dataclass
class Life:
    """One worker process."""

    slot: int
    pid: int
    log_path: Path
    exit_code: int | None = None


@dataclass
class Restart:
    """One PostgreSQL restart and what the surviving workers did afterwards."""

    began: float
    done_db: datetime | None = None
    survivors: list[int] = field(default_factory=list)
    recovered_after: float | None = None
    completions: int = 0


@dataclass
class Report:
    """Counts, notes and violations of one run."""

    kills: Counter[str] = field(default_factory=Counter)
    pg_restarts: list[Restart] = field(default_factory=list)
    listen_kills: int = 0
    listen_backends: int = 0
    listen_rebind: list[float] = field(default_factory=list)
    instances: int = 0
    events_checked: int = 0
    effects: int = 0
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"chaos: kills={sum(self.kills.values())} pg_restarts={len(self.pg_restarts)} "
            f"listen_kills={self.listen_kills} instances={self.instances} events_checked={self.events_checked} "
            f"violations={len(self.violations)}"
        )

    def details(self) -> str:
        modes = ",".join(f"{m}:{self.kills[m]}" for m in KILL_MODES)
        recovery = ",".join("-" if r.recovered_after is None else f"{r.recovered_after:.1f}" for r in self.pg_restarts)
        after = ",".join(str(r.completions) for r in self.pg_restarts)
        rebind = ",".join(f"{s:.1f}" for s in self.listen_rebind)
        return (
            f"wall={self.seconds:.0f}s kill_modes={modes} effects={self.effects} "
            f"recovery_s_after_restarts=[{recovery}] completions_after_restarts=[{after}] "
            f"listen_rebind_s=[{rebind}] listen_backends_killed={self.listen_backends}"
        )


# -- worker processes ---------------------------------------------------------------------------
class Workers:
    """K worker slots; each holds at most one live ``python -m pgdurable_async worker``."""

    def __init__(self, cfg: ChaosConfig, dsn: str, log_dir: Path) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.log_dir = log_dir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._current: dict[int, Life] = {}
        self._spawned = 0

    def spawn(self, slot: int) -> Life:
        self._spawned += 1
        log_path = self.log_dir / f"worker-{slot}-{self._spawned}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgdurable_async", "worker", "--app", APP_SPEC, "--dsn", self.dsn,
                 "--concurrency", str(self.cfg.concurrency), "--lease-seconds", str(self.cfg.lease_seconds),
                 "--sweep-interval", str(self.cfg.sweep_interval)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        life = Life(slot, proc.pid, log_path)
        self.procs[slot] = proc
        self._current[slot] = life
        return life

    def alive(self) -> dict[int, Life]:
        """Live workers by pid."""
        return {life.pid: life for slot, life in self._current.items() if self.procs[slot].poll() is None}

    def kill(self, pid: int) -> Life | None:
        """SIGKILL the worker with ``pid``; its slot stays empty until :meth:`spawn`."""
        for slot, life in list(self._current.items()):
            if life.pid == pid and self.procs[slot].poll() is None:
                self.procs[slot].send_signal(signal.SIGKILL)
                life.exit_code = self.procs[slot].wait(timeout=10)
                del self._current[slot]
                return life
        return None

    def exited_by_themselves(self) -> list[Life]:
        """Workers that died without being killed (then forgotten: their slot is free)."""
        gone = []
        for slot, life in list(self._current.items()):
            code = self.procs[slot].poll()
            if code is not None:
                life.exit_code = code
                del self._current[slot]
                gone.append(life)
        return gone

    def empty_slots(self) -> list[int]:
        return [slot for slot in range(self.cfg.workers) if slot not in self._current]

    def stop_all(self, graceful: bool = True) -> list[str]:
        """SIGTERM (then SIGKILL) every live worker; returns notes about unclean exits."""
        notes = []
        for slot, life in list(self._current.items()):
            proc = self.procs[slot]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    proc.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                    notes.append(f"worker {life.pid} ignored SIGTERM for 45 s")
            life.exit_code = proc.returncode
            if graceful and proc.returncode != 0:
                notes.append(f"worker {life.pid} exited with code {proc.returncode} on SIGTERM")
            del self._current[slot]
        return notes


# -- database helpers -----------------------------------------------------------------------------
async def _setup_codecs(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(typ, schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(),
                                  decoder=orjson.loads)


@contextlib.asynccontextmanager
async def _connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await _setup_codecs(conn)
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


async def _persist(what: str, op: Callable[[], Awaitable[T]], give_up_after: float = 180.0) -> T:
    """Run ``op`` until it succeeds: PostgreSQL may be restarting under the driver."""
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: the database stayed unreachable for {give_up_after:.0f} s") from None
            await anyio.sleep(0.5)


async def _sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def op() -> list[asyncpg.Record]:
        async with _connect(dsn) as conn:
            return list(await conn.fetch(query, *args))

    return await _persist(query.split()[0], op)


# -- aiming a kill: which worker process owns a backend ----------------------------------------------
def _pid_of_worker_id(worker_id: str) -> int:
    """The OS pid inside a runtime's worker id (``host:pid:random``)."""
    return int(worker_id.split(":")[-2])


def _port_owners(pids: list[int]) -> dict[int, int]:
    """Local TCP port -> pid, for the sockets the processes ``pids`` hold (read from /proc)."""
    inode_pid: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inode_pid[link[8:-1]] = pid
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inode_pid:
                    owners[int(fields[1].rsplit(":", 1)[1], 16)] = inode_pid[fields[9]]
    return owners


_IN_TRANSACTION = """
SELECT client_port, state, query FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pgdurable_async'
  AND xact_start IS NOT NULL AND pid <> pg_backend_pid() AND client_port IS NOT NULL
"""
# An ack: the batched ack statement, or a transactional activity (its SQL commits with its ack).
_ACK_MARKERS = ("USING results", "chaos_effects", "pg_sleep", "lease_token = $2 FOR UPDATE", "set_config('search_path'")
# A turn: its transaction stays open across statements while the orchestration code replays.
_TURN_MARKERS = ("FROM instances i", "FROM history h", "INSERT INTO history", "UPDATE instances i")


def _phase(state: str | None, query: str) -> str | None:
    if any(marker in query for marker in _ACK_MARKERS):
        return "mid-ack"
    if state == "idle in transaction" or any(marker in query for marker in _TURN_MARKERS):
        return "mid-turn"
    return None


async def _find_target(dsn: str, mode: str, pids: list[int]) -> int | None:
    """A live worker that is, right now, mid-turn / mid-activity / mid-ack (None: nobody is)."""
    async with _connect(dsn) as conn:
        if mode == "mid-activity":
            owners = await conn.fetch(
                "SELECT DISTINCT lease_owner FROM pgdurable.work_queue"
                " WHERE lease_token IS NOT NULL AND visible_at > now() AND name <> 'record'")
            found = [_pid_of_worker_id(r["lease_owner"]) for r in owners if r["lease_owner"]]
            return next((pid for pid in found if pid in pids), None)
        rows = [r for r in await conn.fetch(_IN_TRANSACTION) if _phase(r["state"], r["query"] or "") == mode]
    owners = _port_owners(pids) if rows else {}
    return next((owners[r["client_port"]] for r in rows if r["client_port"] in owners), None)


# A LISTEN session's last statement: LISTEN, its registration, or the periodic liveness probe.
_LISTENERS = """
SELECT client_port, pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pgdurable_async' AND client_port IS NOT NULL
  AND (query LIKE 'LISTEN %' OR query LIKE 'INSERT INTO workers%' OR query = 'SELECT 1')
"""
_REGISTERED = """
SELECT w.worker_id FROM pgdurable.workers w
JOIN pg_stat_activity a ON a.pid = w.backend_pid AND a.backend_start = w.backend_start
"""


async def _listening(dsn: str, pids: list[int]) -> dict[int, int]:
    """Worker pid -> backend pid of its LISTEN session, for the workers ``pids`` that have one."""
    rows = await _sql(dsn, _LISTENERS)
    owners = _port_owners(pids)
    return {owners[r["client_port"]]: r["pid"] for r in rows if r["client_port"] in owners}


async def _registered(dsn: str) -> set[int]:
    """Pids of the workers whose ``pgdurable.workers`` row names a live backend."""
    return {_pid_of_worker_id(r["worker_id"]) for r in await _sql(dsn, _REGISTERED)}


# -- the driver ---------------------------------------------------------------------------------------
class Chaos:
    """One chaos run against ``dsn`` (a migrated database) on ``cluster`` (restartable, or None)."""

    def __init__(self, cfg: ChaosConfig, dsn: str, cluster: EmbeddedCluster | None) -> None:
        if cluster is None and cfg.pg_restarts:
            raise ValueError("PostgreSQL restarts need a cluster this harness controls")
        self.cfg = cfg
        self.dsn = dsn
        self.cluster = cluster
        self.plan = random.Random(f"{cfg.seed}:plan")
        self.aim = random.Random(f"{cfg.seed}:aim")
        self.report = Report()
        self.specs: dict[str, dict[str, Any]] = {}
        self.probes: dict[str, dict[str, Any]] = {}
        self.db_up = anyio.Event()
        self.db_up.set()
        self._watchers = 0  # recovery / rebind watchers still running
        self.client = pgd.Client(dsn)
        self.workers: Workers | None = None
        self.timeline: list[str] = []

    def mark(self, what: str) -> None:
        """Note a step in the run's timeline (written next to the worker logs)."""
        self.timeline.append(f"{datetime.now():%H:%M:%S.%f} {what}")

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> Report:
        started = time.monotonic()
        log_dir = self.cfg.log_dir or Path(tempfile.mkdtemp(prefix="pgdurable-chaos-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = Workers(self.cfg, self.dsn, log_dir)
        await _sql(self.dsn, chaos_app.EFFECTS_DDL)
        try:
            for slot in range(self.cfg.workers):
                self.mark(f"spawned worker {self.workers.spawn(slot).pid}")
            await self._wait_registered()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._supervise)
                tg.start_soon(self._start_instances, tg)
                await self._inject_faults(tg)
                await self._wait_finished()
                tg.cancel_scope.cancel()
            await self._settle()
            self.report.notes.extend(self.workers.stop_all(graceful=True))
            await self.check()
        finally:
            self.workers.stop_all(graceful=False)
            await self.client.close()
        self.report.seconds = time.monotonic() - started
        (log_dir / "timeline.log").write_text("\n".join(self.timeline) + "\n")
        if self.report.violations:
            self.report.notes.append(f"worker logs: {log_dir}")
        return self.report

    async def _wait_registered(self) -> None:
        with anyio.fail_after(120):
            while not await _sql(self.dsn, "SELECT 1 FROM pgdurable.registry WHERE name = 'mixed'"):
                await anyio.sleep(0.2)

    async def _supervise(self) -> None:
        """Respawn killed workers' slots after a short pause; flag workers that died by themselves."""
        assert self.workers is not None
        while True:
            for life in self.workers.exited_by_themselves():
                tail = _tail(life.log_path)
                self.report.violations.append(
                    f"worker {life.pid} exited by itself with code {life.exit_code}: {tail}")
            for slot in self.workers.empty_slots():
                await self.db_up.wait()  # a worker started while the server is down would just exit
                self.mark(f"spawned worker {self.workers.spawn(slot).pid}")
            await anyio.sleep(self.aim.uniform(0.2, 2.0))

    # -- workload --------------------------------------------------------------------------------
    def _spec(self, tag: str) -> dict[str, Any]:
        rng = self.plan
        children = [
            {"tag": f"{tag}/leaf-{k}", "chain": rng.randint(1, 4), "records": rng.randint(1, 4),
             "sleep": round(rng.uniform(0.2, 2.0), 2)}
            for k in range(rng.randint(1, 2))
        ]
        return {
            "tag": tag,
            "fanout": rng.randint(*self.cfg.fanout),
            "limit": rng.choice([25, 100, 250, None]),
            "chain": rng.randint(3, 8),
            "pause": round(rng.uniform(0.02, 0.2), 3),
            "flaky": [rng.choice([0, 1, 2]) for _ in range(rng.randint(1, 3))],
            "records": rng.randint(2, 10),
            "sleeps": [round(rng.uniform(0.5, 4.0), 2) for _ in range(rng.randint(1, 3))],
            "events": [f"go-{k}" for k in range(rng.randint(1, 2))],
            "children": children,
            "looper": {"tag": f"{tag}/loop", "left": rng.randint(1, 3), "acc": rng.randint(0, 100)},
            "doomed": rng.random() < 0.5,
        }

    async def _start_instances(self, tg: TaskGroup) -> None:
        starts = sorted(self.plan.uniform(0, 0.7 * self.cfg.window) for _ in range(self.cfg.instances))
        t0 = time.monotonic()
        for n, at in enumerate(starts):
            tag = f"mixed-{self.cfg.seed}-{n:04d}"
            spec = self._spec(tag)
            delays = [self.plan.uniform(0, 20) for _ in spec["events"]]
            await anyio.sleep(max(0.0, t0 + at - time.monotonic()))
            await self._start("mixed", spec, tag)
            self.mark(f"started {tag}")
            self.specs[tag] = spec
            for name, delay in zip(spec["events"], delays, strict=True):
                tg.start_soon(self._raise_later, tag, name, delay)

    async def _start(self, name: str, spec: dict[str, Any], tag: str) -> None:
        async def op() -> None:
            try:
                await self.client.start(name, spec, instance_id=tag)
            except pgd.InstanceAlreadyExists:
                # A start whose commit succeeded but whose reply was lost (server restart) is retried
                # by the client and then finds its own instance.
                self.report.notes.append(f"start({tag}) raised InstanceAlreadyExists for its own new instance")

        await _persist(f"start {tag}", op)

    async def _raise_later(self, tag: str, name: str, delay: float) -> None:
        await anyio.sleep(delay)
        await _persist(f"raise {name} on {tag}",
                       lambda: self.client.raise_event(tag, name, chaos_app.event_data(tag, name)))

    # -- faults ----------------------------------------------------------------------------------
    async def _inject_faults(self, tg: TaskGroup) -> None:
        cfg = self.cfg
        faults = ["kill"] * cfg.kills + ["pg_restart"] * cfg.pg_restarts + ["listen_kill"] * cfg.listen_kills
        self.plan.shuffle(faults)
        gap = cfg.window / max(1, len(faults))
        for fault in faults:
            await anyio.sleep(self.plan.uniform(0.3, 1.7) * gap)
            if fault == "kill":
                await self._kill(self.plan.choice(KILL_MODES), self.plan.random())
            elif fault == "pg_restart":
                await self._restart_postgres(tg)
            else:
                await self._kill_listeners(tg)

    async def _kill(self, mode: str, pick: float) -> None:
        assert self.workers is not None
        with anyio.move_on_after(30):
            while not self.workers.alive():
                await anyio.sleep(0.1)
        target: int | None = None
        if mode != "anytime":
            with anyio.move_on_after(3):
                while target is None:
                    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                        target = await _find_target(self.dsn, mode, sorted(self.workers.alive()))
                    if target is None:
                        await anyio.sleep(0.01)
        pids = sorted(self.workers.alive())
        if not pids:
            return
        if target is None or target not in pids:
            mode, target = "anytime", pids[int(pick * len(pids))]
        if self.workers.kill(target) is not None:
            self.report.kills[mode] += 1
            self.mark(f"SIGKILL {mode} worker {target}")

    async def _restart_postgres(self, tg: TaskGroup) -> None:
        assert self.cluster is not None and self.workers is not None
        restart = Restart(began=time.monotonic(), survivors=sorted(self.workers.alive()))
        self.db_up = anyio.Event()
        self.mark("PostgreSQL restart begins")
        try:
            await anyio.to_thread.run_sync(self.cluster.restart)
        finally:
            self.db_up.set()
        rows = await _sql(self.dsn, "SELECT now() AS now")
        restart.done_db = rows[0]["now"]
        alive = self.workers.alive()
        restart.survivors = [pid for pid in restart.survivors if pid in alive]
        self.report.pg_restarts.append(restart)
        self.mark(f"PostgreSQL restart {len(self.report.pg_restarts)} done; survivors {restart.survivors}")
        tg.start_soon(self._watch_recovery, restart)

    async def _watch_recovery(self, restart: Restart) -> None:
        """Every worker that lived through the restart must commit work again, unaided."""
        self._watchers += 1
        try:
            await self._await_recovery(restart)
        finally:
            self._watchers -= 1

    async def _await_recovery(self, restart: Restart) -> None:
        assert self.workers is not None and restart.done_db is not None
        n = len(self.report.pg_restarts)
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        probe: str | None = None
        while True:
            alive = self.workers.alive()
            survivors = {pid for pid in restart.survivors if pid in alive}
            rows = await _sql(self.dsn, "SELECT DISTINCT worker_pid FROM public.chaos_effects WHERE applied_at > $1",
                              restart.done_db)
            idle = survivors - {r["worker_pid"] for r in rows}
            if not idle and restart.recovered_after is None:
                restart.recovered_after = time.monotonic() - restart.began
                self.mark(f"restart {n}: every survivor committed work after {restart.recovered_after:.1f} s")
            unregistered = survivors - await _registered(self.dsn)
            if not idle and not unregistered:
                return
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"after PostgreSQL restart {n}, surviving workers {sorted(idle)} committed nothing "
                    f"for {RECOVERY_TIMEOUT:.0f} s" if idle else
                    self._lost_listeners(set(), unregistered, f"PostgreSQL restart {n}"))
                return
            if idle and (probe is None or await self._finished(probe)):
                probe = f"probe-{self.cfg.seed}-{n}-{len(self.probes)}"
                spec = {"tag": probe, "records": 6 * self.cfg.concurrency, "hold": 0.5}
                await self._start("probe", spec, probe)
                self.mark(f"started {probe}")
                self.probes[probe] = spec
            await anyio.sleep(0.5)

    async def _kill_listeners(self, tg: TaskGroup) -> None:
        rows = await _sql(self.dsn, "SELECT worker_id, backend_pid, pg_terminate_backend(backend_pid) AS gone"
                                    " FROM pgdurable.workers")
        killed = {r["backend_pid"] for r in rows if r["gone"]}
        victims = {_pid_of_worker_id(r["worker_id"]) for r in rows if r["gone"]}
        self.report.listen_kills += 1
        self.mark(f"LISTEN sessions {sorted(killed)} of workers {sorted(victims)} terminated")
        self.report.listen_backends += len(killed)
        tg.start_soon(self._watch_rebind, killed, victims, time.monotonic())

    async def _watch_rebind(self, killed: set[int], victims: set[int], began: float) -> None:
        """Every worker whose LISTEN session was killed must open a new one by itself."""
        self._watchers += 1
        try:
            await self._await_rebind(killed, victims, began)
        finally:
            self._watchers -= 1

    async def _await_rebind(self, killed: set[int], victims: set[int], began: float) -> None:
        assert self.workers is not None
        deadline = began + RECOVERY_TIMEOUT
        reopened = False
        while True:
            waiting = victims & set(self.workers.alive())
            listening = await _listening(self.dsn, sorted(waiting))
            unopened = {pid for pid in waiting if listening.get(pid, 0) in killed | {0}}
            if not unopened and not reopened:
                reopened = True
                self.report.listen_rebind.append(time.monotonic() - began)
                self.mark(f"LISTEN of workers {sorted(victims)} re-opened after {time.monotonic() - began:.1f} s")
            unregistered = waiting - await _registered(self.dsn)
            if not unopened and not unregistered:
                return
            if time.monotonic() > deadline:
                self.report.violations.append(self._lost_listeners(unopened, unregistered, "pg_terminate_backend"))
                return
            await anyio.sleep(0.2)

    @staticmethod
    def _lost_listeners(unopened: set[int], unregistered: set[int], after: str) -> str:
        if unopened:
            return f"workers {sorted(unopened)} did not re-open LISTEN within {RECOVERY_TIMEOUT:.0f} s after {after}"
        return (f"workers {sorted(unregistered)} re-opened LISTEN after {after} but lost their pgdurable.workers "
                f"row (see test_repro_worker_registry.py)")

    # -- the end ---------------------------------------------------------------------------------
    async def _finished(self, instance_id: str) -> bool:
        rows = await _sql(self.dsn, "SELECT status FROM pgdurable.instances WHERE instance_id = $1", instance_id)
        return bool(rows) and rows[0]["status"] in TERMINAL

    async def _wait_finished(self) -> None:
        """Until every instance (children and probes too) has finished and no watcher runs (or the timeout)."""
        deadline = time.monotonic() + self.cfg.finish_timeout
        while time.monotonic() < deadline:
            if len(self.specs) == self.cfg.instances and self._watchers == 0:
                rows = await _sql(self.dsn, "SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed',"
                                            " 'cancelled', 'terminated')) AS live, count(*) AS n"
                                            " FROM pgdurable.instances")
                expected = len(self.specs) * 1 + len(self.probes) + sum(
                    len(chaos_app.expected_children(s)) for s in self.specs.values())
                if rows[0]["live"] == 0 and rows[0]["n"] >= expected:
                    return
            await anyio.sleep(1.0)

    async def _settle(self) -> None:
        """Give late messages to finished instances a moment to be consumed."""
        with anyio.move_on_after(20):
            while True:
                rows = await _sql(self.dsn, _STRANDED_COUNT)
                if rows[0]["n"] == 0:
                    return
                await anyio.sleep(0.5)

    async def check(self) -> None:
        snap = await _persist("snapshot", lambda: Snapshot.load(self.dsn))
        report = self.report
        report.instances = len(snap.instances)
        report.events_checked = sum(len(events) for events in snap.history.values())
        report.effects = len(snap.effects)
        expected_ids = set(self.specs) | set(self.probes)
        for spec in self.specs.values():
            expected_ids.update(chaos_app.expected_children(spec))
        for check in (check_final_states, check_no_duplicate_events, check_seq_gap_free,
                      check_effects_exactly_once, check_nothing_stranded):
            report.violations.extend(check(snap, expected_ids))
        for restart in report.pg_restarts:
            assert restart.done_db is not None
            restart.completions = sum(
                1 for e in snap.effects if e["applied_at"] > restart.done_db and e["worker_pid"] in restart.survivors)
        if len(report.pg_restarts) != self.cfg.pg_restarts or sum(report.kills.values()) != self.cfg.kills:
            report.notes.append("fewer faults than planned were injected")


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


# -- invariants ----------------------------------------------------------------------------------
_STRANDED_COUNT = """
SELECT (SELECT count(*) FROM pgdurable.work_queue) + (SELECT count(*) FROM pgdurable.timers)
     + (SELECT count(*) FROM pgdurable.orchestrator_queue) AS n
"""


@dataclass
class Snapshot:
    """Everything the invariants read, loaded once after the run."""

    instances: dict[str, asyncpg.Record]
    history: dict[tuple[str, int], list[asyncpg.Record]]
    effects: list[asyncpg.Record]
    leftovers: dict[str, list[tuple[str, str]]]  # table -> (instance_id, what)

    @classmethod
    async def load(cls, dsn: str) -> Snapshot:
        async with _connect(dsn) as conn:
            instances = {r["instance_id"]: r for r in await conn.fetch("SELECT * FROM pgdurable.instances")}
            history: dict[tuple[str, int], list[asyncpg.Record]] = defaultdict(list)
            for r in await conn.fetch("SELECT * FROM pgdurable.history ORDER BY instance_id, execution_id, seq"):
                history[(r["instance_id"], r["execution_id"])].append(r)
            effects = list(await conn.fetch("SELECT * FROM public.chaos_effects"))
            leftovers = {
                "work_queue": [(r["instance_id"], f"task {r['task_id']} {r['name']}") for r in
                               await conn.fetch("SELECT * FROM pgdurable.work_queue")],
                "timers": [(r["instance_id"], f"timer task {r['task_id']}") for r in
                           await conn.fetch("SELECT * FROM pgdurable.timers")],
                "orchestrator_queue": [(r["instance_id"], f"message {r['kind']}") for r in
                                       await conn.fetch("SELECT * FROM pgdurable.orchestrator_queue")],
            }
        return cls(instances, dict(history), effects, leftovers)


def _canonical(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def check_final_states(snap: Snapshot, expected_ids: set[str]) -> list[str]:
    """Every expected instance exists, completed, with the output its input implies; no others exist."""
    out = []
    for instance_id in sorted(expected_ids - set(snap.instances)):
        out.append(f"{instance_id}: missing")
    for instance_id in sorted(set(snap.instances) - expected_ids):
        out.append(f"{instance_id}: unexpected instance")
    for instance_id, row in sorted(snap.instances.items()):
        if row["status"] != "completed":
            out.append(f"{instance_id}: status {row['status']} (error {row['error']})")
            continue
        want = _canonical(chaos_app.expected_output(row["name"], row["input"]))
        if row["output"] != want:
            out.append(f"{instance_id}: output {row['output']!r} != expected {want!r}")
    return out


def check_no_duplicate_events(snap: Snapshot, expected_ids: set[str]) -> list[str]:
    """A task event appears once per (instance, execution, kind, task_id); one terminal event, last."""
    out = []
    for (instance_id, execution_id), events in snap.history.items():
        seen: Counter[tuple[str, int]] = Counter(
            (e["event_type"], e["payload"]["task_id"]) for e in events if e["event_type"] in TASK_EVENTS)
        for (kind, task_id), n in seen.items():
            if n > 1:
                out.append(f"{instance_id}#{execution_id}: {kind} task {task_id} recorded {n} times")
        terminal = [e for e in events if e["event_type"] in TERMINAL_EVENTS]
        if len(terminal) != 1:
            out.append(f"{instance_id}#{execution_id}: {len(terminal)} terminal events")
        elif terminal[0] is not events[-1]:
            out.append(f"{instance_id}#{execution_id}: events after the terminal {terminal[0]['event_type']}")
    return out


def check_seq_gap_free(snap: Snapshot, expected_ids: set[str]) -> list[str]:
    """``seq`` runs 1..n in every execution; n is the current execution's ``history_len``."""
    out = []
    for (instance_id, execution_id), events in snap.history.items():
        seqs = [e["seq"] for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            out.append(f"{instance_id}#{execution_id}: seq is not 1..{len(seqs)}")
        row = snap.instances.get(instance_id)
        if row is not None and row["execution_id"] == execution_id and row["history_len"] != len(seqs):
            out.append(f"{instance_id}#{execution_id}: history_len {row['history_len']} but {len(seqs)} events")
    for instance_id, row in snap.instances.items():
        for execution_id in range(1, row["execution_id"] + 1):
            if (instance_id, execution_id) not in snap.history:
                out.append(f"{instance_id}#{execution_id}: no history")
    return out


def check_effects_exactly_once(snap: Snapshot, expected_ids: set[str]) -> list[str]:
    """Each completed ``record`` activity left exactly one effect row; nothing else left any."""
    completed: set[str] = set()
    for (instance_id, execution_id), events in snap.history.items():
        records = {e["payload"]["task_id"] for e in events
                   if e["event_type"] == "activity_scheduled" and e["payload"]["name"] == "record"}
        completed.update(f"{instance_id}:{execution_id}:{e['payload']['task_id']}" for e in events
                         if e["event_type"] == "activity_completed" and e["payload"]["task_id"] in records)
    applied = Counter(e["activity_id"] for e in snap.effects)
    out = [f"effect of {a} applied {n} times" for a, n in sorted(applied.items()) if n != 1]
    out += [f"effect of {a} applied but its completion is not in history" for a in sorted(set(applied) - completed)]
    out += [f"record {a} completed but its effect is missing" for a in sorted(completed - set(applied))]
    return out


def check_nothing_stranded(snap: Snapshot, expected_ids: set[str]) -> list[str]:
    """No work item, timer or message is left for a finished instance."""
    out = []
    for table, rows in snap.leftovers.items():
        for instance_id, what in rows:
            row = snap.instances.get(instance_id)
            if row is None or row["status"] in TERMINAL:
                out.append(f"stranded in {table}: {instance_id} {what}")
    return out


# -- results ----------------------------------------------------------------------------------------
def record_result(report: Report, cfg: ChaosConfig) -> None:
    """Print the summary and append it (with the command and the date) to ``cfg.results``."""
    print(report.summary())
    print(report.details())
    for line in report.violations[:50]:
        print(f"  violation: {line}")
    for line in report.notes:
        print(f"  note: {line}")
    if cfg.results is None:
        return
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp}: seed {cfg.seed}\n", f"- command: `{cfg.command}`",
             f"- `{report.summary()}`", f"- {report.details()}"]
    lines += [f"- violation: {v}" for v in report.violations[:20]]
    lines += [f"- note: {n}" for n in report.notes[:10]]
    if not cfg.results.exists():
        cfg.results.write_text("# Chaos runs\n\nOne section per run, newest last (`tests/chaos/harness.py`).\n")
    with cfg.results.open("a") as f:
        f.write("\n".join(lines) + "\n")


async def run_chaos(cfg: ChaosConfig, dsn: str, cluster: EmbeddedCluster | None) -> Report:
    """Run one chaos session, print and record its summary, return the report."""
    report = await Chaos(cfg, dsn, cluster).run()
    record_result(report, cfg)
    return report


PRESETS = {
    "short": ChaosConfig(instances=10, kills=10, pg_restarts=2, listen_kills=2, window=60.0, fanout=(200, 600)),
    "full": ChaosConfig(instances=150, kills=100, pg_restarts=10, listen_kills=10, window=600.0,
                        fanout=(200, 1000), finish_timeout=1200.0),
}


_OVERRIDABLE = ("workers", "instances", "kills", "pg_restarts", "listen_kills", "window")


async def _main(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in _OVERRIDABLE and v is not None}
    cfg = dataclasses.replace(PRESETS[args.preset], seed=args.seed, **overrides,
                              command="python -m tests.chaos.harness " + shlex.join(sys.argv[1:]))
    if args.no_record:
        cfg.results = None
    cfg.log_dir = args.log_dir
    async with EmbeddedCluster() as cluster:
        admin = await asyncpg.connect(cluster.dsn)
        try:
            await admin.execute("CREATE DATABASE chaos")
        finally:
            await admin.close()
        dsn = cluster.dsn.rsplit("/", 1)[0] + "/chaos"
        await pgd.migrate(dsn)
        report = await run_chaos(cfg, dsn, cluster)
    return 1 if report.violations else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="short")
    parser.add_argument("--seed", type=int, default=1)
    for name in _OVERRIDABLE:
        kind = float if name == "window" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="override the preset's value")
    parser.add_argument("--log-dir", type=Path, help="worker logs and timeline (default: a new temp dir)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    sys.exit(anyio.run(_main, parser.parse_args()))


if __name__ == "__main__":
    main()
