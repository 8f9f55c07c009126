"""What a limited queue costs per activity: one fan-out of N no-op activities, with and without a queue.

    python benchmarks/queue_overhead.py [--dsn DSN] [--fanout 5000] [--rounds 3] [--concurrency 256]

Modes (each limit set far above what the run reaches, so it never binds and the figure is
the bookkeeping alone): ``none`` (no queue: the claim_work path), ``concurrency``
(``Queue(concurrency=10**6)``: claim_queued locks the queue row and counts leases),
``rate`` (``RateLimit(10**6, per=1 s)``: also counts and records every start in the
sliding window), ``keys`` (``key_concurrency=10**6``, 16 keys: the per-key claim).
Modes alternate, round after round, each on a fresh database; the report gives each
mode's median activities/s and its extra wall time and Python CPU per activity over
``none``.  Without ``--dsn`` (or ``PGDURABLE_DSN``) it starts a throwaway cluster.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

import pgdurable_async as pgd  # noqa: E402
from pgdurable_async._store.cluster import EmbeddedCluster  # noqa: E402

MODES = ("none", "concurrency", "rate", "keys")
BIG = 10**6


def _app(mode: str) -> pgd.App:
    app = pgd.App()
    queue = {
        "none": None,
        "concurrency": pgd.Queue("bench", concurrency=BIG),
        "rate": pgd.Queue("bench", rate_limit=pgd.RateLimit(BIG, per=timedelta(seconds=1))),
        "keys": pgd.Queue("bench", key_concurrency=BIG),
    }[mode]

    @app.activity(name="noop", queue=queue)
    async def noop(ctx: pgd.ActivityContext, value: int) -> int:
        return value

    @app.orchestration(name="fan")
    async def fan(ctx: pgd.OrchestrationContext, n: int) -> int:
        keys = [f"k{i % 16}" for i in range(n)] if mode == "keys" else [None] * n
        return len(await ctx.all([ctx.call_activity(noop, i, key=keys[i]) for i in range(n)]))

    return app


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _one(dsn: str, mode: str, n: int, concurrency: int) -> tuple[float, float]:
    """Seconds and Python CPU seconds of one fan-out of ``n`` in ``mode``, on a fresh database."""
    name = f"pgd_qbench_{mode}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    target = urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
    try:
        async with pgd.Runtime(_app(mode), target, max_concurrency=concurrency) as runtime:
            await (await runtime.client.start("fan", 10)).result(timeout=60)  # warm up
            cpu, began = _cpu(), time.perf_counter()
            assert await (await runtime.client.start("fan", n)).result(timeout=600) == n
            return time.perf_counter() - began, _cpu() - cpu
    finally:
        admin = await asyncpg.connect(dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(dsn: str, *, fanout: int, rounds: int, concurrency: int) -> dict[str, dict[str, float]]:
    seen: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            seconds, cpu = await _one(dsn, mode, fanout, concurrency)
            seen[mode].append((seconds, cpu))
            print(f"round {r + 1} {mode:<12} {fanout / seconds:8,.0f} activities/s  "
                  f"{cpu / fanout * 1e6:6.1f} us CPU/activity", file=sys.stderr, flush=True)
    base_s = statistics.median(s for s, _ in seen["none"])
    base_cpu = statistics.median(c for _, c in seen["none"])
    report = {}
    for mode in MODES:
        s = statistics.median(x for x, _ in seen[mode])
        c = statistics.median(x for _, x in seen[mode])
        report[mode] = {"activities_per_s": fanout / s, "extra_wall_us_per_activity": (s - base_s) / fanout * 1e6,
                        "cpu_us_per_activity": c / fanout * 1e6,
                        "extra_cpu_us_per_activity": (c - base_cpu) / fanout * 1e6}
    print(f"\n{'mode':<12} {'activities/s':>13} {'+wall us/act':>13} {'CPU us/act':>11} {'+CPU us/act':>12}")
    for mode, row in report.items():
        print(f"{mode:<12} {row['activities_per_s']:>13,.0f} {row['extra_wall_us_per_activity']:>13.1f} "
              f"{row['cpu_us_per_activity']:>11.1f} {row['extra_cpu_us_per_activity']:>12.1f}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGDURABLE_DSN"))
    parser.add_argument("--fanout", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    if args.dsn:
        anyio.run(lambda: run(args.dsn, fanout=args.fanout, rounds=args.rounds, concurrency=args.concurrency))
        return 0
    with EmbeddedCluster() as cluster:
        anyio.run(lambda: run(cluster.dsn, fanout=args.fanout, rounds=args.rounds, concurrency=args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
