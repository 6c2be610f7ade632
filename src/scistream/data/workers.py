"""The event-loop threads of a built-in data server and the connections each one owns.

A *worker* is one ``evloop.Loop`` in one thread, and owns for life the connections it
starts: no locks on the data path. Worker 0 runs in the main thread, next to the control
socket, and accepts every connection; when it owns two or more open connections more than
the least busy worker, it hands the new one over (through that worker's inbox and wake-up
pipe). So connections that come one at a time stay on one thread (no extra wake-up, warm
caches), and a burst of long ones (iperf3 opening its streams) is shared out. The GIL is
released during the syscalls and the TLS record crypto, which is where a TLS relay spends
its time, so workers overlap on a multi-core gateway. A plain session has one worker (a
splice relay is all syscalls with a sliver of Python between them; a second thread only
fights over the GIL), and so has a rate-limited one (its token buckets live in that loop).

Each worker keeps its own counters and pipe pool; the data server sums the counters.

    worker = Worker(server, 0, server.loop)      # the main thread's loop
    worker.watch(listeners)
    extra = Worker(server, 1, Loop()); extra.start_thread()
"""
from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING

from .evloop import EPOLLIN, Loop, PipePool, TokenBucket
from .relay import Conn, accept_one

if TYPE_CHECKING:
    from .s2ds import S2DS

log = logging.getLogger(__name__)


class Worker:
    """One event loop and its connections; implements ``relay.RelayContext``."""

    def __init__(self, server: "S2DS", index: int, loop: Loop) -> None:
        self.server = server
        self.index = index
        self.loop = loop
        self.pipes = PipePool(server.pipe_size)
        self.buckets: dict[str, TokenBucket | None] = server.buckets
        self.keepalive: tuple[int, int, int] = server.keepalive
        self.server_tls: ssl.SSLContext | None = server.server_tls
        self.client_tls: ssl.SSLContext | None = server.client_tls
        self.bytes = {"in": 0, "out": 0}
        self.total = 0
        self.failed = 0
        self.resumed = 0
        self.sessions_kept = 0
        self.open = 0            # connections owned now
        self.thread: threading.Thread | None = None
        self.listeners: list[tuple[int, socket.socket]] = []
        self.inbox: collections.deque[tuple[int, socket.socket, object]] = collections.deque()
        loop.wake_hooks.append(self._take_inbox)

    # -- RelayContext -----------------------------------------------------
    @property
    def tls_session(self) -> ssl.SSLSession | None:
        return self.server.tls_session

    @tls_session.setter
    def tls_session(self, session: ssl.SSLSession | None) -> None:
        self.server.tls_session = session

    def count(self, direction: str, n: int) -> None:
        self.bytes[direction] += n

    def conn_closed(self, conn: Conn) -> None:
        with self.server.open_lock:
            self.open -= 1
        self.server.conns.pop(conn.id, None)
        if conn.why:
            self.failed += 1
        log.debug("conn %d closed: in %d, out %d bytes%s", conn.id, conn.bytes_in, conn.bytes_out,
                  f" ({conn.why})" if conn.why else "")

    # -- accepting --------------------------------------------------------
    def watch(self, listeners: list[socket.socket]) -> None:
        for i, lsock in enumerate(listeners):
            self.listeners.append((i, lsock))
            self._watch(i, lsock)

    def _watch(self, index: int, lsock: socket.socket) -> None:
        self.loop.add(lsock.fileno(), EPOLLIN, lambda ev: self._accept(index, lsock))

    def _accept(self, index: int, lsock: socket.socket) -> None:
        got = accept_one(self.loop, lsock, f"listener {index}", lambda: self._resume(index, lsock))
        if got is None:
            return
        sock, peer = got
        with self.server.open_lock:    # ``open`` of a worker changes in two threads
            idlest = min(self.server.workers, key=lambda w: w.open)
            if self.open - idlest.open < 2:
                idlest = self          # one lingering connection is no reason to move
            idlest.open += 1           # counted now, so that a burst spreads out
        if idlest is not self:
            idlest.inbox.append((index, sock, peer))
            idlest.loop.wake()
            return
        self._start(index, sock, peer)

    def _take_inbox(self) -> None:
        while self.inbox:
            index, sock, peer = self.inbox.popleft()
            self._start(index, sock, peer)

    def _start(self, index: int, sock: socket.socket, peer: object) -> None:
        server = self.server
        targets = server.targets
        try:
            conn = Conn(self, server.new_id(), index, sock, peer, targets[index % len(targets)])
        except OSError as exc:     # the client is already gone
            log.info("listener %d: dropped a connection from %s: %s", index, peer, exc)
            sock.close()
            with server.open_lock:
                self.open -= 1
            return
        self.total += 1
        server.conns[conn.id] = conn
        conn.start()

    def _resume(self, index: int, lsock: socket.socket) -> None:
        if self.loop.running and lsock.fileno() >= 0:
            self._watch(index, lsock)

    # -- life -------------------------------------------------------------
    def start_thread(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"s2ds-worker-{self.index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException:  # noqa: BLE001 - a dead worker would strand its connections
            log.exception("worker %d failed; stopping the data server", self.index)
            self.server.loop.stop()
        finally:
            self.close()
            self.loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop this worker's thread and wait for it (its connections close in it)."""
        if self.thread is not None:
            self.loop.stop()
            self.thread.join(timeout)

    def close(self) -> None:
        """Close this worker's connections (called in its own thread, or after it ended)."""
        for _, lsock in self.listeners:
            self.loop.forget(lsock.fileno())
        for conn in [c for c in list(self.server.conns.values()) if c.ctx is self]:
            conn.close(reset=True)
        while self.inbox:
            self.inbox.popleft()[1].close()
        self.pipes.close()
