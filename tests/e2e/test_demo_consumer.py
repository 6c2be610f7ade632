"""The demo consumer (``scistream.apps.demo.consume_one``) against a real TCP server that
resets connections: a chain whose next hop is not listening yet resets the consumer's
connection before the first byte (a data server of the original tooling listens a moment
after its update is answered), and the consumer connects again; a reset after bytes were
taken is the stream's failure, not retried."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from scistream.apps import demo

SIZE = 3 * demo.BLOCK + 12345


async def _server(resets: int, *, reset_after: int = 0):
    """A server on a free loopback port: its first ``resets`` connections get ``reset_after``
    pattern bytes and then a reset (RST); the others get SIZE pattern bytes and a close."""
    seen = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        block = demo.pattern()[:demo.BLOCK]
        if len(seen) <= resets:
            if reset_after:
                writer.write(block[:reset_after])
                await writer.drain()
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                       struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        left = SIZE
        while left:
            n = min(left, demo.BLOCK)
            writer.write(block[:n])
            await writer.drain()
            left -= n
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}", seen


async def test_reset_before_the_first_byte_connects_again():
    srv, listener, seen = await _server(resets=2)
    async with srv:
        report = await demo.consume_one(listener, SIZE, connect_timeout=20)
    assert report.bytes == SIZE        # every byte checked against the pattern on the way
    assert len(seen) == 3


async def test_reset_after_bytes_is_a_failure():
    srv, listener, seen = await _server(resets=1, reset_after=64 << 10)
    async with srv:
        with pytest.raises(ConnectionResetError):
            await demo.consume_one(listener, SIZE, connect_timeout=20)
    assert len(seen) == 1
