"""The wheel holds what an installed package needs, and no dev tooling."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_wheel_ships_schema_queries_and_examples_but_no_benchmark(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=220,
    )
    (wheel,) = tmp_path.glob("pgdurable_async-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = sorted(p.name for p in (ROOT / "schema").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert migrations and {f"pgdurable_async/schema/{m}" for m in migrations} <= names
    assert "pgdurable_async/_store/sql/queries.sql" in names
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert examples and {f"pgdurable_async/examples/{e}" for e in examples} <= names
    assert "pgdurable_async/py.typed" in names
    dashboard = ROOT / "pgdurable_async" / "dashboard"  # its templates, CSS and JS are package data
    assets = {str(p.relative_to(ROOT)) for p in [*dashboard.glob("templates/*.html"), *dashboard.glob("static/*")]}
    assert len(assets) >= 6 and assets <= names
    assert not [n for n in names if "bench" in n or n.startswith(("tests/", "benchmarks/"))]
