"""Framed messages with file descriptors over a Unix stream socket.

The node service (``scistream.data.node``) and its worker processes talk over a socket
pair; listening sockets travel with the messages (``SCM_RIGHTS``), so the service keeps
every listener open while a worker dies and comes back, and hands them to a successor
when it is restarted. A frame is a 4-byte big-endian length and a JSON object; a frame
whose object says ``"nfds": k`` carries ``k`` descriptors, sent in the same ``sendmsg``
as its first byte (the kernel never merges two ``sendmsg`` calls that carry descriptors
into one read, so they arrive no later than the frame's first byte).

    out = encode({"op": "add", "sid": "uid/PROD", "nfds": 2})
    send_frame(sock, out, [l1.fileno(), l2.fileno()])       # blocking
    dec = Decoder(); msgs = dec.feed(sock)                    # non-blocking: [(msg, [fd, ..]), ..]

No asyncio and no grpc here: the workers import this module.
"""
from __future__ import annotations

import array
import collections
import contextlib
import json
import os
import socket
import struct

MAX_FDS = 250                 # per sendmsg (the kernel's SCM_MAX_FD is 253)
MAX_FRAME = 64 << 20          # a connection listing of a busy session is a few MB at most
_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_HEAD = struct.Struct("!I")


class ChannelClosed(ConnectionError):
    """The other end went away."""


def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _HEAD.pack(len(body)) + body


def send_frame(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> int:
    """Send as much of ``data`` as the socket takes now (all of it on a blocking socket),
    the descriptors with the first byte; return the bytes sent."""
    if fds and len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} descriptors per frame, got {len(fds)}")
    n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    if sock.getblocking():
        while n < len(data):
            n += sock.send(data[n:])
    return n


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in the ancillary data of a ``recvmsg`` (SCM_RIGHTS)."""
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def send_note(sock: socket.socket, msg: dict, fd: int) -> None:
    """One datagram on a SOCK_DGRAM socket: a JSON object and one descriptor (a worker hands
    a connection to another worker's inbox this way). Never blocks: OSError (EAGAIN) when
    the receiver's queue is full."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], socket.MSG_DONTWAIT)


def recv_note(sock: socket.socket, size: int = 4096) -> tuple[bytes, list[int]]:
    """One datagram of ``send_note``: its JSON text (not decoded: the caller owns the
    descriptors whatever the text says) and its descriptors. BlockingIOError passes through."""
    data, anc, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(array.array("i").itemsize),
                                            socket.MSG_CMSG_CLOEXEC)
    return data, fds_of(anc)


class Decoder:
    """Turns what a socket delivers into ``(message, descriptors)`` pairs."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: collections.deque[int] = collections.deque()

    def feed(self, sock: socket.socket, size: int = 1 << 18) -> list[tuple[dict, list[int]]]:
        """Read once (the socket may be non-blocking: BlockingIOError passes through);
        ChannelClosed on EOF."""
        data, anc, _flags, _addr = sock.recvmsg(size, _ANC, socket.MSG_CMSG_CLOEXEC)
        self.fds.extend(fds_of(anc))
        if not data:
            raise ChannelClosed("the other end closed the channel")
        self.buf += data
        return self.frames()

    def frames(self) -> list[tuple[dict, list[int]]]:
        out = []
        while len(self.buf) >= 4:
            (n,) = _HEAD.unpack_from(self.buf)
            if n > MAX_FRAME:
                raise ChannelClosed(f"frame of {n} bytes is too large")
            if len(self.buf) < 4 + n:
                break
            msg = json.loads(bytes(self.buf[4:4 + n]))
            del self.buf[:4 + n]
            k = int(msg.get("nfds", 0) or 0)
            if k > len(self.fds):
                raise ChannelClosed(f"frame announces {k} descriptors, {len(self.fds)} arrived")
            out.append((msg, [self.fds.popleft() for _ in range(k)]))
        return out

    def close(self) -> None:
        """Close descriptors that arrived but were never taken."""
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popleft())
