"""UDP test support: an echoing UDP application, numbered flows checked datagram by
datagram, and a check that nothing of a session is bound any more.

    async with UdpEcho(port) as app:          # the producer, on the TCP app's port
        await flow_exchange(("127.0.0.1", cons_port), flow=1, count=50)
        assert app.sources[1] == {one address}   # one source per flow at the producer
"""
from __future__ import annotations

import asyncio
import socket
import struct
import time

HEADER = struct.Struct("!IQ")        # flow id, sequence number
#: Seconds a datagram waits for its echo before it is sent again, and how many times.
REPLY_WAIT = 2.0
TRIES = 4


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, owner: "UdpEcho") -> None:
        self.owner = owner

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner.received += 1
        if len(data) >= HEADER.size:
            flow, _ = HEADER.unpack_from(data)
            self.owner.sources.setdefault(flow, set()).add(addr)
        self.transport.sendto(b"echo" + data, addr)


class UdpEcho:
    """A UDP application on 127.0.0.1:``port``: answers each datagram with ``b"echo"`` +
    the datagram, to its source; ``sources``: flow id -> the addresses it came from."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.sources: dict[int, set] = {}
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> "UdpEcho":
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self),
                                                                local_addr=(self.host, self.port))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc) -> None:
        if self.transport is not None:
            self.transport.close()


def datagram(flow: int, seq: int, size: int) -> bytes:
    head = HEADER.pack(flow, seq)
    body = (head * (size // len(head) + 1))[:max(0, size - len(head))]
    return head + body


async def flow_exchange(addr: tuple[str, int], flow: int, count: int, size: int = 1200) -> socket.socket:
    """Send ``count`` numbered datagrams of ``size`` bytes from one socket (one source: one
    flow) to ``addr``, each verified by its echo (same flow, same number, same bytes); a
    datagram without an echo within REPLY_WAIT is sent again, at most TRIES times.
    Returns the socket (closed by the caller) so that more can go on the same flow."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(addr)
    try:
        await flow_more(sock, flow, range(count), size)
    except BaseException:
        sock.close()
        raise
    return sock


async def flow_more(sock: socket.socket, flow: int, seqs, size: int = 1200) -> None:
    loop = asyncio.get_running_loop()
    for seq in seqs:
        want = datagram(flow, seq, size)
        for _ in range(TRIES):
            await loop.sock_sendall(sock, want)
            deadline = time.monotonic() + REPLY_WAIT
            got = None
            while time.monotonic() < deadline:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - time.monotonic())
                except (asyncio.TimeoutError, ConnectionRefusedError):
                    break
                assert data.startswith(b"echo"), f"flow {flow}: not an echo: {data[:20]!r}"
                rflow, rseq = HEADER.unpack_from(data, 4)
                assert rflow == flow, f"flow {flow} got flow {rflow}'s reply"
                if rseq == seq:
                    got = data
                    break
                assert rseq < seq, f"flow {flow}: a reply to {rseq} before {seq} was sent"
            if got is not None:
                assert got[4:] == want
                break
        else:
            raise AssertionError(f"flow {flow}: no echo of datagram {seq} after {TRIES} tries")


def udp_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if UDP ``port`` can be bound on ``host`` (no data server holds it)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


async def scrape(port: int) -> dict[tuple, float]:
    """The Prometheus samples of a control server's /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(r.read(), 10)
    w.close()
    body = raw.partition(b"\r\n\r\n")[2]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def val(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def paced_stream(addr: tuple[str, int], flow: int, count: int, size: int, per_s: float,
                       linger: float = 3.0) -> int:
    """Send ``count`` numbered datagrams to ``addr`` at ``per_s`` a second from one socket
    while reading the echoes; return how many distinct ones came back (each checked),
    waiting at most ``linger`` seconds after the last send for the rest."""
    loop = asyncio.get_running_loop()
    got: set[int] = set()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    sock.connect(addr)
    done = asyncio.Event()

    async def reader() -> None:
        while len(got) < count:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionRefusedError:
                continue
            rflow, rseq = HEADER.unpack_from(data, 4)
            assert rflow == flow and data[4:] == datagram(flow, rseq, size)
            got.add(rseq)
        done.set()

    task = loop.create_task(reader())
    try:
        start = time.monotonic()
        for seq in range(count):
            await loop.sock_sendall(sock, datagram(flow, seq, size))
            if seq % 10 == 9:
                await asyncio.sleep(max(0.0, start + (seq + 1) / per_s - time.monotonic()))
        try:
            await asyncio.wait_for(done.wait(), linger)
        except asyncio.TimeoutError:
            pass
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
    return len(got)
