"""Data servers (S2DS): the proxies that move a session's bytes.

``base`` defines the interface every backend implements and the registry of backends by
the ``--type`` names the original tooling used; ``builtin`` is our own forwarder.
"""
from .base import BACKENDS, DataServer, DataSpec, Stats, get_backend

__all__ = ["BACKENDS", "DataServer", "DataSpec", "Stats", "get_backend"]
