"""What a session asks of a data server, and what it reports back.

``DataSpec`` is one session's half on one gateway (its listeners, targets, rate, WAN
secret); ``Stats`` its counters. Every data-server type takes the same spec, so the
control server never knows which type it drives. Targets are ``host:port`` strings
resolved to addresses before a data server sees them (``resolve_target``: no name
lookup ever runs on the data path).

    spec = DataSpec(uid=uid, role="PROD", listen_host="127.0.0.1", ports=(5100,),
                    targets=("127.0.0.1:7000",), wan_secret=wankeys.new_secret())
"""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

from ..addr import parse_listener


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


#: UDP flows a session may have open at once, and seconds a flow lasts without a datagram
#: either way (s2cs --udp-max-flows, --udp-idle).
UDP_MAX_FLOWS = 256
UDP_IDLE = 60.0


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
    wan_congestion: str = ""     # the WAN leg's congestion control (data.hosttcp); "" = the kernel's choice
    udp: bool = False            # carry UDP on every port beside TCP, where the type can (s2cs: on unless --no-udp)
    udp_plaintext: bool = False  # a type that cannot encrypt datagrams carries them in the clear
                                 # beside an encrypted TCP leg (s2cs --udp-plaintext)
    udp_max_flows: int = UDP_MAX_FLOWS   # UDP flows one session may have open at once (0: no cap)
    udp_idle: float = UDP_IDLE           # seconds a UDP flow lasts without a datagram

    @property
    def wan_side(self) -> str:
        """Which socket of a connection is on the WAN leg: PROD's listener faces the WAN (the
        accepted side, ``a``), CONS connects across it (the target side, ``b``)."""
        return "a" if self.role == "PROD" else "b"

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
    cut_streams: int = 0   # streams whose end the data server may have dropped (stunnel, half-close)
    failure: str = ""      # the last connection that failed, when and why (Builtin), e.g. its target refused
    udp: dict[str, int] = dataclasses.field(default_factory=dict)   # UDP counters (udp.COUNTERS); {}: none


UDP_WORDS = {"off": "off (s2cs --no-udp)", "unsupported": "not carried by this type",
             "plain": "carried, plain (as the WAN leg)", "encrypted": "carried, encrypted on the WAN leg",
             "plaintext": "carried IN THE CLEAR beside the encrypted TCP leg (s2cs --udp-plaintext)",
             "withheld": "not carried: this type cannot encrypt datagrams and the WAN leg is encrypted"}


def udp_summary(mode: str, c: dict) -> str:
    """How the session carries UDP, and its counters (udp_counters of SessionInfo)."""
    text = UDP_WORDS.get(mode, mode or "-")
    if c:
        drops = {k[6:]: v for k, v in sorted(c.items()) if k.startswith("drops_") and v}
        text += (f"; {c.get('flows', 0)} flows open, {c.get('total_flows', 0)} in all; to producer "
                 f"{c.get('datagrams_in', 0)} datagrams ({c.get('bytes_in', 0)} B), to consumer "
                 f"{c.get('datagrams_out', 0)} datagrams ({c.get('bytes_out', 0)} B)")
        text += "; dropped: " + (", ".join(f"{v} {k}" for k, v in drops.items()) if drops else "none")
        if c.get("over_mtu"):
            text += f"; {c['over_mtu']} over the path MTU (fragmented)"
    return text


def keepalive_setting(value: Any) -> tuple[int, int, int]:
    """``[idle s, interval s, probes]`` from a configuration (default ``KEEPALIVE``);
    ``[0, 0, 0]``: the system's timings."""
    if value is None:
        return KEEPALIVE
    return parse_keepalive(value)


def resolve_target(text: str) -> tuple[int, Any]:
    """``address:port`` (``[v6]:port``) -> (family, sockaddr); ValueError otherwise.

    Addresses only, never a name lookup: a lookup would stall every connection of the
    loop, so the control server resolves names before it starts or retargets a data
    server (``addr.resolve_listener``)."""
    host, port = parse_listener(str(text))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve target {text!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr
