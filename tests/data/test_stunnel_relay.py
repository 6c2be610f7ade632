"""The relay in front of stunnel (``scistream.data.backends.stunnel_relay``) on its own: a
Unix-socket server stands where stunnel's plain side is, and has already passed the far
side's end on (shut down its write side), which is when stunnel takes a hang-up for the end
of reading. The application's end must not make the socket hang up while bytes before it
are still unread; the relay ends with its child and takes the child down when stopped."""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import fcntl
import struct
import threading
from pathlib import Path

import pytest

from conftest import free_ports, port_is_free, wait_until
from scistream.data.backends import stunnel_relay
from scistream.data.backends.common import short_socket_path

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@contextlib.contextmanager
def relay(tmp_path: Path, routes: list[dict], child: list[str] = SLEEPER):
    conf = tmp_path / "relay.json"
    conf.write_text(json.dumps({"routes": routes, "keepalive": [0, 0, 0]}))
    with open(tmp_path / "relay.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-I", "-S", stunnel_relay.__file__, str(conf), "--", *child],
                                stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until(lambda: "relay: listening" in (tmp_path / "relay.log").read_text() or proc.poll() is not None,
                   10, "the relay to listen")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def unread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def hung_up(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock, select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


def test_an_end_reaches_stunnel_only_after_every_byte_before_it(tmp_path):
    path = str(short_socket_path(tmp_path, "t"))
    stunnel_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stunnel_side.bind(path)
    stunnel_side.listen()
    stunnel_side.settimeout(10)
    (port,) = free_ports(1)
    payload = os.urandom(8 << 20)
    try:
        with relay(tmp_path, [{"listen": ["tcp", "127.0.0.1", port], "connect": ["unix", path]}]):
            app = socket.create_connection(("127.0.0.1", port), timeout=10)
            peer, _ = stunnel_side.accept()
            peer.settimeout(10)
            peer.shutdown(socket.SHUT_WR)        # the far side's end, passed on
            assert app.recv(1) == b""             # ... reaches the application

            def send() -> None:
                app.sendall(payload)
                app.shutdown(socket.SHUT_WR)      # the application's end
            sender = threading.Thread(target=send)
            sender.start()
            got = bytearray()
            held = 0                              # looks at a full queue with no hang-up
            while True:
                if hung_up(peer):
                    # a hang-up only once nothing is left unread, and nothing is lost
                    assert unread(peer) == 0, f"hang-up with {unread(peer)} bytes unread at {len(got)}"
                    assert peer.recv(1 << 16) == b""
                    break
                held += unread(peer) > 0
                chunk = peer.recv(16 << 10)       # a slow reader: small pieces, as stunnel
                if not chunk:
                    break
                got += chunk
            sender.join(10)
            assert bytes(got) == payload
            assert held > 0                       # bytes were waiting while the end was held
            app.close()
            peer.close()
    finally:
        stunnel_side.close()
        os.unlink(path)
    assert port_is_free(port)


def test_the_relay_ends_with_its_child_and_stops_it(tmp_path):
    (port,) = free_ports(1)
    routes = [{"listen": ["tcp", "127.0.0.1", port], "connect": ["tcp", "127.0.0.1", 9]}]
    exits_3 = [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"]
    with relay(tmp_path, routes, child=exits_3) as proc:
        assert proc.wait(15) == 3                 # the child's status
    assert "relay: " in (tmp_path / "relay.log").read_text()
    with relay(tmp_path, routes) as proc:
        child = int((tmp_path / "relay.log").read_text().rsplit(" pid ", 1)[1].split()[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        wait_until(lambda: not os.path.exists(f"/proc/{child}"), 10, "the child to be stopped")
    assert port_is_free(port)


def test_stunnel_closing_a_stream_outright_resets_the_application(tmp_path):
    """stunnel that closes a stream (it failed, or gave up waiting) while the application
    has not ended its side: the application sees a reset, not a clean end of stream."""
    path = str(short_socket_path(tmp_path, "t"))
    stunnel_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stunnel_side.bind(path)
    stunnel_side.listen()
    stunnel_side.settimeout(10)
    (port,) = free_ports(1)
    try:
        with relay(tmp_path, [{"listen": ["tcp", "127.0.0.1", port], "connect": ["unix", path]}]):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as app:
                peer, _ = stunnel_side.accept()
                peer.sendall(b"partial")
                peer.close()
                got = b""
                with pytest.raises(ConnectionResetError):
                    while chunk := app.recv(1 << 16):
                        got += chunk
                assert got in (b"", b"partial")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as app:
                peer, _ = stunnel_side.accept()     # a clean end: stunnel ends its side only
                peer.sendall(b"whole")
                peer.shutdown(socket.SHUT_WR)
                assert app.recv(16) == b"whole" and app.recv(16) == b""
                app.sendall(b"answer")
                app.shutdown(socket.SHUT_WR)
                assert peer.recv(16) == b"answer" and peer.recv(16) == b""
                peer.close()
    finally:
        stunnel_side.close()
        os.unlink(path)
