"""Data servers (S2DS): the proxies that move a session's bytes.

``spec`` is what a session asks of a data server (``DataSpec``) and what it reports
(``Stats``); ``base`` the interface every type implements and the registry of types by
the ``--type`` names the original tooling used. ``engine`` moves the bytes of our own
type, ``node`` is the service it runs in (``--type Builtin``), ``backends`` drive HAProxy,
nginx and stunnel as processes.
"""
from .base import TYPES, DataServer, backend_names, get_backend
from .spec import DataSpec, Stats

__all__ = ["TYPES", "DataServer", "DataSpec", "Stats", "backend_names", "get_backend"]
