"""The benchmark as a script: the engine beside the raw-SQL floors (see benchmarks/RESULTS.md).

    python benchmarks/fanout.py [--dsn DSN] [--sizes 1000,10000,100000] [--workflows N] [--concurrency N]
                                [--processes N] [--json PATH]

With no ``--dsn`` (and no ``PGDURABLE_DSN``) it starts a throwaway local cluster that preloads
pg_stat_statements.  The DSN's role needs CREATEDB: the run works in scratch databases it drops.
``python -m pgdurable_async bench`` runs the same harness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.harness import DEFAULT_SIZES, run_bench  # noqa: E402
from pgdurable_async._cli.devtools import BENCH_SERVER_SETTINGS  # noqa: E402
from pgdurable_async._store.cluster import EmbeddedCluster  # noqa: E402


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with EmbeddedCluster(settings=BENCH_SERVER_SETTINGS) as cluster:
        yield cluster.dsn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGDURABLE_DSN"), help="server to benchmark on")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="fan-out sizes, comma-separated")
    parser.add_argument("--workflows", type=int, default=1000, help="concurrent 3-step workflows (default 1000)")
    parser.add_argument("--concurrency", type=int, default=256, help="runtime max_concurrency (default 256)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (this one and N-1 more)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a comma-separated list of counts: {args.sizes!r}")
    with _server(args.dsn) as dsn:
        report = anyio.run(
            lambda: run_bench(dsn, sizes=sizes, workflows=args.workflows, concurrency=args.concurrency,
                              out=sys.stdout, progress=sys.stderr.isatty(), processes=args.processes)
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
