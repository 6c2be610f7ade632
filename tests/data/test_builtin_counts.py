"""A Builtin session's byte counters against what the applications got, when a stream ends
with a reset while bytes are in flight (as iperf3's data streams end) and when it ends
normally: PROD and CONS in a node service started as s2cs starts it, the compiled pumps
and the Python ones, the TLS WAN leg and the plain one.

* ``normal``: the consumer sends ``SIZE`` bytes and closes; the producer reads to the end.
  Both gateways count exactly ``SIZE`` toward the producer.
* ``consumer-reset``: the producer reads nothing until the consumer has sent ``SIZE`` bytes
  (they queue up in the sockets on the way) and closed with a reset (SO_LINGER 0); then it
  reads what still comes. A gateway counts what it wrote toward the producer before the
  reset reached it: never fewer bytes than the producer got, never more than were sent.
* ``producer-reset``: the producer reads ``SIZE // 2`` bytes and resets; the consumer
  keeps sending. Each gateway counts at least what the producer read (what was written
  into the reset socket and never read counts too: it was moved).
* the other way (as ``iperf3 -R``): the producer sends, the consumer reads ``SIZE // 2``
  bytes and resets; the counts towards the consumer, likewise.

Every received byte is checked (``Pattern``: numbered 1 MiB blocks).
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading

import pytest
from builtin_support import BLOCK, Pattern, data_servers, entry
from conftest import async_wait_until

SIZE = 48 << 20
LINGER_RESET = struct.pack("ii", 1, 0)
#: ``consumer-reset``: the chain is full when the consumer's socket takes nothing for this
#: long (if it was only slow, the test still holds; it then resets with less queued)
STALL = 1.0
MAX_QUEUED = 256 << 20


@pytest.fixture(params=[pytest.param("c", marks=pytest.mark.compiled), "python"])
def pumps(request, monkeypatch):
    """The node service and its workers read SCISTREAM_PUMPS at start."""
    monkeypatch.setenv("SCISTREAM_PUMPS", request.param)
    return request.param


class Producer:
    """Accepts one connection; reads (and checks) what comes, as ``end`` says."""

    def __init__(self, pattern: Pattern, end: str) -> None:
        self.pattern, self.end = pattern, end
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.start_reading = threading.Event()
        self.received = -1
        self.intact = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.sock.settimeout(60)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(60)
            if self.end == "reverse":     # sends until the consumer's reset comes back
                self.received, self.intact = 0, True
                with contextlib.suppress(OSError):
                    self.pattern.send(conn, SIZE)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)
                return
            if self.end == "consumer-reset":
                self.start_reading.wait(60)
            limit = SIZE // 2 if self.end == "producer-reset" else None
            self.received, self.intact = self.pattern.recv_check(conn, limit=limit, quiet=True)
            if self.end == "producer-reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(60)


def consume(host: str, port: int, pattern: Pattern, end: str) -> int:
    """Send pattern and close; the bytes the socket took. ``normal``: ``SIZE`` bytes, then
    an EOF; ``producer-reset``: up to ``SIZE``, until the producer's reset comes back;
    ``consumer-reset``: (the producer does not read yet) until the chain is full, i.e. the
    socket took nothing for ``STALL`` seconds, then a reset (SO_LINGER 0)."""
    sent = 0
    with socket.create_connection((host, port), 10) as s:
        body = bytearray(pattern.body)
        if end == "consumer-reset":
            s.setblocking(False)
            for i in range(MAX_QUEUED // BLOCK):
                body[:8] = i.to_bytes(8, "big")
                view = memoryview(body)
                while view and select.select([], [s], [], STALL)[1]:
                    view = view[s.send(view):]
                sent += BLOCK - len(view)
                if view:
                    break
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return sent
        s.settimeout(60)
        try:
            for i in range(SIZE // BLOCK):
                body[:8] = i.to_bytes(8, "big")
                s.sendall(body)
                sent += BLOCK
        except OSError:          # the producer's reset came back this way
            assert end == "producer-reset"
            return sent
        if end == "normal":
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
    return sent


async def _when_closed(prod, cons):
    """Both gateways' counters once neither has the connection open any more."""
    async def closed() -> bool:
        a, b = await prod.stats(), await cons.stats()
        return a.connections == b.connections == 0
    await async_wait_until(closed, timeout=30, what="both gateways to close the connection")
    return await prod.stats(), await cons.stats()


@pytest.mark.parametrize("end", ["normal", "consumer-reset", "producer-reset"])
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_counters_match_what_the_producer_got(tmp_path, pumps, tls, end):
    pattern = Pattern()
    producer = Producer(pattern, end)
    try:
        async with data_servers(tmp_path, workers=1) as ds:
            prod, cons = await ds.chain(producer.target, tls=tls)
            sent = await asyncio.wait_for(asyncio.to_thread(consume, *entry(cons), pattern, end), 90)
            producer.start_reading.set()
            await asyncio.to_thread(producer.thread.join, 60)
            assert not producer.thread.is_alive()
            p, c = await _when_closed(prod, cons)
    finally:
        producer.close()
    got = producer.received
    print(f"{pumps} {'tls' if tls else 'plain'} {end}: sent {sent}, producer got {got}, "
          f"CONS counted {c.bytes_in}, PROD counted {p.bytes_in}")
    assert producer.intact and got > 0
    if end == "normal":
        assert sent == got == SIZE
        assert c.bytes_in == p.bytes_in == SIZE
    else:
        assert got <= p.bytes_in <= c.bytes_in <= sent, (got, p.bytes_in, c.bytes_in, sent)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_counters_towards_the_consumer_at_its_reset(tmp_path, pumps, tls):
    pattern = Pattern()
    producer = Producer(pattern, "reverse")

    def read_half_and_reset(host: str, port: int) -> tuple[int, bool]:
        with socket.create_connection((host, port), 10) as s:
            s.settimeout(60)
            got = pattern.recv_check(s, limit=SIZE // 2)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        return got
    try:
        async with data_servers(tmp_path, workers=1) as ds:
            prod, cons = await ds.chain(producer.target, tls=tls)
            got, intact = await asyncio.wait_for(asyncio.to_thread(read_half_and_reset, *entry(cons)), 90)
            await asyncio.to_thread(producer.thread.join, 60)
            assert not producer.thread.is_alive()
            p, c = await _when_closed(prod, cons)
    finally:
        producer.close()
    print(f"{pumps} {'tls' if tls else 'plain'} reverse: consumer got {got}, "
          f"CONS counted {c.bytes_out}, PROD counted {p.bytes_out}")
    assert intact and got == SIZE // 2
    assert got <= c.bytes_out <= p.bytes_out <= SIZE, (got, c.bytes_out, p.bytes_out)
