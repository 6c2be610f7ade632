"""UDP on a session's ports in the built-in data server: listeners, flows, counters.

Each port of a session has a UDP socket beside its TCP listener (``UdpRelay``: one per
session in a worker, on the worker's own ``engine.loop.Loop``). A datagram from a source
the listener has not seen opens a *flow*: a socket of its own, connected to the
listener's target, so the next hop sees one source per flow and its replies, read from
that socket, go back to the flow's source through the listener. The side that sends
first opens the flow, as TCP's connecting side does.

Flows are bounded per session (``max_flows``: a datagram that would open one more is
dropped and counted) and end after ``idle`` seconds without a datagram either way (their
socket closed). ``close()`` closes every socket: the listeners and the flows.

The leg that crosses the WAN is sealed when the session has a WAN secret
(``engine.udpseal``): on PROD the listener faces the WAN (datagrams are opened as they
arrive and sealed as they go back), on CONS each flow's socket does (sealed towards the
PROD gateway, opened as replies arrive). A datagram that does not open is dropped and
counted by cause, never delivered; a flow on PROD is opened only by a datagram that opens.

Where the compiled pumps are chosen (``engine.compiled``; not ``SCISTREAM_PUMPS=python``),
a readiness event is one call of the compiled module (``_pump.udp_pass``): one
``recvmmsg`` of up to 64 datagrams, each opened or sealed there (AES-256-GCM through
libcrypto, udpseal's bytes, keys and replay rules: its ``UdpDir`` is the sealer's
``Direction``), the rate paid, and the sends in runs (UDP GSO, else ``sendmmsg``). What
it cannot finish (a source without a flow, another flow id, a new epoch, a rekey due) it
gives back, in order, to the Python path below, which is also the whole path elsewhere.

Direction names as the TCP counters: ``in`` is towards the producer (what the listener
receives), ``out`` towards the consumer. The session's rate buckets (the TCP
connections' too) police both: a datagram the bucket cannot pay for now is dropped and
counted (``drops_rate``); UDP is not queued.

    relay = UdpRelay(loop, [(0, sock)], targets, sid="u1/PROD", buckets={"in": None, "out": None},
                     max_flows=256, idle=60.0, sealer=None, wan_side="listener")
    relay.counters()     # {"datagrams_in": ..., "flows": ..., "drops_rate": ...}
    relay.close()
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import time
from typing import Any, Callable

from .loop import EPOLLIN, Loop, Timer, TokenBucket

log = logging.getLogger(__name__)

#: Every UDP counter of a session (summed over its workers; ``flows`` is open now).
COUNTERS = ("datagrams_in", "datagrams_out", "bytes_in", "bytes_out", "flows", "total_flows",
            "flows_expired", "drops_flow_limit", "drops_rate", "drops_send", "drops_forged",
            "drops_replayed", "drops_truncated", "drops_foreign", "drops_kernel", "over_mtu")
#: Datagrams read per readiness event before the other sockets get their turn.
BATCH = 64
MAX_DATAGRAM = 65535


def zero_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


#: The receive and send buffers asked for each UDP socket of a session (the kernel caps
#: them at net.core.rmem_max / wmem_max): a burst waits there rather than being dropped
#: while the worker serves other sockets; memory is taken only as datagrams queue.
SOCKET_BUFFER = 4 << 20


def big_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


#: /proc/net/udp{,6} read at most this often (seconds): one read serves every session's
#: counters of a stats request.
DROPS_FRESH = 0.5
_drops: tuple[float, dict[int, int]] = (0.0, {})


def kernel_drops(socks: list[socket.socket]) -> int:
    """Datagrams the kernel dropped on these sockets (their receive buffer was full), from
    /proc/net/udp{,6} (the ``drops`` column, by socket inode; read at most every DROPS_FRESH s)."""
    global _drops
    now = time.monotonic()
    if now - _drops[0] >= DROPS_FRESH:
        _drops = (now, {})
        for path in ("/proc/net/udp", "/proc/net/udp6"):
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) >= 13:
                        _drops[1][int(fields[9])] = int(fields[12])
    table = _drops[1]
    total = 0
    for s in socks:
        with contextlib.suppress(OSError):
            total += table.get(os.fstat(s.fileno()).st_ino, 0)
    return total


def try_pay(bucket: TokenBucket | None, n: int) -> bool:
    """Take ``n`` bytes from the session's bucket now, or False (the datagram is dropped).
    A datagram larger than the burst passes once the bucket is full (the debt is paid by
    the time that follows), so no size is refused for ever."""
    if bucket is None:
        return True
    bucket._refill()
    if bucket.tokens >= min(n, bucket.burst):
        bucket.tokens -= n
        return True
    return False


class Flow:
    __slots__ = ("key", "listener", "source", "sock", "fd", "sa", "last", "state", "mtu")

    def __init__(self, key: tuple, listener: int, source: Any, sock: socket.socket) -> None:
        self.key = key
        self.listener = listener
        self.source = source
        self.sock = sock
        self.fd = sock.fileno()
        self.sa = b""                # the source's sockaddr (the compiled path's key and reply address)
        self.last = time.monotonic()
        self.state: Any = None       # the sealer's per-flow state (keys, counters, replay window)
        self.mtu = 0                 # the path MTU of the flow's socket (sealed flows), 0: unknown


#: UDP generic segmentation offload: a run of datagrams of one size to one destination
#: leaves in one system call (the kernel cuts it into the datagrams), at most GSO_SEGMENTS
#: of them and GSO_BYTES in all. SCISTREAM_UDP_GSO=0 turns it off.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_SEGMENTS = 64
GSO_BYTES = 60000
GSO = os.environ.get("SCISTREAM_UDP_GSO", "1").strip() != "0"
#: UDP generic receive offload on the compiled path's sockets (``UdpRelay._gro``);
#: SCISTREAM_UDP_GRO=0 turns it off.
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GRO = os.environ.get("SCISTREAM_UDP_GRO", "1").strip() != "0"


class Run:
    """Datagrams read in one readiness event, on their way out: consecutive ones of one
    size to one destination are sent together (``flush``), with UDP GSO where the kernel
    takes it, else one by one; counted as they leave (``direction`` in or out, the bytes
    before sealing)."""
    __slots__ = ("relay", "direction", "sock", "addr", "parts", "plains", "size")

    def __init__(self, relay: "UdpRelay", direction: str) -> None:
        self.relay = relay
        self.direction = direction
        self.sock: socket.socket | None = None
        self.addr: Any = None
        self.parts: list[bytes] = []
        self.plains: list[int] = []
        self.size = 0

    def add(self, sock: socket.socket, addr: Any, out: bytes, plain: int) -> None:
        parts = self.parts
        if parts and (sock is not self.sock or addr != self.addr or len(out) > self.size or not self.size
                      or len(parts) >= GSO_SEGMENTS or (len(parts) + 1) * self.size > GSO_BYTES
                      or len(parts[-1]) < self.size):
            self.flush()
        if not parts:
            self.sock, self.addr, self.size = sock, addr, len(out)
        parts.append(out)
        self.plains.append(plain)

    def flush(self) -> None:
        parts, plains = self.parts, self.plains
        if not parts:
            return
        relay, c, sock = self.relay, self.relay.c, self.sock
        assert sock is not None
        to = () if self.addr is None else (self.addr,)    # none: the socket is connected
        sent, nbytes = 0, 0
        if len(parts) > 1 and relay.gso:
            cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", self.size))]
            try:
                sock.sendmsg([b"".join(parts)], cmsg, 0, *to)
                sent, nbytes = len(parts), sum(plains)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    relay.gso = False       # not here (a datagram over the MTU, an old kernel): one by one
                    log.info("session %s: UDP GSO refused (%s); sending datagrams one by one", relay.sid, exc)
                else:
                    c["drops_send"] += len(parts)
                    parts.clear()
        if not sent:
            for out, plain in zip(parts, plains):
                try:
                    sock.sendmsg([out], (), 0, *to)
                except OSError:
                    c["drops_send"] += 1
                    continue
                sent += 1
                nbytes += plain
        c[f"datagrams_{self.direction}"] += sent
        c[f"bytes_{self.direction}"] += nbytes
        parts.clear()
        plains.clear()


class UdpRelay:
    """The UDP of one session in one worker: its listeners and their flows."""

    def __init__(self, loop: Loop, listeners: list[tuple[int, socket.socket]], targets: Callable[[], list],
                 *, sid: str, buckets: dict[str, TokenBucket | None], max_flows: int = 0, idle: float = 60.0,
                 sealer: Any = None, wan_side: str = "listener", compiled: bool | None = None) -> None:
        self.loop = loop
        self.sid = sid
        self.listeners = dict(listeners)
        self.targets = targets          # () -> [(family, sockaddr)], the session's current targets
        self.buckets = buckets
        self.max_flows = max_flows
        self.idle = idle
        self.sealer = sealer            # engine.udpseal.Sealer, or None: a plain WAN leg
        self.wan_side = wan_side        # "listener" (PROD) or "flow" (CONS): which side is sealed
        self.flows: dict[tuple, Flow] = {}
        self.c = zero_counters()
        self.gso = GSO                  # UDP GSO on the sends (off once the kernel refuses it)
        # the compiled batches (engine.compiled: where the compiled pumps are chosen, and the
        # sealer, if any, uses the compiled AEAD), else the Python path; ``compiled`` True or
        # False (tests): the compiled module where built, or the Python path, whatever was chosen
        from . import compiled as _compiled
        mod = _compiled.pump if compiled is None else _compiled.module if compiled else None
        self.compiled: Any = mod if mod is not None and (sealer is None or getattr(sealer, "fast", False)) else None
        self.given_back = 0             # datagrams the compiled path gave back to the Python path
        self.by_sa: dict[int, dict[bytes, Flow]] = {}   # the compiled path's flows: by listener, source sockaddr
        self._sweep: Timer | None = None
        for index, sock in self.listeners.items():
            sock.setblocking(False)
            self._gro(sock, sealed_side=wan_side == "listener")
            loop.add(sock.fileno(), EPOLLIN, functools.partial(self._from_source, index, sock))

    def _gro(self, sock: socket.socket, *, sealed_side: bool) -> None:
        """UDP GRO on a socket the compiled path reads where its datagrams need no room added
        around them (opened, or plain): the kernel may then hand over a run of datagrams of
        one size in one read (over loopback, a GSO run as it was sent), which the compiled
        path splits. Off elsewhere, and always off for the Python path (it reads one
        datagram a read), also on a listener a successor inherits."""
        on = self.compiled is not None and GRO and (self.sealer is None or sealed_side)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_UDP, UDP_GRO, int(on))

    # -- towards the producer: the listener's datagrams ------------------------
    def _from_source(self, index: int, lsock: socket.socket, _ev: int = 0) -> None:
        if self.compiled:
            self._pass(lsock.fileno(), index, None, "in")
        else:
            self._read(lsock.recvfrom, "in",
                       lambda got, run: self._source_datagram(index, got[1], None, got[0], run))

    def _read(self, recv: Callable[[int], Any], direction: str, handle: Callable[[Any, Run], None]) -> None:
        """The Python path of one readiness event: up to BATCH datagrams, each to ``handle``
        (an OSError of a read is an ICMP error of an earlier datagram: nothing to read, the
        flow stays)."""
        run = Run(self, direction)
        try:
            for _ in range(BATCH):
                try:
                    got = recv(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue
                handle(got, run)
        finally:
            run.flush()

    def _source_datagram(self, index: int, src: Any, sa: bytes | None, data: bytes, run: Run) -> None:
        """One datagram a listener read from ``src`` (``sa``: its sockaddr, as the compiled
        path keys its flows), on its way to the flow's socket."""
        c = self.c
        sealed_here = self.sealer is not None and self.wan_side == "listener"
        flow = self.flows.get((index, src))
        if sealed_here:
            opened = self.sealer.open(flow.state if flow is not None else None, data, c)
            if opened is None:
                return
            state, data = opened
        if flow is None:
            flow = self._open_flow(index, src, sa)
            if flow is None:
                return
            if sealed_here:
                flow.state = state
        self._forward(flow, data, "in", flow.sock, None, run)

    def _forward(self, flow: Flow, data: bytes, direction: str, sock: socket.socket, addr: Any,
                 run: Run) -> None:
        """A datagram of ``flow`` paid for (else dropped), sealed if it goes out on the WAN
        leg, and on its way to ``addr`` (None: where ``sock`` is connected)."""
        if not try_pay(self.buckets.get(direction), len(data)):
            self.c["drops_rate"] += 1
            return
        flow.last = time.monotonic()
        out = data
        if self.sealer is not None and self.wan_side == ("flow" if direction == "in" else "listener"):
            out = self.sealer.seal(flow, data, self.c)
            if out is None:
                return
        run.add(sock, addr, out, len(data))

    def _pass(self, fd: int, index: int, flow: Flow | None, direction: str) -> None:
        """One readiness event of a listener (``flow`` None) or of a flow's socket, through the
        compiled module (``_pump.udp_pass``: one recvmmsg, the AEAD, the sends in runs); the
        datagrams it gives back (a new source, a new epoch, ...) through the Python path."""
        bucket = self.buckets.get(direction)
        tokens, burst = -1.0, 0.0
        if bucket is not None:
            bucket._refill()
            tokens, burst = float(bucket.tokens), float(bucket.burst)
        if flow is None:
            flows, fixed, out_fd = self.by_sa.setdefault(index, {}), None, -1
        else:
            flows, fixed, out_fd = None, flow, self.listeners[flow.listener].fileno()
        sealer = self.sealer
        sealed = self.wan_side == ("listener" if flow is None else "flow")   # the datagrams read are sealed
        mode = 0 if sealer is None else 1 if sealed else 2
        slow, left, self.gso = self.compiled.udp_pass(
            fd, flows, fixed, mode, out_fd, self.c, direction, tokens, burst,
            sealer.tag if sealer is not None else b"", sealer.rekey_after if sealer is not None else 0,
            time.monotonic(), self.gso)
        if bucket is not None:
            bucket.tokens = left
        if slow:
            self.given_back += len(slow)
            run = Run(self, direction)
            try:
                for src, sa, data in slow:
                    if flow is None:
                        self._source_datagram(index, src, sa, data, run)
                    elif flow.key in self.flows:
                        self._target_datagram(flow, data, run)
            finally:
                run.flush()

    def _open_flow(self, index: int, src: Any, sa: bytes | None = None) -> Flow | None:
        c = self.c
        if self.max_flows and len(self.flows) >= self.max_flows:
            c["drops_flow_limit"] += 1
            return None
        targets = self.targets()
        family, addr = targets[index % len(targets)]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            big_buffers(sock)
            self._gro(sock, sealed_side=self.wan_side == "flow")
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            c["drops_send"] += 1
            log.info("session %s: cannot open a UDP flow from %s: %s", self.sid, src, exc)
            return None
        flow = Flow((index, src), index, src, sock)
        if self.compiled:
            flow.sa = sa if sa is not None else sockaddr(self.listeners[index].family, src)
            self.by_sa.setdefault(index, {})[flow.sa] = flow
        if self.sealer is not None:
            if self.wan_side == "flow":
                flow.state = self.sealer.new_flow()
                flow.mtu = path_mtu(sock)
            else:
                flow.mtu = route_mtu(self.listeners[index].family, src)
        self.flows[flow.key] = flow
        self.loop.add(sock.fileno(), EPOLLIN, functools.partial(self._from_target, flow))
        c["total_flows"] += 1
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._sweep_every(), self._expire)
        return flow

    # -- towards the consumer: replies on a flow's socket ----------------------
    def _from_target(self, flow: Flow, _ev: int = 0) -> None:
        if self.compiled and flow.listener in self.listeners:
            self._pass(flow.fd, flow.listener, flow, "out")
        else:
            self._read(flow.sock.recv, "out", lambda data, run: self._target_datagram(flow, data, run))

    def _target_datagram(self, flow: Flow, data: bytes, run: Run) -> None:
        """One reply read on a flow's socket, on its way to the flow's source."""
        c = self.c
        if self.sealer is not None and self.wan_side == "flow":
            opened = self.sealer.open(flow.state, data, c)
            if opened is None:
                return
            data = opened[1]
        lsock = self.listeners.get(flow.listener)
        if lsock is None:
            c["drops_send"] += 1
            return
        self._forward(flow, data, "out", lsock, flow.source, run)

    # -- idle flows -------------------------------------------------------------
    def _sweep_every(self) -> float:
        return max(0.05, min(self.idle / 4, 5.0))

    def _expire(self) -> None:
        self._sweep = None
        cutoff = time.monotonic() - self.idle
        for flow in [f for f in self.flows.values() if f.last <= cutoff]:
            self._close_flow(flow)
            self.c["flows_expired"] += 1
        if self.flows and self.listeners:
            self._sweep = self.loop.call_later(self._sweep_every(), self._expire)

    def _close_flow(self, flow: Flow) -> None:
        self.flows.pop(flow.key, None)
        if flow.sa:
            self.by_sa.get(flow.listener, {}).pop(flow.sa, None)
        if self.sealer is not None:
            self.sealer.forget(flow.state)
        self.loop.remove(flow.sock.fileno())
        flow.sock.close()

    # -- control ------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        # the kernel's drops on the listeners (a full receive buffer), never less than seen before
        seen = kernel_drops(list(self.listeners.values()))
        self.c["drops_kernel"] = max(self.c["drops_kernel"], seen)
        return {**self.c, "flows": len(self.flows)}

    def quiesce(self) -> None:
        """Read the listeners no more (a successor reads them); the flows go on, their
        replies still sent through the listeners."""
        for sock in self.listeners.values():
            self.loop.remove(sock.fileno())

    def close(self) -> dict[str, int]:
        """Close every flow and listener of the session here; the final counters."""
        final = self.counters()
        for flow in list(self.flows.values()):
            self._close_flow(flow)
        self.quiesce()
        for sock in self.listeners.values():
            sock.close()
        self.listeners = {}
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        return {**final, "flows": 0}


def udp_relay(loop: Loop, sid: str, cfg: dict, listeners: list[tuple[int, socket.socket]],
              targets: Callable[[], list], buckets: dict[str, TokenBucket | None]) -> UdpRelay:
    """The UDP of a session's slice in a worker, from its configuration: ``udp_max_flows``,
    ``udp_idle``; sealed on the WAN leg when it has the session's UDP key (``udp_key``)."""
    sealer = None
    if cfg.get("udp_key"):
        from .udpseal import REKEY_AFTER, Sealer
        sealer = Sealer(bytes.fromhex(str(cfg["udp_key"])), role=str(cfg.get("role")),
                        rekey_after=int(cfg.get("udp_rekey_after") or REKEY_AFTER))
    return UdpRelay(loop, listeners, targets, sid=sid, buckets=buckets,
                    max_flows=int(cfg.get("udp_max_flows") or 0), idle=float(cfg.get("udp_idle") or 60.0),
                    sealer=sealer, wan_side="listener" if cfg.get("role") == "PROD" else "flow")


def sockaddr(family: int, addr: Any) -> bytes:
    """The kernel's ``struct sockaddr_in``/``sockaddr_in6`` of a Python address, as recvmmsg
    gives it (the compiled path's key of a flow's source, and where its replies go)."""
    if family == socket.AF_INET6:
        host, port, flowinfo, scope = (tuple(addr) + (0, 0))[:4]
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flowinfo)
                + socket.inet_pton(socket.AF_INET6, host.split("%")[0]) + struct.pack("=I", scope))
    host, port = addr[:2]
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


def route_mtu(family: int, addr: Any) -> int:
    """The path MTU towards ``addr`` (a connected probe socket; nothing is sent), 0 if unknown."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return path_mtu(probe)
    except OSError:
        return 0


def path_mtu(sock: socket.socket) -> int:
    """The path MTU the kernel knows for a connected socket (IP_MTU), 0 if it says none."""
    try:
        if sock.family == socket.AF_INET6:
            return sock.getsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU", 24))
        return sock.getsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU", 14))
    except OSError:
        return 0
