"""Fan-out throughput benchmark: the engine beside a raw-SQL floor (see benchmarks/RESULTS.md).

    python benchmarks/fanout.py [--dsn DSN] [--fanout N] [--workflows N] [--concurrency N] [--json PATH]

With no ``--dsn`` (and no ``PGDURABLE_DSN``) it starts a throwaway local cluster.
The DSN's role needs CREATEDB: the run works in scratch databases it drops afterwards.
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

from benchmarks.harness import run_bench  # noqa: E402
from pgdurable_async._store.cluster import EmbeddedCluster  # noqa: E402


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with EmbeddedCluster() as cluster:
        yield cluster.dsn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGDURABLE_DSN"), help="server to benchmark on")
    parser.add_argument("--fanout", type=int, default=10000, help="activities in the fan-out (default 10000)")
    parser.add_argument("--workflows", type=int, default=1000, help="concurrent 3-step workflows (default 1000)")
    parser.add_argument("--concurrency", type=int, default=256, help="runtime max_concurrency (default 256)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    with _server(args.dsn) as dsn:
        report = anyio.run(
            lambda: run_bench(
                dsn, fanout=args.fanout, workflows=args.workflows, concurrency=args.concurrency, out=sys.stdout
            )
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
