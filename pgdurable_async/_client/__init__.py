"""The client: start, query, signal and wait for instances (``Client``, ``InstanceHandle``)."""

from .client import Client, InstanceHandle

__all__ = ["Client", "InstanceHandle"]
