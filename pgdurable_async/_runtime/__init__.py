"""The runtime: LISTEN for wake-ups and run turns, activities and timers (``Runtime``)."""

from .runtime import Runtime

__all__ = ["Runtime"]
