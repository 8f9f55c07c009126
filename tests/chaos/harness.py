"""Chaos driver: real worker processes, random faults, then an invariant check.

K ``python -m pgdurable_async worker`` processes run :mod:`tests.chaos.chaos_app`
while the driver starts M ``mixed`` instances, raises the events they wait for
(each with an idempotency key; a raise that failed, and so may or may not have
committed, is retried with the same key, and some are re-sent on purpose) and,
at moments drawn from a seeded RNG, injects faults:

* SIGKILL of a worker (at a random moment, or aimed mid-turn, mid-activity or
  mid-ack), which is then restarted;
* a PostgreSQL crash: ``pg_ctl stop -m immediate`` (no shutdown checkpoint),
  a few seconds down, then a start that runs crash recovery;
* a clean PostgreSQL restart (``pg_ctl restart -m fast``);
* ``pg_terminate_backend`` of every worker's LISTEN session.

Starts and raises go on through the faults; each crash or restart also pulls a
few planned raises and a start forward so that they are in flight as the server
goes down.  The driver's client gives up on a fault after a second, so the
driver's own retries (same instance id, same idempotency key) are exercised.

When every instance has finished, the checks in :mod:`tests.chaos.checker`
compare a snapshot of the database with what the plan (not what the driver saw)
implies, and a one-line summary is printed and appended to
``tests/chaos/RESULTS.md``.  The seed is random unless given, printed first and
in the summary; ``--seed N`` (or ``PGDURABLE_CHAOS_SEED=N`` under pytest) replays
the same plan.  Run it alone with ``python -m tests.chaos.harness --preset full``
(it starts its own cluster).
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
from collections import Counter
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
from tests.chaos.checker import STRANDED_COUNT, TERMINAL, Expected, Snapshot, delivered_count, violations

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
APP_SPEC = "tests.chaos.chaos_app:app"
KILL_MODES = ("anytime", "mid-turn", "mid-activity", "mid-ack")
RECOVERY_TIMEOUT = 90.0  # seconds a surviving worker gets to show it works again
SEED_ENV = "PGDURABLE_CHAOS_SEED"
T = TypeVar("T")


@dataclass
class ChaosConfig:
    """What to run and which faults to inject (counts are exact; moments are random)."""

    seed: int | None = None  # None: a random one, printed
    workers: int = 3
    instances: int = 10
    kills: int = 10
    pg_crashes: int = 2  # pg_ctl stop -m immediate, down a moment, start
    pg_restarts: int = 1  # pg_ctl restart -m fast
    listen_kills: int = 2
    window: float = 60.0  # faults, starts and events are spread over this many seconds
    fanout: tuple[int, int] = (200, 1000)
    inbox: tuple[int, int] = (2, 6)  # msg events per mixed instance
    event_spread: float = 40.0  # a msg or tick is raised up to this many seconds after its instance's start
    resend_rate: float = 0.3  # share of raises sent a second time with the same key, on purpose
    crash_down: tuple[float, float] = (0.5, 4.0)  # seconds PostgreSQL stays down in a crash
    burst: int = 4  # planned raises pulled forward into each crash or restart
    client_retry_for: float = 1.0  # the driver's client surfaces a fault after this long (then the driver retries)
    concurrency: int = 16
    lease_seconds: float = 3.0
    sweep_interval: float = 2.0
    finish_timeout: float = 600.0  # after the window, for every instance to finish
    results: Path | None = RESULTS_PATH
    command: str = ""
    log_dir: Path | None = None


def pick_seed(seed: int | None = None) -> int:
    """``seed``, else ``$PGDURABLE_CHAOS_SEED``, else a fresh random one."""
    if seed is not None:
        return seed
    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    return random.SystemRandom().randrange(1, 1_000_000)


@dataclass
class Life:
    """One worker process."""

    slot: int
    pid: int
    log_path: Path
    exit_code: int | None = None
    spawned: float = field(default_factory=time.monotonic)


@dataclass
class Restart:
    """One PostgreSQL crash or restart and what the surviving workers did afterwards."""

    kind: str  # "crash" or "restart"
    began: float
    down: float = 0.0
    done_db: datetime | None = None
    survivors: list[int] = field(default_factory=list)
    recovered_after: float | None = None
    completions: int = 0


@dataclass
class Report:
    """Counts, notes and violations of one run."""

    seed: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    bounces: list[Restart] = field(default_factory=list)
    listen_kills: int = 0
    listen_backends: int = 0
    listen_rebind: list[float] = field(default_factory=list)
    planned: int = 0  # instances the plan implies (roots, children, probes)
    instances: int = 0
    start_errors: int = 0  # start calls that failed transiently and were retried with the same id
    starts_in_doubt: int = 0  # retried starts answered InstanceAlreadyExists: an earlier attempt committed
    events_raised: int = 0  # distinct planned events whose raise returned
    events_delivered: int = 0  # distinct raised events found in history
    raise_calls: int = 0
    raise_errors: int = 0  # raise calls that failed transiently and were retried with the same key
    raised_in_faults: int = 0  # raise calls made while PostgreSQL was crashing or restarting
    startup_exits: int = 0  # workers that found PostgreSQL down while starting and exited (then respawned)
    resends: int = 0  # deliberate second raises with the same key
    events_checked: int = 0
    effects: int = 0
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def crashes(self) -> list[Restart]:
        return [b for b in self.bounces if b.kind == "crash"]

    def restarts(self) -> list[Restart]:
        return [b for b in self.bounces if b.kind == "restart"]

    def summary(self) -> str:
        return (
            f"chaos: seed={self.seed} kills={sum(self.kills.values())} pg_crashes={len(self.crashes())} "
            f"pg_restarts={len(self.restarts())} listen_kills={self.listen_kills} instances={self.instances} "
            f"events_raised={self.events_raised} events_delivered={self.events_delivered} effects={self.effects} "
            f"events_checked={self.events_checked} violations={len(self.violations)} seconds={self.seconds:.0f}"
        )

    def details(self) -> str:
        modes = ",".join(f"{m}:{self.kills[m]}" for m in KILL_MODES)
        kinds = ",".join(f"{b.kind}{'' if b.kind != 'crash' else f'({b.down:.1f}s down)'}" for b in self.bounces)
        recovery = ",".join("-" if r.recovered_after is None else f"{r.recovered_after:.1f}" for r in self.bounces)
        after = ",".join(str(r.completions) for r in self.bounces)
        rebind = ",".join(f"{s:.1f}" for s in self.listen_rebind)
        return (
            f"kill_modes={modes} planned_instances={self.planned} start_errors={self.start_errors} "
            f"starts_in_doubt={self.starts_in_doubt} raise_calls={self.raise_calls} raise_errors={self.raise_errors} "
            f"raised_in_faults={self.raised_in_faults} resends={self.resends} startup_exits={self.startup_exits} "
            f"pg=[{kinds}] "
            f"recovery_s=[{recovery}] completions_after=[{after}] "
            f"listen_rebind_s=[{rebind}] listen_backends_killed={self.listen_backends}"
        )


# -- the plan: every instance, event and fault, drawn from the seed before the run ---------------------------
@dataclass
class Delivery:
    """One planned ``raise_event``, with its idempotency key."""

    instance_id: str
    name: str
    key: str
    data: Any
    delay: float  # after its instance's start (a msg or tick) or after the last msg (the close)
    resend: float | None  # a deliberate second raise with the same key, this many seconds later


@dataclass
class Root:
    """One planned ``mixed`` instance and the events raised for it and its looper child."""

    tag: str
    at: float  # seconds into the window
    spec: dict[str, Any]
    msgs: list[Delivery]
    close: Delivery
    ticks: list[Delivery]


@dataclass
class Fault:
    kind: str  # kill, pg_crash, pg_restart, listen_kill
    gap: float  # seconds after the previous fault
    mode: str  # a kill's aim
    pick: float  # which worker, when the aim finds none
    down: float  # a crash's downtime


def _spec(rng: random.Random, cfg: ChaosConfig, tag: str) -> dict[str, Any]:
    children = [
        {"tag": f"{tag}/leaf-{k}", "chain": rng.randint(1, 4), "records": rng.randint(1, 4),
         "sleep": round(rng.uniform(0.2, 2.0), 2)}
        for k in range(rng.randint(1, 2))
    ]
    return {
        "tag": tag,
        "fanout": rng.randint(*cfg.fanout),
        "limit": rng.choice([25, 100, 250, None]),
        "chain": rng.randint(3, 8),
        "pause": round(rng.uniform(0.02, 0.2), 3),
        "flaky": [rng.choice([0, 1, 2]) for _ in range(rng.randint(1, 3))],
        "records": rng.randint(2, 10),
        "sleeps": [round(rng.uniform(0.5, 4.0), 2) for _ in range(rng.randint(1, 3))],
        "inbox": rng.randint(*cfg.inbox),
        "children": children,
        "looper": {"tag": f"{tag}/loop", "left": rng.randint(1, 3), "acc": rng.randint(0, 100), "got": []},
        "doomed": rng.random() < 0.5,
    }


def make_plan(cfg: ChaosConfig, seed: int) -> tuple[list[Root], list[Fault]]:
    """The run's workload and faults: a pure function of ``cfg`` and ``seed``."""
    rng = random.Random(f"{seed}:workload")

    def delivery(instance_id: str, key: str, event: tuple[str, Any], delay: float) -> Delivery:
        resend = round(rng.uniform(0.0, 3.0), 2) if rng.random() < cfg.resend_rate else None
        return Delivery(instance_id, event[0], key, event[1], round(delay, 2), resend)

    roots = []
    for n, at in enumerate(sorted(rng.uniform(0, 0.7 * cfg.window) for _ in range(cfg.instances))):
        tag = f"mixed-{seed}-{n:04d}"
        spec = _spec(rng, cfg, tag)
        events = chaos_app.planned_events(spec)
        msgs = [delivery(tag, key, e, rng.uniform(0, cfg.event_spread))
                for key, e in events[tag].items() if e[0] == "msg"]
        close = next(delivery(tag, key, e, rng.uniform(0, 2.0)) for key, e in events[tag].items() if e[0] == "close")
        loop = spec["looper"]["tag"]
        ticks = [delivery(loop, key, e, rng.uniform(0, cfg.event_spread)) for key, e in events[loop].items()]
        roots.append(Root(tag, at, spec, msgs, close, ticks))
    frng = random.Random(f"{seed}:faults")
    kinds = (["kill"] * cfg.kills + ["pg_crash"] * cfg.pg_crashes + ["pg_restart"] * cfg.pg_restarts
             + ["listen_kill"] * cfg.listen_kills)
    frng.shuffle(kinds)
    gap = cfg.window / max(1, len(kinds))
    faults = [Fault(kind, frng.uniform(0.3, 1.7) * gap, frng.choice(KILL_MODES), frng.random(),
                    round(frng.uniform(*cfg.crash_down), 2)) for kind in kinds]
    return roots, faults


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
_ACK_MARKERS = ("USING results", "chaos_effects", "chaos_counters", "pg_sleep", "lease_token = $2 FOR UPDATE",
                "set_config('search_path'")
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


_REFUSED = ("cannot reach PostgreSQL", "PostgreSQL ended the session", "57P01", "57P02", "57P03")


def refused_at_startup(log: str, exit_code: int | None, spawned: float,
                       outages: list[tuple[float, float | None]]) -> bool:
    """Whether a worker that exited by itself only found PostgreSQL down while it was starting.

    That is: it never logged ``ready``, it exited with code 1 and the one-line error of an
    unreachable database, and a crash or restart (``outages``: (began, ended or None)) was under
    way or came after its spawn.  By design a starting worker fails fast (a running one rides
    faults out) and its supervisor, like this driver, starts it again.  Anything else is a violation.
    """
    lines = log.strip().splitlines()
    return (exit_code == 1 and bool(lines) and not any(" ready: " in line for line in lines)
            and lines[-1].startswith("error: ") and any(r in lines[-1] for r in _REFUSED)
            and any(ended is None or ended >= spawned for _, ended in outages))


# -- the driver ---------------------------------------------------------------------------------------
class Chaos:
    """One chaos run against ``dsn`` (a migrated database) on ``cluster`` (restartable, or None)."""

    def __init__(self, cfg: ChaosConfig, dsn: str, cluster: EmbeddedCluster | None) -> None:
        if cluster is None and (cfg.pg_crashes or cfg.pg_restarts):
            raise ValueError("PostgreSQL crashes and restarts need a cluster this harness controls")
        self.cfg = cfg
        self.seed = pick_seed(cfg.seed)
        self.dsn = dsn
        self.cluster = cluster
        self.roots, self.faults = make_plan(cfg, self.seed)
        self.aim = random.Random(f"{self.seed}:aim")
        self.report = Report(seed=self.seed)
        self.expected = Expected()
        for root in self.roots:
            self.expected.add_root(root.spec)
        self.probes: dict[str, dict[str, Any]] = {}
        self.db_up = anyio.Event()
        self.db_up.set()
        self.faulting = False  # PostgreSQL is crashing or restarting right now
        self._watchers = 0  # recovery / rebind watchers still running
        self._roots_done = anyio.Event()  # every root started and every planned event raised
        self._pending_starts: dict[str, anyio.Event] = {}  # planned starts not yet due: set one to start now
        self._pending_raises: dict[str, anyio.Event] = {}  # likewise for raises of started instances
        self.client = pgd.Client(dsn)
        self.client.db.retry_for = cfg.client_retry_for  # surface faults: the driver retries, same id / key
        self.workers: Workers | None = None
        self.timeline: Path | None = None  # timeline.log next to the worker logs, written as the run goes
        self.t0 = 0.0
        self._given_up = False  # a planned start or raise failed for good: some instance cannot finish
        self._outages: list[tuple[float, float | None]] = []  # (began, ended) of each crash / restart

    def mark(self, what: str) -> None:
        """Note a step in the run's timeline (``timeline.log`` next to the worker logs)."""
        if self.timeline is not None:
            with self.timeline.open("a") as f:
                f.write(f"{datetime.now():%H:%M:%S.%f} {what}\n")

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> Report:
        started = time.monotonic()
        print(f"chaos: seed {self.seed} (replay: --seed {self.seed}, or {SEED_ENV}={self.seed} under pytest)",
              flush=True)
        log_dir = self.cfg.log_dir or Path(tempfile.mkdtemp(prefix="pgdurable-chaos-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = Workers(self.cfg, self.dsn, log_dir)
        self.timeline = log_dir / "timeline.log"
        self.timeline.write_text("")

        async def create_tables() -> None:
            async with _connect(self.dsn) as conn:
                await conn.execute(chaos_app.EFFECTS_DDL)

        await _persist("effect tables", create_tables)
        try:
            for slot in range(self.cfg.workers):
                self.mark(f"spawned worker {self.workers.spawn(slot).pid}")
            await self._wait_registered()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._supervise)
                tg.start_soon(self._drive_roots)
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
                if self._refused_at_startup(life):
                    self.report.startup_exits += 1
                    self.mark(f"worker {life.pid} found PostgreSQL down while starting and exited: {tail}")
                    continue
                self.report.violations.append(
                    f"worker {life.pid} exited by itself with code {life.exit_code}: {tail}")
            for slot in self.workers.empty_slots():
                await self.db_up.wait()  # a worker started while the server is down would just exit
                self.mark(f"spawned worker {self.workers.spawn(slot).pid}")
            await anyio.sleep(self.aim.uniform(0.2, 2.0))

    def _refused_at_startup(self, life: Life) -> bool:
        with contextlib.suppress(OSError):
            log = life.log_path.read_text(errors="replace")
            return refused_at_startup(log, life.exit_code, life.spawned, self._outages)
        return False

    # -- workload --------------------------------------------------------------------------------
    async def _drive_roots(self) -> None:
        self.t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for root in self.roots:
                tg.start_soon(self._drive_root, root)
        self._roots_done.set()

    async def _due(self, table: dict[str, anyio.Event], key: str, delay: float) -> None:
        """Sleep ``delay`` seconds, unless a fault pulls ``key`` forward first."""
        go = table[key] = anyio.Event()
        with anyio.move_on_after(max(0.0, delay)):
            await go.wait()
        table.pop(key, None)

    async def _drive_root(self, root: Root) -> None:
        """Start ``root``, raise its msgs and its looper's ticks, then (after every msg) its close."""
        await self._due(self._pending_starts, root.tag, self.t0 + root.at - time.monotonic())
        if not await self._start("mixed", root.spec, root.tag):
            return
        self.mark(f"started {root.tag}")
        async with anyio.create_task_group() as tg:
            for tick in root.ticks:
                tg.start_soon(self._deliver, tick)
            async with anyio.create_task_group() as msgs:
                for msg in root.msgs:
                    msgs.start_soon(self._deliver, msg)
            await self._deliver(root.close)  # the instance cannot finish before this: late duplicates show

    async def _start(self, name: str, spec: dict[str, Any], tag: str) -> bool:
        """Start an instance until the database confirms it (an id taken by an earlier attempt counts)."""
        async def op() -> None:
            try:
                await self.client.start(name, spec, instance_id=tag)
            except pgd.InstanceAlreadyExists:
                # An attempt whose commit succeeded but whose reply was lost (the client's own retry,
                # or ours after an error): the checker proves the instance is there, with this input.
                self.report.starts_in_doubt += 1
                self.mark(f"start {tag}: InstanceAlreadyExists on a retry (an earlier attempt committed)")
            except Exception as exc:
                if is_transient(exc):
                    self.report.start_errors += 1
                raise

        try:
            await _persist(f"start {tag}", op)
        except Exception as exc:  # noqa: BLE001 - reported; the checker will find the instance missing
            self._driver_failed(f"start {tag} never succeeded: {exc!r}")
            return False
        return True

    async def _deliver(self, d: Delivery) -> None:
        await self._due(self._pending_raises, d.key, d.delay)
        await self._raise(d)
        if d.resend is not None:
            await anyio.sleep(d.resend)
            await self._raise(d, resend=True)

    async def _raise(self, d: Delivery, resend: bool = False) -> None:
        """``raise_event`` with the delivery's key until it returns; a looper not started yet is waited for."""
        errors = 0

        async def op() -> None:
            nonlocal errors
            self.report.raise_calls += 1
            if self.faulting:
                self.report.raised_in_faults += 1
            try:
                await self.client.raise_event(d.instance_id, d.name, d.data, idempotency_key=d.key)
            except Exception as exc:
                if is_transient(exc):  # it may or may not have committed: retried with the same key
                    errors += 1
                    self.report.raise_errors += 1
                raise

        deadline = time.monotonic() + self.cfg.finish_timeout
        while True:
            try:
                await _persist(f"raise {d.key}", op)
                break
            except pgd.InstanceNotFound:  # a looper whose parent has not started it yet
                if time.monotonic() < deadline:
                    await anyio.sleep(0.5)
                    continue
                self._driver_failed(f"raise {d.key}: instance {d.instance_id} never appeared")
                return
            except Exception as exc:  # noqa: BLE001 - reported; the checker will find the event missing
                self._driver_failed(f"raise {d.key} never succeeded: {exc!r}")
                return
        if resend:
            self.report.resends += 1
        else:
            self.report.events_raised += 1
        if errors:
            self.mark(f"raise {d.key}{' (resend)' if resend else ''} returned after {errors} failed call(s)")

    def _driver_failed(self, what: str) -> None:
        """A start or raise the driver could not make: a violation, and no reason to wait for the end."""
        self.report.violations.append(what)
        self.mark(what)
        self._given_up = True

    def _burst(self, tg: TaskGroup, within: float) -> str:
        """Pull a few planned raises and a start forward, to moments in the next ``within`` seconds:
        in flight as PostgreSQL goes down, refused while it is down, or met by its recovery."""
        keys = self.aim.sample(sorted(self._pending_raises), min(self.cfg.burst, len(self._pending_raises)))
        events = [self._pending_raises[k] for k in keys]
        tags = sorted(self._pending_starts)[:1]
        events += [self._pending_starts[t] for t in tags]
        for n, event in enumerate(events):
            tg.start_soon(self._pull, event, 0.0 if n == 0 else self.aim.uniform(0.0, within))
        return f"raises {keys} and starts {tags} pulled forward"

    @staticmethod
    async def _pull(event: anyio.Event, delay: float) -> None:
        await anyio.sleep(delay)
        event.set()

    # -- faults ----------------------------------------------------------------------------------
    async def _inject_faults(self, tg: TaskGroup) -> None:
        for fault in self.faults:
            await anyio.sleep(fault.gap)
            if fault.kind == "kill":
                await self._kill(fault.mode, fault.pick)
            elif fault.kind in ("pg_crash", "pg_restart"):
                await self._bounce_postgres(tg, fault)
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

    async def _bounce_postgres(self, tg: TaskGroup, fault: Fault) -> None:
        """A crash (immediate stop, down ``fault.down`` s, start) or a clean fast restart."""
        assert self.cluster is not None and self.workers is not None
        crash = fault.kind == "pg_crash"
        bounce = Restart("crash" if crash else "restart", time.monotonic(), fault.down if crash else 0.0,
                         survivors=sorted(self.workers.alive()))
        self.db_up = anyio.Event()
        self.faulting = True
        self.mark(f"PostgreSQL {bounce.kind} begins; {self._burst(tg, bounce.down + 0.5)}")
        self._outages.append((bounce.began, None))
        try:
            if crash:
                await anyio.to_thread.run_sync(self.cluster.crash, fault.down)
            else:
                await anyio.to_thread.run_sync(self.cluster.restart, "fast")
        finally:
            self._outages[-1] = (bounce.began, time.monotonic())
            self.faulting = False
            self.db_up.set()
        rows = await _sql(self.dsn, "SELECT now() AS now")
        bounce.done_db = rows[0]["now"]
        alive = self.workers.alive()
        bounce.survivors = [pid for pid in bounce.survivors if pid in alive]
        self.report.bounces.append(bounce)
        self.mark(f"PostgreSQL {bounce.kind} {len(self.report.bounces)} done; survivors {bounce.survivors}")
        self._watch(tg, self._await_recovery, bounce)

    def _watch(self, tg: TaskGroup, watcher: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``watcher(*args)`` in ``tg``; the run does not end before it has (counted now, not once it starts)."""
        self._watchers += 1

        async def run() -> None:
            try:
                await watcher(*args)
            finally:
                self._watchers -= 1

        tg.start_soon(run)

    async def _await_recovery(self, restart: Restart) -> None:
        """Every worker that lived through the crash or restart must commit work again, unaided."""
        assert self.workers is not None and restart.done_db is not None
        n = len(self.report.bounces)
        what = f"PostgreSQL {restart.kind} {n}"
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
                self.mark(f"{what}: every survivor committed work after {restart.recovered_after:.1f} s")
            unregistered = survivors - await _registered(self.dsn)
            if not idle and not unregistered:
                return
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"after {what}, surviving workers {sorted(idle)} committed nothing "
                    f"for {RECOVERY_TIMEOUT:.0f} s" if idle else
                    self._lost_listeners(set(), unregistered, what))
                return
            if idle and (probe is None or await self._finished(probe)):
                probe = f"probe-{self.seed}-{n}-{len(self.probes)}"
                spec = {"tag": probe, "records": 6 * self.cfg.concurrency, "hold": 0.5}
                self.probes[probe] = spec
                self.expected.add_probe(spec)  # planned before it is attempted
                await self._start("probe", spec, probe)
                self.mark(f"started {probe}")
            await anyio.sleep(0.5)

    async def _kill_listeners(self, tg: TaskGroup) -> None:
        rows = await _sql(self.dsn, "SELECT worker_id, backend_pid, pg_terminate_backend(backend_pid) AS gone"
                                    " FROM pgdurable.workers")
        killed = {r["backend_pid"] for r in rows if r["gone"]}
        victims = {_pid_of_worker_id(r["worker_id"]) for r in rows if r["gone"]}
        self.report.listen_kills += 1
        self.mark(f"LISTEN sessions {sorted(killed)} of workers {sorted(victims)} terminated")
        self.report.listen_backends += len(killed)
        self._watch(tg, self._await_rebind, killed, victims, time.monotonic())

    async def _await_rebind(self, killed: set[int], victims: set[int], began: float) -> None:
        """Every worker whose LISTEN session was killed must open a new one by itself."""
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
        """Until every planned instance (children and probes too) has finished, every planned event has
        been raised and no watcher runs (or the timeout)."""
        deadline = time.monotonic() + self.cfg.finish_timeout
        while time.monotonic() < deadline:
            if self._roots_done.is_set() and self._given_up:
                return
            if self._roots_done.is_set() and self._watchers == 0:
                rows = await _sql(self.dsn, "SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed',"
                                            " 'cancelled', 'terminated')) AS live, count(*) AS n"
                                            " FROM pgdurable.instances")
                if rows[0]["live"] == 0 and rows[0]["n"] >= len(self.expected.instances):
                    return
            await anyio.sleep(1.0)
        self.report.notes.append(f"not everything finished within {self.cfg.finish_timeout:.0f} s after the window")

    async def _settle(self) -> None:
        """Give late messages to finished instances a moment to be consumed."""
        with anyio.move_on_after(20):
            while True:
                rows = await _sql(self.dsn, STRANDED_COUNT)
                if rows[0]["n"] == 0:
                    return
                await anyio.sleep(0.5)

    async def check(self) -> None:
        async def load() -> Snapshot:
            async with _connect(self.dsn) as conn:
                return await Snapshot.load(conn)

        snap = await _persist("snapshot", load)
        report = self.report
        report.planned = len(self.expected.instances)
        report.instances = len(snap.instances)
        report.events_checked = sum(len(events) for events in snap.history.values())
        report.events_delivered = delivered_count(snap)
        report.effects = len(snap.effects)
        report.violations.extend(violations(snap, self.expected))
        for bounce in report.bounces:
            assert bounce.done_db is not None
            bounce.completions = sum(
                1 for e in snap.effects if e["applied_at"] > bounce.done_db and e["worker_pid"] in bounce.survivors)
        cfg = self.cfg
        if (len(report.crashes()), len(report.restarts()), sum(report.kills.values())) != (
                cfg.pg_crashes, cfg.pg_restarts, cfg.kills):
            report.notes.append("fewer faults than planned were injected")


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


# -- results ----------------------------------------------------------------------------------------
def record_result(report: Report, cfg: ChaosConfig) -> None:
    """Print the summary and append it (with the command, the seed and the date) to ``cfg.results``."""
    print(report.summary())
    print(report.details())
    for line in report.violations[:50]:
        print(f"  violation: {line}")
    for line in report.notes:
        print(f"  note: {line}")
    if cfg.results is None:
        return
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp}: seed {report.seed}\n", f"- command: `{cfg.command}`",
             f"- replay: `--seed {report.seed}` (pytest: `{SEED_ENV}={report.seed}`)",
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
    "short": ChaosConfig(instances=10, kills=10, pg_crashes=2, pg_restarts=1, listen_kills=2, window=60.0,
                         fanout=(200, 600), event_spread=20.0),
    "full": ChaosConfig(instances=150, kills=100, pg_crashes=10, pg_restarts=3, listen_kills=10, window=600.0,
                        fanout=(200, 1000), finish_timeout=1200.0),
}


_OVERRIDABLE = ("workers", "instances", "kills", "pg_crashes", "pg_restarts", "listen_kills", "window")


async def _main(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in _OVERRIDABLE and v is not None}
    cfg = dataclasses.replace(PRESETS[args.preset], seed=pick_seed(args.seed), **overrides,
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
    parser.add_argument("--seed", type=int, help=f"replay this plan (default: ${SEED_ENV}, else a random seed)")
    for name in _OVERRIDABLE:
        kind = float if name == "window" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="override the preset's value")
    parser.add_argument("--log-dir", type=Path, help="worker logs and timeline (default: a new temp dir)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    sys.exit(anyio.run(_main, parser.parse_args()))


if __name__ == "__main__":
    main()
