"""find_pg_bindir: where the PostgreSQL server binaries are looked for (no server)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pgdurable_async._base.errors import ConfigurationError
from pgdurable_async._store import cluster as _cluster
from pgdurable_async._store.cluster import find_pg_bindir


def _fake_bindir(path: Path, names: tuple[str, ...] = ("initdb", "pg_ctl")) -> Path:
    path.mkdir(parents=True)
    for name in names:
        exe = path / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def no_system_pg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env override, no pg_config on PATH, an empty install root."""
    monkeypatch.delenv("PGDURABLE_PG_BIN", raising=False)
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


def test_conf_values_are_quoted() -> None:
    assert _cluster._conf_line("port", "5432") == "port = '5432'\n"
    assert _cluster._conf_line("x", "it's") == "x = 'it''s'\n"


def test_free_port_is_a_usable_port() -> None:
    assert 0 < _cluster._free_port() < 65536
