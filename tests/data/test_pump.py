"""The compiled pumps (``scistream.data.engine._pump``) on their own: the plain copy against a
destination that stops reading, and the TLS engine's refusals of what it cannot take
over. (Both carry real sessions in test_builtin_tls.py and test_node_service.py.)"""
from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time

import pytest

from scistream.data import wankeys
from scistream.data.engine import compiled, tlsleg
from scistream.data.engine.compiled import pump   # built by scripts/setup (gcc, libssl-dev, python3-dev)

pytestmark = pytest.mark.compiled


def _pair(buf: int = 64 * 1024) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)
    return a, b


def test_copier_keeps_what_a_full_destination_did_not_take_and_loses_nothing():
    src_w, src_r = _pair(4 << 20)     # the source has plenty, the destination takes little
    dst_w, dst_r = _pair(32 << 10)
    data = os.urandom(5 * 1024 * 1024 + 12345)
    src_w.setblocking(True)
    writer = threading.Thread(target=lambda: (src_w.sendall(data), src_w.shutdown(socket.SHUT_WR)), daemon=True)
    writer.start()
    cp = pump.Copier()
    got = bytearray()
    moved = 0
    saw_kept = False
    eof = False
    deadline = time.monotonic() + 60
    while not (eof and not cp.unsent):
        assert time.monotonic() < deadline, "the copy did not finish"
        # readable/writable as an edge-triggered loop would know them: try both each turn
        n, flags = cp.copy(src_r.fileno(), dst_w.fileno(), not eof, True)
        moved += n
        if flags & pump.F_EOF:
            eof = True
        if flags & pump.F_DST_AGAIN and cp.unsent:
            saw_kept = True
        # the destination's reader only drains once the copier is stuck on it
        if flags & pump.F_DST_AGAIN or eof:
            while True:
                try:
                    chunk = dst_r.recv(1 << 20)
                except BlockingIOError:
                    break
                got += chunk
                if len(chunk) < (1 << 20):
                    break
        if flags & pump.F_SRC_AGAIN and not (flags & pump.F_DST_AGAIN):
            select.select([src_r], [], [], 10)   # until the writer put more in
    writer.join(10)
    dst_w.close()
    dst_r.setblocking(True)
    while chunk := dst_r.recv(1 << 20):
        got += chunk
    assert saw_kept, "the destination never pushed back: the test did not test the kept bytes"
    assert moved == len(data)
    assert bytes(got) == data
    for s in (src_w, src_r, dst_r):
        s.close()


def test_copier_reports_a_socket_error():
    src_w, src_r = _pair()
    dst_w, dst_r = _pair()
    src_w.send(b"x" * 1000)
    dst_r.close()                      # nobody at the other end: the send fails (EPIPE)
    with pytest.raises(OSError):
        pump.Copier().copy(src_r.fileno(), dst_w.fileno(), True, True)
    for s in (src_w, src_r, dst_w):
        s.close()


def test_engine_refuses_what_is_not_a_finished_ssl_object(tmp_path):
    files = wankeys.write_credentials(wankeys.new_secret(), "x", tmp_path / "c")
    ctx = wankeys.ssl_context(files, server=False)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=tlsleg.SERVER_NAME)
    with pytest.raises(TypeError):
        pump.Engine(obj, inc, out, b"", b"")                  # the wrapper, not _ssl._SSLSocket
    with pytest.raises(TypeError):
        pump.Engine(obj._sslobj, out, inc, b"", b"")          # BIOs the other way round
    with pytest.raises(ValueError, match="handshake"):
        pump.Engine(obj._sslobj, inc, out, b"", b"")          # no handshake yet
