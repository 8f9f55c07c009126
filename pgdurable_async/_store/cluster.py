"""A throwaway local PostgreSQL cluster, run from the server binaries on the machine.

Used by the test suite, the benchmarks and runs that were given no DSN::

    with EmbeddedCluster() as cluster:
        dsn = cluster.dsn      # postgresql://postgres@127.0.0.1:<port>/postgres

    async with EmbeddedCluster() as cluster:   # blocking steps run in a thread
        ...

PostgreSQL refuses to run as root: when this process is root, the cluster's files
are owned by the ``postgres`` system user and ``initdb`` / ``pg_ctl`` run as it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio.to_thread

from .._base.errors import ConfigurationError

__all__ = ["EmbeddedCluster", "find_pg_bindir"]

#: Program asked for the server's bindir (tests patch it).
PG_CONFIG_PROGRAM = "pg_config"
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


def find_pg_bindir() -> Path:
    """Return the directory holding PostgreSQL's ``initdb`` and ``pg_ctl``.

    Looks at ``$PGDURABLE_PG_BIN``, then ``pg_config --bindir``, then the
    highest-versioned ``/usr/lib/postgresql/*/bin``.
    """
    override = os.environ.get("PGDURABLE_PG_BIN")
    if override:
        path = Path(override)
        if not _has_server_binaries(path):
            raise ConfigurationError(
                f"PGDURABLE_PG_BIN={override!r} has no executable initdb and pg_ctl."
            )
        return path
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
    if candidates:
        return max(candidates, key=_version_key)
    raise ConfigurationError(
        "No PostgreSQL server binaries (initdb, pg_ctl) were found: pass --dsn or "
        "set PGDURABLE_DSN to use an existing database, or install the PostgreSQL "
        "server (e.g. `apt-get install postgresql`), or set PGDURABLE_PG_BIN to "
        "its bin directory."
    )


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
        bindir = self._bindir or find_pg_bindir()
        self._bindir = bindir
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
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
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
