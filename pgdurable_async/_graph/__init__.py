"""Graph workflows: pg_durable's SQL graph DSL interpreted by one built-in orchestration.

``compiler`` checks graph JSON and stamps node ids; ``tokens`` finds ``$name``
references in SQL; ``references`` rewrites them into bind parameters (and ``{var}``
variables into text); ``interpreter`` walks a graph with ordinary ``ctx`` tasks;
``builtins`` and ``http`` are the orchestration and activities a worker registers;
``mermaid`` draws an instance with each node's state.
"""
