"""Testing kit: a time-skipping test environment and a replayer for saved histories.

::

    from pgdurable_async import testing

    async with testing.Environment(app) as env:          # a throwaway cluster when no DSN
        handle = await env.client.start(monthly_report, None)
        assert await handle.result(timeout=10) == "sent"  # its 30-day sleep took milliseconds

    testing.replay(app, Path("histories/order-17.json").read_text())  # raises pgd.NonDeterminismError

Nothing in the runtime imports this package.
"""

from ._environment import Environment
from ._replay import replay

__all__ = ["Environment", "replay"]
