"""``graph ID``: a graph workflow instance as Mermaid, each node with its state.

A graph started from SQL (``df.start``) or ``dsl.start`` carries its graph in its
input; an ``App.graph`` workflow's graph lives in the app's code, so drawing it
needs ``--app``.  Without it, the history tells the two apart (an ``App.graph``
instance records ``graph_node`` facts), and the error says which case it is.
"""

from __future__ import annotations

import argparse
import sys

from .._base import events as ev
from .._base.errors import InvalidArgument
from .._client import Client
from .._client.graphs import render_instance
from .._graph.mermaid import graph_for
from .admin import client_for
from .worker import load_app


async def cmd_graph(args: argparse.Namespace) -> int:
    """Print a graph workflow instance as Mermaid, each node with its state."""
    app = load_app(args.app) if args.app else None
    async with client_for(args) as client:
        if app is None:
            await _explain_missing_graph(client, args.id)
        text = await render_instance(client, args.id, app)
    sys.stdout.write(text + "\n")
    return 0


async def _explain_missing_graph(client: Client, instance_id: str) -> None:
    """Raise a clear error when the instance's graph cannot be drawn without ``--app``."""
    state = await client.status(instance_id)
    if graph_for(state) is not None:
        return
    kinds = {e.kind for e in await client.history(instance_id)}
    if ev.GRAPH_NODE in kinds:
        raise InvalidArgument(
            f"instance {instance_id} runs the App.graph workflow {state.name!r}, whose graph is in your code, "
            "not in the database: pass --app module:app (the app that registers it)"
        )
    raise InvalidArgument(
        f"instance {instance_id} ({state.name}) is an orchestration written in Python, not a graph workflow: "
        f"nothing to draw (its steps: `history {instance_id}`)"
    )
