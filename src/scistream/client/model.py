"""The high-level client's vocabulary: gateways, progress steps and typed results.

``Gateway`` names one control server and how to reach it. The low-level ``AsyncClient``
returns the protocol's messages as they are; the high-level calls of
``scistream.client.session`` (``connect``, ``release``, ``status``, ...) return the frozen
dataclasses below, which serialise to JSON with ``to_dict()`` and never carry a token or
a WAN secret in their ``repr`` or their dict.

    conn = await connect(prod, cons, num_conn=2)
    json.dumps(conn.to_dict())          # what `s2uc connect --json` prints
    conn.consumer_listeners             # ("10.1.0.2:5200", "10.1.0.2:5201")
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence

from ..proto import pb
from .api import AsyncClient, ChannelOptions
from .instances import parse_instances


@dataclasses.dataclass(frozen=True)
class Gateway:
    """One facility's control server (S2CS) and how to reach it.

        Gateway("10.0.0.2:5000", server_cert="/etc/scistream/prod.crt", token=token)
        Gateway("10.0.0.2:5000,10.0.0.3:5000")         # several instances of one facility's S2CS
        Gateway(["10.0.0.2:5000", "10.0.0.3:5000"])    # the same; .address is "10.0.0.2:5000,10.0.0.3:5000"

    With several instances, a call that finds one unreachable goes to the next
    (``scistream.client.instances``)."""
    address: str                      # host:port of its control port (several: comma-separated)
    server_cert: str | None = None    # PEM to verify it (default: $SCISTREAM_SERVER_CERT, ./server.crt)
    insecure: bool = False            # plaintext control channel (a server run with --insecure)
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token, never shown
    timeout: float | None = 60.0      # deadline of the quick calls (update, release, status)
    server_cert_pem: bytes | None = dataclasses.field(default=None, repr=False)  # the certificate
    # itself, when there is no file (server_cert wins when both are given)

    def __post_init__(self) -> None:
        instances = parse_instances(self.address, "address")
        if len(instances) > 1 or not isinstance(self.address, str):
            object.__setattr__(self, "address", ",".join(instances))

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every instance of this facility's control server, in the order they are tried."""
        return parse_instances(self.address, "address")

    @classmethod
    def of(cls, gateway: "Gateway | str | Sequence[str]") -> "Gateway":
        return gateway if isinstance(gateway, Gateway) else cls(gateway)

    def options(self) -> ChannelOptions:
        return ChannelOptions(server_cert=self.server_cert, insecure=self.insecure, token=self.token,
                              timeout=self.timeout, cert_pem=self.server_cert_pem)

    def client(self) -> AsyncClient:
        """A new low-level client for this gateway (close it, or use ``async with``)."""
        return AsyncClient(self.address, self.options())


class Step(str, enum.Enum):
    """Where a ``connect`` is; each is reported once, in about this order."""
    REQUESTED = "requested"            # req sent to both S2CS; waiting for the two hellos
    PROD_HELLO = "prod-hello"          # the producer's controller said hello; WAN listeners known
    CONS_HELLO = "cons-hello"          # the consumer's controller said hello; its listeners known
    PROD_CONNECTED = "prod-connected"  # PROD data server forwards WAN listeners -> producer
    CONNECTED = "connected"            # CONS data server forwards consumer -> PROD: bytes can flow
    RELEASING = "releasing"            # failed or interrupted: releasing what was set up
    RELEASED = "released"              # both sides released


@dataclasses.dataclass(frozen=True)
class Progress:
    """One step of a ``connect``, for a progress display."""
    uid: str
    step: Step
    elapsed: float   # seconds since connect() began
    detail: str = ""


class _Result:
    """A typed result whose ``to_dict`` is its fields but ``_drop``, as JSON takes them."""
    _drop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.name not in self._drop}


@dataclasses.dataclass(frozen=True)
class ProdSide(_Result):
    """The PROD half of a session, connected: the producer's facility is ready."""
    _drop = ("wan_secret",)
    uid: str
    s2cs: str
    wan_listeners: tuple[str, ...]       # PROD data server's listeners, reachable over the WAN
    producer_endpoints: tuple[str, ...]  # the producer application's endpoints (from its hello)
    wan_security: str                    # "tls", "plain", or "plain (original server)"
    wan_secret: bytes = dataclasses.field(default=b"", repr=False)  # for the CONS side only


@dataclasses.dataclass(frozen=True)
class ConsSide(_Result):
    """The CONS half of a session, connected to the PROD side's WAN listeners."""
    uid: str
    s2cs: str
    consumer_listeners: tuple[str, ...]  # where the consumer application connects
    targets: tuple[str, ...]             # the PROD WAN listeners they forward to
    wan_security: str


@dataclasses.dataclass(frozen=True)
class Connection(_Result):
    """A whole session, both sides connected: the consumer connects to ``consumer_listeners``
    and reaches the producer's endpoints, in order (listener i -> endpoint i)."""
    _drop = ("steps", "prod", "cons")
    uid: str
    prod_s2cs: str
    cons_s2cs: str
    num_conn: int
    rate: int
    producer_endpoints: tuple[str, ...]
    wan_listeners: tuple[str, ...]
    consumer_listeners: tuple[str, ...]
    wan_security: str
    steps: tuple[tuple[str, float], ...] = ()   # (step, seconds since start), in order
    prod: Gateway | None = dataclasses.field(default=None, repr=False, compare=False)
    cons: Gateway | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def setup_seconds(self) -> float:
        return self.steps[-1][1] if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(),
                "steps": [{"step": s, "seconds": round(t, 4)} for s, t in self.steps]}


@dataclasses.dataclass(frozen=True)
class Released(_Result):
    """What ``release`` found on each side: True if released, False if not there any more."""
    uid: str
    prod: bool
    cons: bool


@dataclasses.dataclass(frozen=True)
class SessionStatus(_Result):
    """One session on one S2CS, as its ``status`` RPC reports it."""
    uid: str
    role: str
    state: str                 # requested, ready, connected, released, expired, failed
    owner: str
    listeners: tuple[str, ...]
    targets: tuple[str, ...]
    num_conn: int
    rate: int
    bytes_in: int              # towards the producer
    bytes_out: int             # towards the consumer
    connections: int           # open now
    created: float             # unix time
    lease_expires: float       # unix time, 0 = none
    ended: float               # unix time, 0 = live
    last_error: str
    wan_security: str
    server_type: str
    rate_enforced: bool = True  # False: a client of the original tooling; the rate is not enforced
    node: str = ""              # a facility (s2cs --facility): the node carrying the session
    instance: str = ""          # a facility: the control instance that took its req
    #: per-hop telemetry: this gateway's legs, ``{"lan": {...}, "wan": {...}}`` (rtt_ms, cwnd,
    #: retrans_pct, delivery_rate_bps, sent_bps, received_bps, rwnd_limited, sndbuf_limited,
    #: cwnd_limited, app_limited, ...; see docs/telemetry.md); empty: none sampled
    legs: dict = dataclasses.field(default_factory=dict)
    bottleneck: str = ""        # the hop that holds the session back, as far as this gateway sees

    @property
    def active(self) -> bool:
        return self.state in ("requested", "ready", "connected")

    @classmethod
    def from_pb(cls, info: pb.SessionInfo) -> "SessionStatus":
        converted = {"listeners": tuple(info.listeners), "targets": tuple(info.targets),
                     "rate_enforced": not info.rate_not_enforced, "legs": legs_dict(info)}
        same = {f.name: getattr(info, f.name) for f in dataclasses.fields(cls) if f.name not in converted}
        return cls(**same, **converted)


def legs_dict(info: pb.SessionInfo) -> dict[str, dict[str, Any]]:
    """The legs of a status answer as plain data: ``{"lan": {...}, "wan": {...}}``."""
    return {leg.leg: {f.name: getattr(leg, f.name) for f in leg.DESCRIPTOR.fields if f.name != "leg"}
            for leg in info.legs}


def chain(statuses: "list[SessionStatus]") -> dict[str, Any]:
    """One session's whole chain from both gateways' answers (the PROD one and the CONS
    one): ``hops`` (producer, A's LAN, WAN, B's LAN, consumer, each with ``rate_bps`` and
    ``rtt_ms``), ``bottleneck`` (words) and ``hop`` (which one limits it)."""
    from ..data.telemetry import hops, verdict
    sides = {s.role: s.legs for s in statuses if s.active and s.legs}
    hop, words = verdict(sides)
    return {"hops": hops(sides), "bottleneck": words, "hop": hop}


__all__ = ["chain", "Gateway", "Step", "Progress", "ProdSide", "ConsSide", "Connection", "Released", "SessionStatus"]
