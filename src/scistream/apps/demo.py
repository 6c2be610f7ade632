"""The demo producer and consumer.

The producer serves, on each of its endpoints and to every connection, ``size`` bytes of a
deterministic pattern (a 1 MiB pseudo-random block from a fixed seed, repeated); the
consumer connects to the listeners it is given, reads until end of stream and checks
every byte against the same pattern, so a single flipped, lost or reordered chunk fails.

    endpoints, server = await start_producer("127.0.0.1", n_ports=4, size=1 << 30)
    report = await consume(["127.0.0.1:5100", ...], size=1 << 30)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import socket
import time
from typing import Sequence

from ..addr import format_listener, parse_listener

log = logging.getLogger(__name__)

BLOCK = 1 << 20
SEED = 0x5C157EA4


@functools.cache
def pattern() -> bytes:
    """Two copies of the 1 MiB block, so any slice of up to 1 MiB is contiguous."""
    block = random.Random(SEED).randbytes(BLOCK)
    return block + block


class VerifyError(Exception):
    pass


@dataclasses.dataclass
class StreamReport:
    listener: str
    bytes: int
    seconds: float


@dataclasses.dataclass
class ConsumeReport:
    streams: list[StreamReport]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.streams)

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds else 0.0


class Producer:
    """Listeners that each serve ``size`` pattern bytes per connection."""

    def __init__(self, size: int, connections: int | None = None) -> None:
        self.size = size
        self.remaining = connections  # stop after this many connections were served
        self.done = asyncio.Event()
        self.servers: list[asyncio.Server] = []
        self.endpoints: list[str] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, ports: Sequence[int]) -> list[str]:
        for port in ports:
            srv = await asyncio.start_server(self._serve, host, port)
            self.servers.append(srv)
            self.endpoints.append(format_listener(host, srv.sockets[0].getsockname()[1]))
        return self.endpoints

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            data = memoryview(pattern())
            left = self.size
            while left:
                n = min(BLOCK, left)
                writer.write(data[:n])
                await writer.drain()
                left -= n
            writer.write_eof()
            await reader.read()  # wait for the consumer to finish and close
        except (ConnectionError, OSError) as exc:
            log.warning("producer: connection ended early: %s", exc)
        finally:
            writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining <= 0:
                    self.done.set()

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _connect(listener: str, deadline: float) -> socket.socket:
    host, port = parse_listener(listener)
    loop = asyncio.get_running_loop()
    delay = 0.01
    while True:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
            except BaseException:
                sock.close()
                raise
            return sock
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)


async def consume_one(listener: str, size: int, *, connect_timeout: float = 60.0) -> StreamReport:
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            return await _consume_once(listener, size, deadline)
        except _NotThroughYet:
            # A proxy of the chain accepted but could not reach its next hop yet (a data
            # server of the original tooling starts listening a moment after its update is
            # answered) and reset the connection before the first byte: no byte of the
            # stream was taken, so connect again, until the deadline.
            await asyncio.sleep(0.05)


class _NotThroughYet(Exception):
    pass


async def _consume_once(listener: str, size: int, deadline: float) -> StreamReport:
    loop = asyncio.get_running_loop()
    sock = await _connect(listener, deadline)
    start = time.monotonic()
    got = 0
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        expect = memoryview(pattern())
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            try:
                n = await loop.sock_recv_into(sock, view)
            except ConnectionResetError:
                if got == 0 and time.monotonic() < deadline:
                    raise _NotThroughYet() from None
                raise
            if not n:
                break
            if got + n > size:
                raise VerifyError(f"{listener}: more than the {size} bytes expected")
            off = got % BLOCK
            if view[:n] != expect[off:off + n]:
                raise VerifyError(f"{listener}: wrong bytes at offset {got}")
            got += n
        if got != size:
            raise VerifyError(f"{listener}: stream ended after {got} of {size} bytes")
        return StreamReport(listener, got, time.monotonic() - start)
    finally:
        sock.close()


async def consume(listeners: Sequence[str], size: int, *, connect_timeout: float = 60.0) -> ConsumeReport:
    start = time.monotonic()
    streams = await asyncio.gather(*(consume_one(l, size, connect_timeout=connect_timeout) for l in listeners))
    return ConsumeReport(list(streams), time.monotonic() - start)
