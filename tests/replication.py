"""A primary and a streaming-replication standby on this machine, for failover tests.

::

    async with ReplicatedPair() as pair:      # commits wait for the standby (synchronous)
        dsn = pair.dsn                        # both hosts, target_session_attrs=read-write
        await anyio.to_thread.run_sync(pair.primary.kill)     # SIGKILL every server process
        await anyio.to_thread.run_sync(pair.standby.promote)  # the standby takes over

Both are :class:`EmbeddedCluster` servers (run as the ``postgres`` user when we are
root).  The standby is a ``pg_basebackup -R`` copy of the primary, streaming from
a physical replication slot; its ``application_name`` is what the primary's
``synchronous_standby_names`` names, so a commit is acknowledged only once the
standby has flushed it to disk.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import anyio.to_thread
import asyncpg

from pgdurable_async._store.cluster import EmbeddedCluster

_SMALL = {"shared_buffers": "64MB", "max_connections": "150"}


class Standby(EmbeddedCluster):
    """A hot standby made from ``primary`` with ``pg_basebackup -R``, streaming as ``name``."""

    def __init__(self, primary: EmbeddedCluster, name: str = "standby1", *, slot: bool = True,
                 settings: dict[str, str] | None = None) -> None:
        # The copied postgresql.conf carries the primary's settings; ours, appended after
        # them, win. A promoted standby must not wait for a standby of its own.
        super().__init__(settings={"synchronous_standby_names": "", **(settings or {})})
        self.primary = primary
        self.name = name
        self.slot = slot

    def _create_datadir(self, bindir: Path) -> None:
        source = f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={self.name}"
        cmd = [str(bindir / "pg_basebackup"), "-D", str(self.datadir), "-d", source,
               "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]
        if self.slot:
            cmd += ["-C", "-S", self.name]  # a physical slot: the primary keeps WAL until we have it
        self._run(cmd, "pg_basebackup")

    def promote(self) -> None:
        """``pg_ctl promote``: returns once the standby accepts writes."""
        self._pg_ctl("promote")


class ReplicatedPair:
    """A primary, its standby, and a DSN naming both; ``synchronous`` makes commits wait for the standby."""

    def __init__(self, *, synchronous: bool = True, slot: bool = True, log_dir: Path | None = None) -> None:
        self.synchronous = synchronous
        self.log_dir = log_dir  # where stop() keeps the servers' logs (else they go with the servers)
        self.primary = EmbeddedCluster(settings={**_SMALL, "wal_level": "replica", "max_wal_senders": "5"})
        self.standby = Standby(self.primary, slot=slot, settings=_SMALL)

    @property
    def dsn(self) -> str:
        """Both servers; a connection goes to whichever of them accepts writes."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.primary.start)
        await anyio.to_thread.run_sync(self.standby.start)
        conn = await asyncpg.connect(self.primary.dsn)
        try:
            if self.synchronous:
                await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{self.standby.name}'")
                await conn.execute("SELECT pg_reload_conf()")
            wanted = "sync" if self.synchronous else "async"
            with anyio.fail_after(30):
                while await conn.fetchval(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", self.standby.name
                ) != wanted:
                    await anyio.sleep(0.05)
        finally:
            await conn.close()

    def stop(self) -> None:
        """Stop and remove both servers (a killed one is only removed)."""
        if self.log_dir is not None:
            for name, cluster in (("primary", self.primary), ("standby", self.standby)):
                with contextlib.suppress(OSError, RuntimeError):
                    shutil.copyfile(cluster.logfile, self.log_dir / f"{name}.log")
        try:
            self.standby.stop(mode="immediate")
        finally:
            self.primary.stop(mode="immediate")

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.stop)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)
