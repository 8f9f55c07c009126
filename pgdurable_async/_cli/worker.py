"""``worker`` and ``migrate``: serve an app until SIGTERM, install or upgrade the schema."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .._app import App
from .._base.errors import ConfigurationError
from .._base.names import is_reserved
from .._runtime import Runtime
from .._runtime.metrics import serve as serve_metrics
from .._store.migrations import latest_version, migrate
from .app_import import import_app_module
from .supervisor import supervise

log = logging.getLogger("pgdurable_async.cli")


def load_app(spec: str) -> App:
    """Import ``module:attr`` (attr defaults to ``app``) from the current directory, like uvicorn."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {spec!r} must look like module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = import_app_module(module_name, spec)
    try:
        for part in (attr or "app").split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr or 'app'!r} (--app {spec})") from None
    if not isinstance(obj, App):
        raise ConfigurationError(f"--app {spec} is a {type(obj).__name__}, not a pgdurable_async.App")
    return obj


async def cmd_worker(args: argparse.Namespace) -> int:
    """Serve the app until SIGTERM/SIGINT, then drain and exit 0 (``--processes N``: N processes)."""
    app = load_app(args.app)  # fail fast, in the supervisor too
    if args.processes > 1:
        return await supervise(args.argv, args.processes)
    runtime = Runtime(
        app,
        args.dsn,
        schema=args.schema,
        max_concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        sweep_interval=args.sweep_interval,
        wake=args.wake,
        poll_interval=args.poll_interval,
        retention=args.retention,
        metrics=args.metrics_port is not None,
    )
    # Runtime.stop() must run in the task and cancel-scope level that started it,
    # so the second-signal watcher's task group encloses the runtime.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            async with runtime:
                if args.metrics_port is not None:
                    bound = serve_metrics(args.metrics_port, args.metrics_host)
                    log.info("metrics at http://%s:%d/metrics", _url_host(args.metrics_host), bound)
                log.info(
                    "worker %s ready: %d orchestrations, %d activities, concurrency %d, wake %s, queues: %s",
                    runtime.worker_id,
                    sum(not is_reserved(name) for name in app.orchestrations),  # the app's own, not built-ins
                    sum(not is_reserved(name) for name in app.activities),
                    args.concurrency,
                    runtime.wake if runtime.wake == "listen" else f"poll every {runtime.poll_interval:g} s",
                    ", ".join(sorted(app.queues)) or "-",
                )
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("%s received: draining (up to %.0f s)", name, runtime.drain_timeout)
                    break
                tg.start_soon(_exit_on_second_signal, signals)
                await runtime.stop()
            tg.cancel_scope.cancel()
    log.info("worker stopped")
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.warning("second %s: exiting without finishing the drain", signal.Signals(signum).name)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)


async def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending schema migrations."""
    applied = await migrate(args.dsn, args.schema)
    if applied:
        print(f"applied migration(s) {', '.join(map(str, applied))} to schema {args.schema!r}")
    else:
        print(f"schema {args.schema!r} is up to date")
    print(f"schema version: {latest_version()}")
    return 0
