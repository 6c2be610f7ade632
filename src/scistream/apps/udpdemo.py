"""The demo's datagram producer and consumer (``appctrl ... --udp``, ``scistream demo --udp``).

The consumer opens one flow per listener (the side that sends first opens a flow): it
sends a *start* datagram, again every ``START_EVERY`` seconds until data comes. The
producer, on a start from a new source, sends that source ``count`` numbered datagrams
of ``size`` bytes, paced at ``rate_mbps``, then a few *end* datagrams. Each data datagram
carries its number and a body cut from the demo pattern at an offset given by that
number, so the consumer checks every byte of every datagram, and counts the ones lost,
duplicated and arriving out of order::

    magic "SSUD" (4) | kind (1: start, 2: data, 3: end) | count (8) | seq (8) | body

    producer = UdpProducer(count=10_000, size=1200, rate_mbps=50)
    endpoints = await producer.start("127.0.0.1", [5074])
    report = await udp_consume(["127.0.0.1:5100"], count=10_000, size=1200)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import time
from typing import Sequence

from ..addr import format_listener, parse_listener
from .demo import BLOCK, VerifyError, pattern

HEAD = struct.Struct("!4sBQQ")
MAGIC = b"SSUD"
START, DATA, END = 1, 2, 3
START_EVERY = 0.5
#: Seconds the consumer waits without a datagram before it calls the rest lost.
QUIET = 3.0
ENDS = 3


def body(seq: int, n: int) -> bytes:
    off = (seq * 7919) % BLOCK
    return pattern()[off:off + n]


class _Producer(asyncio.DatagramProtocol):
    def __init__(self, owner: "UdpProducer") -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < HEAD.size:
            return
        magic, kind, _, _ = HEAD.unpack_from(data)
        if magic == MAGIC and kind == START and addr not in self.owner.serving:
            assert self.transport is not None
            self.owner.serving.add(addr)
            task = asyncio.get_running_loop().create_task(self.owner.send_flow(self.transport, addr))
            self.owner.tasks.add(task)
            task.add_done_callback(self.owner.tasks.discard)


class UdpProducer:
    """Answers each start from a new source with ``count`` datagrams of ``size`` bytes."""

    def __init__(self, count: int, size: int, rate_mbps: float = 50.0, flows: int | None = None) -> None:
        if size < HEAD.size:
            raise ValueError(f"a datagram is at least {HEAD.size} bytes")
        self.count, self.size, self.rate = count, size, rate_mbps
        self.remaining = flows          # done after this many flows were served (None: never)
        self.done = asyncio.Event()
        self.serving: set = set()
        self.tasks: set[asyncio.Task] = set()
        self.transports: list[asyncio.DatagramTransport] = []
        self.endpoints: list[str] = []

    async def start(self, host: str, ports: Sequence[int]) -> list[str]:
        loop = asyncio.get_running_loop()
        for port in ports:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Producer(self), local_addr=(host, port))
            sock = transport.get_extra_info("socket")
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            self.transports.append(transport)
            self.endpoints.append(format_listener(host, transport.get_extra_info("sockname")[1]))
        return self.endpoints

    async def send_flow(self, transport: asyncio.DatagramTransport, addr) -> None:
        n = self.size - HEAD.size
        per_s = self.rate * 1e6 / 8 / self.size if self.rate > 0 else 0.0
        start = time.monotonic()
        for seq in range(self.count):
            transport.sendto(HEAD.pack(MAGIC, DATA, self.count, seq) + body(seq, n), addr)
            if seq % 16 == 15:
                ahead = (seq + 1) / per_s - (time.monotonic() - start) if per_s else 0.0
                await asyncio.sleep(max(0.0, ahead))       # pacing: the set rate, and let others run
        for _ in range(ENDS):
            transport.sendto(HEAD.pack(MAGIC, END, self.count, self.count), addr)
            await asyncio.sleep(0.01)
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.done.set()

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for tr in self.transports:
            tr.close()


@dataclasses.dataclass
class FlowReport:
    listener: str
    expected: int
    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return self.expected - self.received


def _summed(name: str) -> property:
    """The sum of that field over the report's flows."""
    return property(lambda self: sum(getattr(f, name) for f in self.flows))


@dataclasses.dataclass
class UdpReport:
    flows: list[FlowReport]
    seconds: float
    received = _summed("received")
    lost = _summed("lost")
    reordered = _summed("reordered")
    duplicates = _summed("duplicates")
    bytes = _summed("bytes")

    @property
    def loss(self) -> float:
        total = sum(f.expected for f in self.flows)
        return self.lost / total if total else 0.0


async def consume_flow(listener: str, count: int, size: int, *, connect_timeout: float = 60.0) -> FlowReport:
    """One flow through ``listener``: start it, check every datagram, count what is missing."""
    host, port = parse_listener(listener)
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    report = FlowReport(listener, count)
    seen = bytearray(count)
    top = -1
    n = size - HEAD.size
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setblocking(False)
        sock.connect((host, port))
        start_msg = HEAD.pack(MAGIC, START, count, 0)
        deadline = time.monotonic() + connect_timeout
        began = 0.0
        while True:
            if not began:
                if time.monotonic() > deadline:
                    raise VerifyError(f"{listener}: no datagram came back within {connect_timeout:.0f} s")
                with contextlib.suppress(ConnectionRefusedError):
                    await loop.sock_sendall(sock, start_msg)
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), START_EVERY if not began else QUIET)
            except asyncio.TimeoutError:
                if began:
                    break          # quiet: the rest is lost
                continue
            except ConnectionRefusedError:     # ICMP: the chain is not up yet
                await asyncio.sleep(0.05)
                continue
            if len(data) < HEAD.size:
                raise VerifyError(f"{listener}: a datagram of {len(data)} bytes")
            magic, kind, total, seq = HEAD.unpack_from(data)
            if magic != MAGIC or total != count:
                raise VerifyError(f"{listener}: a datagram not of this demo")
            if not began:
                began = time.monotonic()
            if kind == END:
                break
            if kind != DATA or seq >= count or len(data) != size or data[HEAD.size:] != body(seq, n):
                raise VerifyError(f"{listener}: datagram {seq}: wrong content")
            if seen[seq]:
                report.duplicates += 1
                continue
            seen[seq] = 1
            report.received += 1
            report.bytes += len(data)
            if seq < top:
                report.reordered += 1
            top = max(top, seq)
            if report.received == count:
                break
        report.seconds = time.monotonic() - began if began else 0.0
    return report


async def udp_consume(listeners: Sequence[str], count: int, size: int, *,
                      connect_timeout: float = 60.0) -> UdpReport:
    start = time.monotonic()
    flows = await asyncio.gather(*(consume_flow(x, count, size, connect_timeout=connect_timeout)
                                   for x in listeners))
    return UdpReport(list(flows), time.monotonic() - start)
