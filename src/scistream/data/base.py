"""The data-server interface and the backend registry.

A *data server* serves one session on one gateway: it listens on ``spec.ports`` at
``spec.listen_host`` and forwards the connections accepted on listener ``i`` to
``spec.targets[i]``, both directions. Which leg crosses the WAN depends on the role:

* ``PROD``: the listeners face the WAN (TLS server when ``spec.wan_secret`` is set),
  the targets are the producer's endpoints on the LAN (plain TCP).
* ``CONS``: the listeners face the consumer on the LAN (plain TCP), the targets are the
  PROD side's WAN listeners (TLS client when ``spec.wan_secret`` is set).

Every type is named in ``TYPES`` (its ``--type`` names and where its class lives; the
CLI's choices come from there, and a class is imported only when used). The control server
calls ``check_available()`` at start, then per session ``start()``; ``retarget()`` on a
later update; ``stop()`` on release; ``wait_exit()`` to learn of a crash; ``stats()``
for the byte counters. Every method is a coroutine except ``check_available``; ``stop``
is idempotent and must leave no process and no listening port behind.

    server = get_backend("Builtin")(spec)
    await server.start()        # returns once every listener accepts connections
    ...
    await server.stop()
"""
from __future__ import annotations

import abc
import importlib
import logging
from typing import Any, ClassVar

from .spec import DataSpec, Stats

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (binary missing, module missing)."""


class DataServer(abc.ABC):
    kind: ClassVar[str] = ""
    #: True for the types whose original behaviour was a plaintext WAN leg.
    legacy_plaintext: ClassVar[bool] = False
    #: True for the types that enforce ``spec.max_conns`` and count the refusals
    #: (``Stats.refused_connections``).
    caps_conns: ClassVar[bool] = False
    #: False for the types that may drop the end of a half-closed stream (the side that
    #: closes last); each such stream is counted in ``Stats.cut_streams``. (The stunnel
    #: types carry them, through their relay.)
    carries_half_close: ClassVar[bool] = True
    #: What the type does with UDP (``DataSpec.udp``): "" carries none (HAProxy, stunnel),
    #: "plain" carries datagrams in the clear only (Nginx), "sealed" encrypts them on the
    #: WAN leg as it does TCP (Builtin). See ``udp_carriage``.
    udp_support: ClassVar[str] = ""

    @classmethod
    def udp_carriage(cls, spec: DataSpec) -> str:
        """How this type carries the UDP of ``spec``: "off" (s2cs --no-udp), "unsupported"
        (the type carries none), "plain" (the WAN leg is plain anyway), "encrypted" (sealed
        on the WAN leg), "plaintext" (in the clear beside an encrypted TCP leg, as the
        operator said: --udp-plaintext) or "withheld" (the type cannot encrypt datagrams and
        the TCP leg is encrypted: it carries none rather than leak them)."""
        if not spec.udp:
            return "off"
        if not cls.udp_support:
            return "unsupported"
        if spec.wan_secret is None:
            return "plain"
        if cls.udp_support == "sealed":
            return "encrypted"
        return "plaintext" if spec.udp_plaintext else "withheld"

    @property
    def carries_udp(self) -> bool:
        return self.udp_carriage(self.spec) in ("plain", "encrypted", "plaintext")

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        #: When the WAN leaf certificate must be issued again (epoch s; 0: never, e.g. it
        #: ends with the lease): ``renew_credentials`` then, by the control server.
        self.renew_at = 0.0

    async def renew_credentials(self) -> None:
        """Issue the session's WAN leaf certificate again, for new connections (a session
        without a lease that outlives it); established ones keep theirs. Default: nothing."""

    @classmethod
    def check_available(cls) -> None:
        """Raise BackendUnavailable with a clear message if this backend cannot run."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving; return only once every listener accepts connections.

        Raise ``scistream.errors.DataServerError`` with the reason on failure, having
        stopped whatever was started."""

    async def retarget(self, targets: tuple[str, ...]) -> None:
        """Forward new connections to new targets (an update on a connected session).

        The default restarts the server; backends that can reload in place override it."""
        await self.stop()
        self.spec = self.spec.with_targets(targets)
        await self.start()

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop everything this server started. Idempotent."""

    @abc.abstractmethod
    async def wait_exit(self) -> str:
        """Complete, with a reason, when the server stops without ``stop()`` being called."""

    async def stats(self) -> Stats:
        return Stats()

    async def telemetry(self) -> dict[str, dict[str, Any]] | None:
        """The session's legs on this gateway (``data.telemetry.summarize``: ``lan``,
        ``wan``), from TCP_INFO sampled about once a second; None: this type cannot say."""
        return None

    def handle(self) -> dict[str, Any]:
        """What the control server stores (JSON) to re-adopt this server after a restart."""
        return {}

    @classmethod
    async def adopt(cls, spec: DataSpec, handle: dict[str, Any]) -> "DataServer":
        """Take over a data server a previous control server started (from ``handle()``).

        Raise ``DataServerError`` if it is gone; the caller then restarts it or marks the
        session failed. ``wait_exit`` and ``stop`` must work on the adopted server."""
        raise NotImplementedError(f"{cls.kind} data servers cannot be re-adopted")

    def detach(self) -> None:
        """Leave the server running when the control server exits (it is re-adopted later).

        The default detaches every ``ChildProcess`` the server holds in an attribute."""
        from .supervise import ChildProcess
        for value in vars(self).values():
            for child in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(child, ChildProcess):
                    child.detach()

    @property
    def pids(self) -> list[int]:
        return []


#: Every data-server type: ``--type`` name -> ``module:Class``. Names are matched without
#: regard to case; two names of one class are the same type (the original's spellings).
TYPES: dict[str, str] = {
    "Builtin": "scistream.data.node.backend:NodeDataServer",
    "Haproxy": "scistream.data.backends.haproxy:HaproxyServer",
    "HaproxySubprocess": "scistream.data.backends.haproxy:HaproxyServer",
    "Nginx": "scistream.data.backends.nginx:NginxServer",
    "Stunnel": "scistream.data.backends.stunnel:StunnelServer",
    "StunnelSubprocess": "scistream.data.backends.stunnel:StunnelServer",
}


def backend_names() -> list[str]:
    """The ``--type`` names, in the order the docs list them."""
    return list(TYPES)


def get_backend(name: str) -> type[DataServer]:
    """The class of a ``--type`` name (any case); ValueError naming the choices otherwise."""
    found = next((where for known, where in TYPES.items() if known.lower() == str(name).lower()), None)
    if found is None:
        raise ValueError(f"unknown data server type {name!r}; choose one of {', '.join(TYPES)}")
    module, _, attr = found.partition(":")
    return getattr(importlib.import_module(module), attr)
