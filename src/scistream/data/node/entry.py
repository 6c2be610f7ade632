"""A session as the node service holds it: its checked configuration, its credentials (in
memory only), its listening sockets and which workers serve them.

    cfg = with_credentials(check_cfg(msg["cfg"]))
    e = Entry(sid, cfg, bind_listeners(cfg["listen_host"], cfg["ports"]), placement=[0, 1])
"""
from __future__ import annotations

import datetime
import logging
import math
import socket
from typing import Any

from ..engine.udp import COUNTERS as UDP_COUNTERS, big_buffers
from ..spec import resolve_target
from .client import ServiceError

log = logging.getLogger(__name__)


#: A session's counters, summed over its workers (the UDP ones: ``engine.udp.COUNTERS``, as
#: ``udp_``-prefixed keys).
COUNTERS = ("bytes_in", "bytes_out", "connections", "total_connections", "failed_connections",
            "refused_connections", "tls_resumed", "tls_sessions_kept") + tuple(f"udp_{k}" for k in UDP_COUNTERS)


def zero_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def add_counters(into: dict[str, int], more: dict[str, int] | None) -> None:
    for k in COUNTERS:
        into[k] += int((more or {}).get(k, 0))


def newest_failure(e: "Entry") -> dict:
    """The last connection of the session that failed, of all its workers' (what each said
    last): ``failure`` (what happened) and ``failure_at`` (unix time), or nothing."""
    at, what = max(((c.get("failure_at") or 0.0, c.get("failure") or "") for c in e.seen.values()),
                   default=(0.0, ""))
    return {"failure": what, "failure_at": at} if what else {}


#: A request the service refuses (``code``: invalid, busy, unknown): what its clients raise too.
OpError = ServiceError


class Entry:
    """A session as the service holds it: its config, listening sockets and placement."""

    def __init__(self, sid: str, cfg: dict, socks: list[socket.socket], placement: list[int],
                 also: list[int | None] | None = None, udp_socks: list[socket.socket] | None = None) -> None:
        self.sid = sid
        self.cfg = cfg
        self.socks = socks
        self.udp_socks = udp_socks or []     # one per listener (cfg "udp"), at its home worker
        self.placement = placement            # the worker of each listener (its home)
        self.also = also or [None] * len(placement)   # the worker the home one hands to, if any
        self.base = zero_counters()                   # what workers that died had carried
        self.seen: dict[int, dict[str, int]] = {}   # last counters read, per worker
        self.failed = ""

    def workers(self) -> list[int]:
        """Every worker that accepts on one of the session's listeners."""
        return sorted(set(self.placement) | {w for w in self.also if w is not None})

    def share(self, index: int) -> tuple[dict, list[int]]:
        """The add message for worker ``index``: the listeners at home there (the second
        worker of a listener gets none: it takes what the home worker hands it), and its
        share of the cap."""
        home = [i for i, w in enumerate(self.placement) if w == index]
        cfg = dict(self.cfg)
        for key in ("max_conns", "udp_max_flows"):
            if cap := int(cfg.get(key) or 0):
                cfg[key] = max(1, math.ceil(cap * len(home) / len(self.placement)))
        msg = {"op": "add", "sid": self.sid, "cfg": cfg, "listeners": home, "home": bool(home)}
        fds = [self.socks[i].fileno() for i in home]
        if self.udp_socks and home:      # after the TCP listeners' sockets
            msg["udp"] = home
            fds += [self.udp_socks[i].fileno() for i in home]
        return msg, fds

    def partners(self, index: int) -> dict[str, int]:
        """The listeners at home on worker ``index`` that have a second worker, and that
        worker (``attach``: sent once both carry the session)."""
        return {str(i): w for i, (h, w) in enumerate(zip(self.placement, self.also))
                if h == index and w is not None and w != index}

    def spreading(self) -> list[int]:
        """The home workers that hand connections to a second worker."""
        return [i for i in self.workers() if self.partners(i)]

    def close(self) -> None:
        for s in self.socks + self.udp_socks:
            s.close()
        self.socks = []
        self.udp_socks = []


def with_credentials(cfg: Any) -> Any:
    """A session given as its WAN secret (``wan_secret``, hex): its certificate and key,
    derived here and kept in memory (``cert_pem``, ``key_pem``; the workers load them
    through a memory file), so no credential file is written for it; and the ticket keys
    its PROD listeners share (``ticket_keys``)."""
    if not isinstance(cfg, dict) or not cfg.get("wan_secret"):
        return cfg
    from .. import wankeys
    cfg = dict(cfg)
    try:
        secret = bytes.fromhex(str(cfg.pop("wan_secret")))
    except ValueError:
        raise OpError("wan_secret must be hex") from None
    if len(secret) != wankeys.SECRET_BYTES:
        raise OpError(f"wan_secret must be {wankeys.SECRET_BYTES} bytes")
    try:
        until = float(cfg.pop("cert_until", 0) or 0)
    except (TypeError, ValueError):
        raise OpError("cert_until must be a number (epoch seconds, 0: the default lifetime)") from None
    not_after = datetime.datetime.fromtimestamp(until, datetime.timezone.utc) if until > 0 else None
    creds = wankeys.derive_credentials(secret, str(cfg.get("uid")), not_after=not_after)
    cfg.update(tls=True, cert_pem=creds.cert_pem.decode(), key_pem=creds.key_pem.decode(),
               ca_pem=creds.ca_pem.decode(), ticket_keys=wankeys.ticket_keys(secret).hex())
    if cfg.get("udp"):     # the sealed UDP leg's master key (engine.udpseal)
        from ..engine.udpseal import master_key
        cfg["udp_key"] = master_key(secret).hex()
    return cfg


def check_cfg(cfg: Any) -> dict:
    """A session's configuration, checked; OpError (invalid) with the reason otherwise."""
    if not isinstance(cfg, dict):
        raise OpError("cfg must be an object")
    try:
        if cfg.get("role") not in ("PROD", "CONS"):
            raise OpError(f"role must be PROD or CONS, got {cfg.get('role')!r}")
        ports = [int(p) for p in cfg["ports"]]
        targets = [str(t) for t in cfg["targets"]]
        if not ports or not all(0 < p < 65536 for p in ports):
            raise OpError(f"ports must be 1-65535, at least one: {cfg['ports']!r}")
        if not targets:
            raise OpError("no targets given")
        for t in targets:
            resolve_target(t)
        if cfg.get("tls") and not (cfg.get("cert_pem") and cfg.get("key_pem")):
            raise OpError("tls needs the session's wan_secret")
        str(cfg["listen_host"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OpError(f"bad session configuration: {exc}") from None
    return {**cfg, "ports": ports, "targets": targets}


def bind_udp_listeners(cfg: dict) -> list[socket.socket]:
    """The session's UDP sockets, one per port, if it carries UDP (``cfg["udp"]``)."""
    if not cfg.get("udp"):
        return []
    if cfg.get("tls") and not cfg.get("udp_key"):
        # never datagrams in the clear beside an encrypted TCP leg: the key comes with wan_secret
        raise OpError("udp beside a TLS WAN leg needs the session's wan_secret (its datagrams are sealed)")
    return bind_listeners(str(cfg["listen_host"]), list(cfg["ports"]), udp=True)


def bind_listeners(host: str, ports: list[int], *, udp: bool = False) -> list[socket.socket]:
    """One socket bound on ``host`` per port: TCP listeners, or (``udp``) UDP sockets with
    big buffers on the same ports; OpError says which port cannot be bound, and none stays open."""
    socks: list[socket.socket] = []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        for port in ports:
            s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            socks.append(s)
            if udp:
                big_buffers(s)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host.strip("[]"), port))
            except OSError as exc:
                raise OpError(f"cannot {'bind UDP' if udp else 'listen on'} {host}:{port}: "
                              f"{exc.strerror or exc}") from None
            if not udp:
                s.listen(4096)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
