"""The data-server interface and the backend registry.

A *data server* serves one session on one gateway: it listens on ``spec.ports`` at
``spec.listen_host`` and forwards the connections accepted on listener ``i`` to
``spec.targets[i]``, both directions. Which leg crosses the WAN depends on the role:

* ``PROD``: the listeners face the WAN (TLS server when ``spec.wan_secret`` is set),
  the targets are the producer's endpoints on the LAN (plain TCP).
* ``CONS``: the listeners face the consumer on the LAN (plain TCP), the targets are the
  PROD side's WAN listeners (TLS client when ``spec.wan_secret`` is set).

Backends register by the ``--type`` name (``@register("Builtin")``). The control server
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
import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)


#: TCP keepalive of every data-server socket: (idle seconds, probe interval seconds, probes).
#: A peer that vanishes without a FIN or a reset (a cut link, a host powered off) is found
#: within idle + interval x probes (2 minutes), while a quiet but live stream lasts for ever
#: (its peer's kernel answers the probes). (0, 0, 0): the system's settings
#: (net.ipv4.tcp_keepalive_*; 2 hours and more by default).
KEEPALIVE: tuple[int, int, int] = (60, 15, 4)


def parse_keepalive(value: object) -> tuple[int, int, int]:
    """``"60,15,4"``, ``[60, 15, 4]`` or ``"system"`` (= ``(0, 0, 0)``); ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("system", "0"):
            return 0, 0, 0
        parts: object = text.split(",")
    else:
        parts = value
    try:
        idle, interval, count = (int(str(v).strip()) for v in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"TCP keepalive must be IDLE,INTERVAL,COUNT (e.g. 60,15,4) or 'system', "
                         f"got {value!r}") from None
    if (idle, interval, count) == (0, 0, 0):
        return 0, 0, 0
    if not (1 <= idle <= 32767 and 1 <= interval <= 32767 and 1 <= count <= 127):
        raise ValueError(f"TCP keepalive: idle and interval must be 1-32767 s and count 1-127, got {value!r}")
    return idle, interval, count


@dataclasses.dataclass(frozen=True)
class DataSpec:
    uid: str
    role: str                    # "PROD" or "CONS"
    listen_host: str             # the --listener-ip the operator gave; never 0.0.0.0 unless asked
    ports: tuple[int, ...]       # one listener per connection slot
    targets: tuple[str, ...]     # "host:port", same length as ports (round-robin already applied)
    rate_kbps: int = 0           # whole-session cap in kbit/s; 0 = unlimited
    wan_secret: bytes | None = None  # 32 random bytes; None = plaintext WAN leg
    workdir: Path = Path(".")    # per-session directory for configs, logs, sockets
    keepalive: tuple[int, int, int] = KEEPALIVE   # see KEEPALIVE; (0, 0, 0) = the system's
    max_conns: int = 0           # open connections per session at most (--max-session-conns); 0 = no cap
    service: str = ""            # Builtin: the node service's control socket (scistream.data.node)
    lease_end: float = 0.0       # the session's lease end (epoch s; 0 = none): its WAN leaf ends a margin after

    @property
    def wan_tls(self) -> bool:
        return self.wan_secret is not None

    def with_targets(self, targets: tuple[str, ...]) -> "DataSpec":
        return dataclasses.replace(self, targets=targets)


@dataclasses.dataclass
class Stats:
    bytes_in: int = 0      # bytes carried towards the producer (consumer -> producer)
    bytes_out: int = 0     # bytes carried towards the consumer (producer -> consumer)
    connections: int = 0   # connections open now
    total_connections: int = 0
    refused_connections: int = 0   # refused by the max_conns cap (DataSpec.max_conns)


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (binary missing, module missing)."""


class DataServer(abc.ABC):
    kind: ClassVar[str] = ""
    #: True for the types whose original behaviour was a plaintext WAN leg.
    legacy_plaintext: ClassVar[bool] = False
    #: True for the types that enforce ``spec.max_conns`` and count the refusals
    #: (``Stats.refused_connections``).
    caps_conns: ClassVar[bool] = False

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


BACKENDS: dict[str, type[DataServer]] = {}


def register(*names: str):
    def deco(cls: type[DataServer]) -> type[DataServer]:
        cls.kind = names[0]
        for n in names:
            BACKENDS[n.lower()] = cls
        return cls
    return deco


def get_backend(name: str) -> type[DataServer]:
    _load_all()
    try:
        return BACKENDS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown data server type {name!r}; choose one of {', '.join(backend_names())}") from None


def backend_names() -> list[str]:
    _load_all()
    seen: list[str] = []
    for cls in BACKENDS.values():
        for alias in getattr(cls, "aliases", (cls.kind,)):
            if alias not in seen:
                seen.append(alias)
    return seen


def _load_all() -> None:
    from . import builtin, nodebackend  # noqa: F401
    try:
        from .backends import haproxy, nginx, stunnel  # noqa: F401
    except ImportError as exc:  # pragma: no cover - only while a backend is being written
        log.debug("external backends not loaded: %s", exc)
