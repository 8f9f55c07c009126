"""``demo`` and ``bench``: the commands that bring their own throwaway PostgreSQL when given no DSN."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import anyio.to_thread

from .._base.errors import ConfigurationError
from .._store.cluster import EmbeddedCluster, find_pg_binaries, foreign_tables
from .admin import dumps
from .demo import run_demo
from .examples import load_example

DSN_ENV = "PGDURABLE_DSN"
THROWAWAY_SETTINGS = {"pg_durable.enable_superuser_instances": "on"}
_HARNESS = Path("benchmarks") / "harness.py"
#: The throwaway cluster of ``bench``: statement times per activity come from pg_stat_statements.
BENCH_SERVER_SETTINGS = {"shared_preload_libraries": "pg_stat_statements"}


@contextlib.asynccontextmanager
async def database(dsn: str | None, settings: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``dsn`` itself, or a throwaway embedded cluster's DSN (with server ``settings``) when none is given."""
    if dsn:
        yield dsn
        return
    binaries = await anyio.to_thread.run_sync(find_pg_binaries)
    print(f"no --dsn or {DSN_ENV}: starting a throwaway cluster, {binaries.describe()} ...",
          file=sys.stderr, flush=True)
    # the demos start graphs from SQL as the cluster's superuser: allowed on a cluster of our own only
    async with EmbeddedCluster(bindir=binaries.bindir, settings={**THROWAWAY_SETTINGS, **(settings or {})}) as cluster:
        yield cluster.dsn
        print("removing the throwaway cluster ...", file=sys.stderr, flush=True)


DEMO_SCHEMA = "pgdurable_demo"  # the demos' tables live here, never beside yours


async def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo fan-out workflow (or the graph example NAME) on an embedded runtime."""
    example = load_example(args.name) if args.name else None  # fail fast, before a cluster starts
    if args.dsn and not args.yes:
        await _refuse_user_databases(args.dsn, args.schema)
    async with database(args.dsn) as dsn:
        if example is not None:
            await example.run(dsn, out=sys.stdout)
        else:
            await run_demo(dsn, schema=args.schema, fanout=args.fanout, out=sys.stdout)
    return 0


async def _refuse_user_databases(dsn: str, schema: str) -> None:
    """A database with tables of its own is someone's: the demos run there only with ``--yes``."""
    found = await foreign_tables(dsn, [schema, "df", DEMO_SCHEMA])
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ConfigurationError(
            f"this database holds tables of its own ({shown}): the demos only write to schema {DEMO_SCHEMA} "
            f"and add instances to {schema}, but to be safe they run here only with --yes "
            f"(or without --dsn/{DSN_ENV}, on a throwaway cluster)"
        )


def load_harness() -> ModuleType:
    """``benchmarks/harness.py`` of the source checkout (the benchmark is not part of the wheel).

    The package ``benchmarks`` is imported from the checkout's root (put first on ``sys.path``).
    """
    for root in (Path(os.getcwd()), Path(__file__).resolve().parents[2]):
        if (root / _HARNESS).is_file() and (root / "benchmarks" / "__init__.py").is_file():
            loaded = sys.modules.get("benchmarks")
            if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != root / "benchmarks":
                continue  # another package of that name is imported already
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks.harness")
    raise ConfigurationError(
        "`bench` runs from a source checkout: its harness is benchmarks/harness.py, which the installed "
        "package does not ship; clone the repository and run it there"
    )


async def cmd_bench(args: argparse.Namespace) -> int:
    """Run the fan-out benchmark (``benchmarks/harness.py``)."""
    bench = load_harness()
    out = sys.stderr if args.json else sys.stdout
    async with database(args.dsn, settings=BENCH_SERVER_SETTINGS) as dsn:
        result = await bench.run_bench(
            dsn, sizes=args.sizes, workflows=args.workflows, concurrency=args.concurrency, out=out,
            progress=sys.stderr.isatty(), processes=args.processes,
        )
    if args.json:
        print(dumps(result, indent=True))
    if isinstance(result, dict) and result.get("ok") is False:
        print("error: the benchmark ran but some of its correctness checks failed", file=sys.stderr)
        return 1
    return 0
