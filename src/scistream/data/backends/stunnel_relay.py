"""The relay between stunnel and the applications: an application's end of stream reaches
stunnel only once stunnel has read every byte sent before it.

Why: stunnel (5.68, the same code up to 5.75) drops what the kernel still holds for it
on a plain socket when that socket hangs up while its buffer towards TLS is full (once it
has passed the far side's end on, the near side's FIN closes the socket both ways, and
``poll()`` reports a hang-up, which it takes for the end of reading). So stunnel's plain
sides are Unix stream sockets to this relay, never the applications' TCP connections,
and the relay holds an application's FIN until the Unix socket towards stunnel has
nothing left in it (``SIOCOUTQ`` 0: on a Unix stream socket, the bytes the receiver has
not read yet). When stunnel sees the hang-up then, there is nothing left to drop. The
other direction (stunnel -> application) needs nothing: stunnel ends it only once it has
written everything, and the relay reads to the end.

This is the process the control server supervises for a stunnel session: it binds its
listeners, starts stunnel (``-- ARGV``) in its own process group, forwards SIGHUP (after
reloading its routes: an update changes the producer's targets) and ends with stunnel
(stunnel's exit status) or on SIGTERM (stunnel too). Each connection is two threads moving
bytes with ``splice`` through a pipe, as stunnel itself runs a thread per connection.

Config (JSON, ``CONFIG``), one route per session port::

    {"routes": [{"listen": ["tcp", "127.0.0.1", 5100], "connect": ["unix", "/tmp/..-s0.sock"]}],
     "keepalive": [60, 15, 4]}        # TCP keepalive of the application sockets (0: system)

    python -I -S .../stunnel_relay.py relay.json -- stunnel stunnel.conf

Its log lines (stdout, the session's stunnel log) start with ``relay:``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
#: Connecting to stunnel's Unix listener: how long a missing or refusing one is retried
#: (stunnel re-binds its listeners at a reload).
UNIX_RETRY_S = 5.0
CONNECT_TIMEOUT_S = 15.0
#: The longest pause between two looks at what stunnel has not read yet.
HOLD_POLL_MAX_S = 0.05
_LINGER_RESET = struct.pack("ii", 1, 0)


def say(text: str) -> None:
    sys.stdout.write(f"relay: {text}\n")
    sys.stdout.flush()


def _name(addr: list) -> str:
    return addr[1] if addr[0] == "unix" else f"{addr[1]}:{addr[2]}"


def listen(addr: list) -> socket.socket:
    if addr[0] == "unix":
        path = addr[1]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)       # a stale one (a killed relay); the path is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
    else:
        family, _, _, _, where = socket.getaddrinfo(addr[1], addr[2], type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def connect(addr: list) -> socket.socket:
    if addr[0] == "tcp":
        sock = socket.create_connection((addr[1], addr[2]), timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(None)
        return sock
    deadline = time.monotonic() + UNIX_RETRY_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(addr[1])
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


def tune(sock: socket.socket, keepalive: list[int]) -> None:
    """An application's TCP socket: as stunnel's own (no delay, keepalive with our timings)."""
    if sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if keepalive and keepalive[0]:
        for opt, value in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT), keepalive):
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def unread(sock: socket.socket) -> int:
    """Bytes written to a Unix stream socket that its peer has not read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def hung_up(sock: socket.socket) -> bool:
    """Whether a Unix socket's peer has closed it (not only ended its side)."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return bool(poller.poll(0))


def hold_until_read(sock: socket.socket) -> int:
    """Wait until the peer of Unix socket ``sock`` has read everything written to it, or
    has closed; return what it left unread (0: everything read)."""
    delay = 0.0005
    while (left := unread(sock)) > 0:
        if hung_up(sock):          # the peer closed: nothing more will be read
            return unread(sock)
        time.sleep(delay)
        delay = min(delay * 2, HOLD_POLL_MAX_S)
    return left


class Stream:
    """One application connection joined to one stunnel connection."""

    def __init__(self, route: int, a: socket.socket, b: socket.socket) -> None:
        self.route, self.a, self.b = route, a, b
        self.failed = False
        self.ended_to_stunnel = False   # the application's end passed on to stunnel
        self.lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Move src -> dst until src's end, then pass the end on (held while stunnel has
        not read all of it, when dst is stunnel's Unix socket)."""
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            while n := os.splice(src.fileno(), w, CHUNK, flags=os.SPLICE_F_MOVE):
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
            if self.failed:
                return
            if dst.family == socket.AF_UNIX:
                if left := hold_until_read(dst):
                    say(f"route {self.route}: stunnel closed the stream with {left} byte(s) unread (cut)")
                self.ended_to_stunnel = True
            elif not self.ended_to_stunnel and hung_up(src):
                # stunnel closed the stream outright (it failed or gave up), not just its
                # side of it: the application's side is reset, not ended
                raise ConnectionAbortedError("stunnel closed the stream before the application ended its side")
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.fail(exc)
        finally:
            os.close(r)
            os.close(w)

    def fail(self, exc: OSError) -> None:
        """Either side failed: reset the application's side, wake the other direction."""
        with self.lock:
            if self.failed:
                return
            self.failed = True
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED):
            say(f"route {self.route}: {exc}")
        for sock in (self.a, self.b):
            with contextlib.suppress(OSError):
                if sock.family == socket.AF_UNIX:
                    sock.shutdown(socket.SHUT_RDWR)
                else:   # no FIN: the reset goes out when the stream closes its sockets
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RD)

    def run(self) -> None:
        other = threading.Thread(target=self.pump, args=(self.b, self.a), daemon=True)
        other.start()
        try:
            self.pump(self.a, self.b)
            other.join()
        finally:
            self.a.close()
            self.b.close()


class Relay:
    def __init__(self, config_path: str, argv: list[str]) -> None:
        self.config_path, self.argv = config_path, argv
        self.config = self._read()
        self.listeners: list[socket.socket] = []
        self.child: subprocess.Popen | None = None
        self.signals: list[int] = []

    def _read(self) -> dict:
        with open(self.config_path) as f:
            return json.load(f)

    def accept(self, index: int) -> None:
        try:
            sock, _ = self.listeners[index].accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(True)
        threading.Thread(target=self.serve, args=(index, sock), daemon=True).start()

    def serve(self, index: int, accepted: socket.socket) -> None:
        route = self.config["routes"][index]
        try:
            outgoing = connect(route["connect"])
        except OSError as exc:
            say(f"route {index}: cannot connect to {_name(route['connect'])}: {exc}")
            accepted.close()
            return
        with contextlib.suppress(OSError):
            for sock in (accepted, outgoing):
                tune(sock, self.config.get("keepalive") or [])
        Stream(index, accepted, outgoing).run()

    def reload(self) -> None:
        try:
            config = self._read()
            if len(config["routes"]) != len(self.config["routes"]):
                raise ValueError("the number of routes changed")
        except (OSError, ValueError, KeyError) as exc:
            say(f"reload failed: {exc}")
        else:
            self.config = config   # new connections take the new routes
            say(f"routes reloaded: {', '.join(_name(r['connect']) for r in config['routes'])}")
        if self.child is not None:
            self.child.send_signal(signal.SIGHUP)

    def run(self) -> int:
        for route in self.config["routes"]:
            try:
                self.listeners.append(listen(route["listen"]))
            except OSError as exc:
                say(f"cannot listen on {_name(route['listen'])}: {exc}")
                return 1
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, lambda n, _frame: self.signals.append(n))
        try:
            self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        except OSError as exc:
            say(f"cannot start {self.argv[0]}: {exc}")
            return 1
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, -1)
        for i, sock in enumerate(self.listeners):
            sel.register(sock, selectors.EVENT_READ, i)
        say(f"listening, {self.argv[0]} pid {self.child.pid}")
        while True:
            for key, _ in sel.select():
                if key.data == -1:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            wake_r.recv(4096)
                else:
                    self.accept(key.data)
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    return self.stop()
            if (code := self.child.poll()) is not None:
                say(f"{self.argv[0]} exited ({code})")
                return code if code >= 0 else 128 - code

    def stop(self) -> int:
        assert self.child is not None
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(5)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        return 0

    def cleanup(self) -> None:
        for route, sock in zip(self.config["routes"], self.listeners):
            sock.close()
            if route["listen"][0] == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(route["listen"][1])


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: python stunnel_relay.py CONFIG -- ARGV...\n")
        return 2
    relay = Relay(args[0], args[2:])
    try:
        return relay.run()
    finally:
        relay.cleanup()
        if relay.child is not None and relay.child.poll() is None:
            relay.stop()


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main(sys.argv[1:]))   # the connection threads end with the process
