"""``testing.replay``: a saved history against today's code, without a database."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._app import App
from .._engine import replay_history


def replay(app: App, history: Any, *, instance_id: str | None = None) -> None:
    """Replay ``history`` with ``app``'s orchestrations; raise ``pgd.NonDeterminismError`` where they differ.

    ``history`` is what ``python -m pgdurable_async history ID --json`` prints (as text,
    bytes, parsed JSON or a path to the file), or a list of ``pgd.HistoryEvent``.  The
    check is the runtime's own: a replay this passes, a worker running today's code passes
    too.  ``ctx.new_uuid()`` and ``ctx.random()`` are seeded by the instance id: it is
    ``instance_id``, else the one the history records (histories written by this version
    on do), else a path's file name without its extension (``history ID --json > ID.json``).
    """
    fallback = None
    if isinstance(history, os.PathLike):
        path = Path(history)
        history, fallback = path.read_bytes(), path.stem
    app.install_builtins()  # graphs started with df.start replay through the built-in interpreter
    replay_history({name: d.fn for name, d in app.orchestrations.items()}, history,  # type: ignore[misc]
                   instance_id=instance_id, fallback_id=fallback)
