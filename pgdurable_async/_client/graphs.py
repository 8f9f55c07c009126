"""A graph workflow instance as a Mermaid flowchart, read through a client."""

from __future__ import annotations

from .._app import App
from .._base.errors import InvalidArgument
from .._graph.mermaid import graph_for, node_states, to_mermaid
from .client import Client


async def render_instance(client: Client, instance_id: str, app: App | None = None) -> str:
    """Mermaid for one instance: its graph (from its input, or ``app`` for ``App.graph``) and node states."""
    state = await client.status(instance_id)
    tree = graph_for(state, app.orchestrations if app is not None else None)
    if tree is None:
        raise InvalidArgument(
            f"instance {instance_id!r} ({state.name}) is not a graph workflow"
            + ("" if app is not None else "; for App.graph workflows pass --app module:app")
        )
    history = []  # node facts of every execution (a loop that continues as new starts another)
    for execution_id in range(1, state.execution_id + 1):
        history.extend(await client.history(instance_id, execution_id=execution_id))
    return to_mermaid(tree, node_states(state, history, tree))
