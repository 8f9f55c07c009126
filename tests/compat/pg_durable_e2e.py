"""Run pg_durable's own end-to-end SQL files against our ``df`` schema and a real worker.

    python tests/compat/pg_durable_e2e.py --suite /path/to/pg_durable/tests/e2e/sql [--json OUT] [--only 63 ...]

The files are read from a pg_durable checkout (they are not ours to ship) and run unchanged,
each with ``psql -v ON_ERROR_STOP=1`` as the superuser, as pg_durable's ``run.sh`` does, on one
throwaway cluster served by one ``python -m pgdurable_async worker``.  A file passes when psql
exits 0 and prints no ``TEST FAILED``.  The scope is the one issue 10 fixes: files that test the
extension's own lifecycle, settings or internal representation are not run, and four blocks are
cut from files that are (each named below with its reason).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pgdurable_async as pgd  # noqa: E402
from pgdurable_async._store.cluster import EmbeddedCluster  # noqa: E402

#: The worker's app: graph built-ins come with every Runtime, so it needs nothing of its own.
app = pgd.App()

#: Files not run, by prefix, with the reason (the extension's lifecycle, settings and internals).
OUT_OF_SCOPE = {
    "00_": "setup (run first, minus its wait for the extension's background worker)",
    "06_": "HTTP to public hosts and the extension's SSRF settings",
    "10_": "the extension's connection limits",
    "12_": "CREATE/DROP EXTENSION",
    "14_": "the extension's database setting",
    "15_": "DML on the extension's tables under column grants",
    "16_": "the background worker's heartbeat",
    "17_": "the extension's superuser-only settings",
    "25_": "start-up of the background worker",
    "26_": "payloads of duroxide's internal history table",
    "44_": "connection limits", "45_": "connection limits", "46_": "connection limits",
    "47_": "HTTP build features", "48_": "HTTP build features",
    "50_": "grants on the extension's metrics",
    "51_": "the extension's node table keys",
    "52_": "the extension's node table keys",
    "54_": "the background worker's orphan reconciler",
    "57_": "sub-orchestration lineage stamps (duroxide's topology)",
    "66_": "the extension's launch limit for 'new' transactions",
}

#: Blocks cut from in-scope files: (file prefix, first line of the block, its last line, reason).
CUTS = [
    ("00_setup", "SELECT public._e2e_wait_for_worker_ready(60);", "SELECT public._e2e_wait_for_worker_ready(60);",
     "waits for the extension's background worker"),
    ("04_", "-- Test 3: Vars in HTTP requests", "DROP TABLE _test_vars_http;", "HTTP to a public host"),
    ("05_monitoring", "-- (3) Guardrail: a non-superuser cannot raise the cap", "END $lim_guard$;",
     "a superuser-only setting needs the extension's C code"),
    ("09_", "    IF (SELECT count(*) FROM df.nodes WHERE instance_id = inst_id) != 399 THEN", "    END IF;",
     "counts the rows of pg_durable's binary THEN tree"),
]


def cut(name: str, text: str) -> tuple[str, list[str]]:
    """The file's text with its cut blocks removed, and the reasons for what was cut."""
    reasons = []
    for prefix, first, last, reason in CUTS:
        if not name.startswith(prefix):
            continue
        start = text.find(first)
        end = text.find(last, start) if start >= 0 else -1
        if start < 0 or end < 0:
            raise SystemExit(f"{name}: the block to cut ({first!r}) is not in this version of the file")
        text = text[:start] + f"-- (cut: {reason})\n" + text[end + len(last):]
        reasons.append(reason)
    return text, reasons


def run_file(psql: Path, dsn: str, name: str, text: str, timeout: float) -> tuple[bool, float, str]:
    """Run one file as pg_durable's run.sh does: passed, seconds, the output's tail."""
    began = time.monotonic()
    try:
        done = subprocess.run([str(psql), dsn, "-X", "-v", "ON_ERROR_STOP=1"], input=text, capture_output=True,
                              text=True, timeout=timeout)
        output, passed = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as exc:
        output, passed = f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {timeout:.0f} s)", False
    passed = passed and "TEST FAILED" not in output
    return passed, time.monotonic() - began, "\n".join(output.strip().splitlines()[-8:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="pg_durable's tests/e2e/sql directory")
    parser.add_argument("--only", nargs="*", default=[],
                        help="file prefixes to run, out-of-scope ones too (default: every file in scope)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per file (default 600)")
    args = parser.parse_args()
    files = sorted(args.suite.glob("*.sql"))
    if not files:
        print(f"error: no .sql files in {args.suite}", file=sys.stderr)
        return 2
    setup = next((f for f in files if f.name.startswith("00_setup")), None)
    if setup is None:
        print(f"error: {args.suite} has no 00_setup*.sql (is it pg_durable's tests/e2e/sql?)", file=sys.stderr)
        return 2
    if args.only:
        chosen = [f for f in files if not f.name.startswith("00_") and any(f.name.startswith(p) for p in args.only)]
    else:
        chosen = [f for f in files if not any(f.name.startswith(p) for p in OUT_OF_SCOPE)]
    results = []
    # pg_durable's e2e image turns superuser instances on in postgresql.conf (its Dockerfile); so does this.
    settings = {"pg_durable.enable_superuser_instances": "on"}
    with EmbeddedCluster(settings=settings) as cluster, tempfile.TemporaryDirectory() as tmp:
        psql = cluster.bindir / "psql"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "pgdurable_async", "migrate", "--dsn", cluster.dsn], env=env, check=True)
        log = Path(tmp) / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "pgdurable_async", "worker", "--app", "tests.compat.pg_durable_e2e:app",
                 "--dsn", cluster.dsn], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            text, _ = cut(setup.name, setup.read_text())
            ok, _, tail = run_file(psql, cluster.dsn, setup.name, text, args.timeout)
            if not ok:
                print(f"setup failed:\n{tail}", file=sys.stderr)
                return 1
            for path in chosen:
                text, reasons = cut(path.name, path.read_text())
                ok, seconds, tail = run_file(psql, cluster.dsn, path.name, text, args.timeout)
                results.append({"file": path.name, "passed": ok, "seconds": round(seconds, 1), "cut": reasons,
                                **({} if ok else {"tail": tail})})
                print(f"{'PASS' if ok else 'FAIL'}  {path.name}  {seconds:.1f} s" + (f"\n{tail}\n" if not ok else ""),
                      flush=True)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    passed = sum(r["passed"] for r in results)
    print(f"\n{passed} of {len(results)} files {'run' if args.only else 'in scope'} passed")
    if args.json:
        args.json.write_text(json.dumps({"passed": passed, "files": len(results), "results": results,
                                         "out_of_scope": OUT_OF_SCOPE,
                                         "cuts": [{"file": c[0], "reason": c[3]} for c in CUTS]}, indent=2) + "\n")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
