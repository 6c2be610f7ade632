"""One forwarded connection of the built-in data server, and its plaintext pumps (splice, copy).

A ``Conn`` joins side ``a`` (the socket a listener accepted) to side ``b`` (the
connection it opened to the listener's target). Bytes from ``a`` to ``b`` travel towards
the producer ("in"), bytes from ``b`` to ``a`` towards the consumer ("out"). Each
direction is a *pump*; the WAN side may be TLS (``tlsleg``), the others are plain.

A plain-to-plain pump moves bytes with ``os.splice`` through a kernel pipe: socket ->
pipe -> socket, never copied to user space (``CopyPump`` copies instead, where that is cheaper: the node
service's ``--plain-relay``, by default on loopback legs). Back-pressure is natural (a full pipe stops
the reads, a full socket buffer stops the writes); a half-close is carried over (EOF on
one side -> ``shutdown(SHUT_WR)`` on the other once the pipe is drained) and the other
direction keeps flowing; the connection closes when both directions are done, or at once
(with a reset) when either side fails.

Life of a ``Conn``: ``handshake`` (TLS server side only) -> ``connecting`` -> (TLS
client handshake) -> ``open`` -> ``closed``. A connection belongs to the loop of one node
worker (``node.worker``) and is only ever touched by it.

    conn = Conn(ctx, cid=1, listener=0, sock=accepted, peer=addr, target=("10.0.0.5", 5000))
    conn.start()      # registers with ctx.loop; from here on the loop drives it
"""
from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Protocol

from .loop import (EV_ALL, EV_HUP, EV_READ, EV_WRITE, SPLICE_FLAGS, Loop, PipePool, Timer, TokenBucket,
                     whole_number_setting)
from ...addr import format_listener
from ..hosttcp import prepare_wan_socket
from .compiled import F_EOF, pump as compiled
from .tlsleg import (CHUNK, CDecryptPump, CEncryptPump, DecryptPump, EncryptPump, Pump, SendKeepingRest,
                     TlsEnd, run_compiled, thread_buffers)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
HANDSHAKE_TIMEOUT = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class LogBudget:
    """At most ``burst`` log lines per ``window`` seconds (all threads together): a flood of
    refused connections (a scan, a peer with the wrong secret in a retry loop) must not
    fill the disk. What is held back is counted, and said in the next window and at exit;
    the counters (``failed_connections``) miss nothing."""

    def __init__(self, burst: int = 20, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.used = 0
        self.held = 0            # held back in the current window
        self.held_total = 0      # since start

    def log(self, level: int, msg: str, *args: Any) -> None:
        """Log ``msg`` if the budget allows it; first say how many lines the window that
        just ended held back."""
        with self.lock:
            now = time.monotonic()
            ended = 0
            if now - self.start >= self.window:
                ended, self.held = self.held, 0
                self.start, self.used = now, 0
            ok = self.used < self.burst
            if ok:
                self.used += 1
            else:
                self.held += 1
                self.held_total += 1
        if ended:
            log.warning("%d more failed connections in the last %g s were not logged one by one",
                        ended, self.window)
        if ok:
            log.log(level, msg, *args)


#: Lines about connections that failed (the one place a remote peer decides how much we log).
FAILURE_LOG = LogBudget()


class RelayContext(Protocol):
    """What a connection needs from its data server."""
    loop: Loop
    keepalive: tuple[int, int, int]      # base.KEEPALIVE; (0, 0, 0) = the system's timings
    wan_side: str                        # the side on the WAN leg: "a" (PROD: accepted) or "b" (CONS: connected)
    wan_congestion: str                  # its congestion control (hosttcp.prepare_wan_socket); "": the kernel's
    pipes: PipePool
    buckets: dict[str, TokenBucket | None]
    server_tls: ssl.SSLContext | None    # accepted side is a TLS server (PROD)
    client_tls: ssl.SSLContext | None    # target side is a TLS client (CONS)
    tls_session: ssl.SSLSession | None   # CONS: a session to resume (from an earlier connection)
    resumed: int                         # TLS handshakes that resumed a session
    sessions_kept: int                   # sessions taken for resumption (CONS)

    def conn_closed(self, conn: "Conn") -> None: ...
    def count(self, direction: str, n: int) -> None: ...


class Side:
    """One socket of a connection and what the loop last told us about it."""
    __slots__ = ("sock", "fd", "readable", "writable", "hup", "shut_wr")

    def __init__(self, sock: socket.socket, ready: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.readable = ready
        self.writable = ready
        self.hup = False        # the peer's FIN (or an error) is queued behind the data
        self.shut_wr = False

    def seen(self, ev: int) -> None:
        """Note what the loop reported for this socket."""
        if ev & EV_READ:
            self.readable = True
            if ev & EV_HUP:
                self.hup = True
        if ev & EV_WRITE:
            self.writable = True


class SplicePump(Pump):
    """src socket -> pipe -> dst socket, in the kernel."""
    __slots__ = ("pipe", "inpipe", "chunk", "slots")

    def __init__(self, conn: "Conn", src: Side, dst: Side, direction: str) -> None:
        super().__init__(conn, src, dst, direction)
        self.pipe = conn.ctx.pipes.get()
        self.inpipe = 0          # bytes in the pipe, not yet spliced out
        self.chunk = conn.ctx.pipes.size
        self.slots = conn.ctx.pipes.slots

    def run(self) -> None:
        src, dst = self.src, self.dst
        rfd, wfd = self.pipe
        splice = os.splice
        while True:
            moved = False
            if self.inpipe and dst.writable:
                try:
                    n = splice(rfd, dst.fd, self.inpipe, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    dst.writable = False
                else:
                    self.inpipe -= n
                    self.conn.counted(self.direction, n)
                    moved = True
            if not self.eof and src.readable and self.inpipe < self.chunk:
                was_empty = not self.inpipe
                want = self.chunk - self.inpipe
                if self.bucket is not None:
                    want = self.bucket.take(want, self.conn.step)
                if want:
                    try:
                        n = splice(src.fd, wfd, want, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                        # An empty pipe cannot be full: the socket has nothing. With bytes
                        # in the pipe it may be the pipe that is full; retry after a drain.
                        if not self.inpipe:
                            src.readable = False
                    if self.bucket is not None:
                        self.bucket.refund(want - max(n, 0))
                    if n == 0:
                        self.eof = True
                        moved = True
                    elif n > 0:
                        self.inpipe += n
                        moved = True
                        # Fewer bytes than the empty pipe has slots: the pipe did not stop
                        # us, the socket ran dry. Skip the EAGAIN probe (new data = new edge).
                        if was_empty and n < want and n < self.slots and not src.hup:
                            src.readable = False
            if self.eof and not self.inpipe and not self.done:
                self.finish()
                return
            if not moved:
                return

    def release(self) -> None:
        if self.pipe is not None:
            self.conn.ctx.pipes.put(self.pipe, empty=self.inpipe == 0)
            self.pipe = None
        super().release()


class CopyPump(SendKeepingRest):
    """src socket -> a scratch buffer -> dst socket (recv/send).

    On loopback this beats splice per CPU second (docs/performance.md):
    spliced pages make the receiving application pay more than the copy saves. The
    scratch buffer is the thread's (``tlsleg.thread_buffers``); only bytes the destination
    did not take are kept, per pump."""
    __slots__ = ("bufs",)

    def __init__(self, conn: "Conn", src: Side, dst: Side, direction: str) -> None:
        super().__init__(conn, src, dst, direction)
        self.bufs = thread_buffers()

    def run(self) -> None:
        src, dst = self.src, self.dst
        rbuf, rview = self.bufs.rbuf, self.bufs.rview
        while not self.done:
            if self._settle() or not dst.writable or not src.readable:
                return
            n = self._recv(rbuf, CHUNK)
            if n is None or n < 0:
                return
            if n == 0:
                self.eof = True
                continue
            self._send(rview[:n])


class CCopyPump(Pump):
    """``CopyPump`` compiled (``_pump.Copier``): for legs with no rate limit."""
    __slots__ = ("cp",)

    def __init__(self, conn: "Conn", src: Side, dst: Side, direction: str) -> None:
        super().__init__(conn, src, dst, direction)
        self.cp = compiled.Copier()

    def run(self) -> None:
        if self.done:
            return
        src, dst = self.src, self.dst
        fl = run_compiled(self, self.cp.copy, src.fd, dst.fd, src.readable and not self.eof, dst.writable)
        if fl & F_EOF:
            self.eof = True
        if self.eof and not self.cp.unsent:
            self.finish()


def accept_one(loop: Loop, lsock: socket.socket, label: str,
               resume: "Callable[[], None]") -> tuple[socket.socket, Any] | None:
    """One connection from a level-triggered listener (epoll reports it again at once if
    more are waiting, and a final EAGAIN is saved), or None. Out of descriptors or memory,
    the listener would stay readable: it is taken out of the loop and ``resume`` is called
    0.2 s later, while connections wait in the backlog."""
    try:
        return lsock.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.error("cannot accept on %s: %s; pausing it for 0.2 s", label, exc.strerror)
            loop.remove(lsock.fileno())
            loop.call_later(0.2, resume)
        return None            # anything else (ECONNABORTED): that client is gone


def close_with_reset(sock: socket.socket) -> None:
    """Close ``sock`` so that its peer sees a reset, not an EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _is_loopback(addr: Any) -> bool:
    try:
        host = addr[0] if isinstance(addr, tuple) else addr
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except (ValueError, IndexError, TypeError):
        return False


# SO_SNDBUF of both sockets of a plain leg whose two ends are loopback addresses (the
# kernel doubles it): 512 KiB instead of autotuning's up to 4 MiB. Less is queued per
# connection, so less work per byte for everyone on the host: measured on a 2-core
# machine, the CPU per Gbit of a chain, relays and iperf3 ends together, fell by a sixth
# and four streams went from 0.95x to 1.2-1.4x the HAProxy chain (docs/performance.md,
# "Send buffers on loopback legs"). Only where the round trip is microseconds: on a
# network the window must be free to grow. SCISTREAM_LOOPBACK_SNDBUF=0: autotuning.
def _loopback_sndbuf(text: str | None, default: int = 512 << 10) -> int:
    return whole_number_setting("SCISTREAM_LOOPBACK_SNDBUF", text, default, "bytes (0: autotuning)")


LOOPBACK_SNDBUF = _loopback_sndbuf(os.environ.get("SCISTREAM_LOOPBACK_SNDBUF"))


def _tune(sock: socket.socket, keepalive: tuple[int, int, int]) -> None:
    """No Nagle delay; keepalive probes, and the same bound on data left unacknowledged
    (TCP_USER_TIMEOUT: keepalive alone says nothing while we are sending into a dead link)."""
    idle, interval, count = keepalive
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if idle > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + interval * count) * 1000)


class Conn:
    __slots__ = ("ctx", "id", "listener", "peer", "target", "a", "b", "tls", "pumps", "state",
                 "bytes_in", "bytes_out", "started", "timer", "why", "_done", "carried")

    def __init__(self, ctx: RelayContext, cid: int, listener: int, sock: socket.socket,
                 peer: Any, target: tuple[int, Any]) -> None:
        self.ctx = ctx
        self.id = cid
        self.listener = listener
        self.peer = peer
        self.target = target          # (family, sockaddr)
        sock.setblocking(False)
        _tune(sock, ctx.keepalive)
        if getattr(ctx, "wan_side", "") == "a":
            prepare_wan_socket(sock, ctx.wan_congestion)
        self.a = Side(sock, ready=True)
        self.b: Side | None = None
        self.tls: TlsEnd | None = None
        self.pumps: list[Any] = []
        self.state = "new"
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.time()
        self.timer: Timer | None = None
        self.why = ""
        self._done = 0
        self.carried = False    # its events and bytes are the loop's hub's (Loop(carry=True))

    # -- life cycle -------------------------------------------------------
    def start(self) -> None:
        self.ctx.loop.add(self.a.fd, EV_ALL, functools.partial(self._on_event, self.a))
        if self.ctx.server_tls is not None:
            self._handshake(TlsEnd(self.a, self.ctx.server_tls, server_side=True))
        else:
            self._connect()

    def _handshake(self, tls: TlsEnd) -> None:
        self.tls = tls
        self.state = "handshake"
        self._arm(HANDSHAKE_TIMEOUT)
        self.step()

    def _connect(self) -> None:
        family, addr = self.target
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            _tune(sock, self.ctx.keepalive)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            sock.close()
            self.abort(f"cannot connect to target: {exc.strerror or exc}")
            return
        if getattr(self.ctx, "wan_side", "") == "b":   # after connect: a route's congctl is set by it
            prepare_wan_socket(sock, self.ctx.wan_congestion)
        self.b = Side(sock, ready=False)
        self.state = "connecting"
        self._arm(None)
        self.ctx.loop.add(self.b.fd, EV_ALL, functools.partial(self._on_event, self.b))
        # On loopback and LANs the connection is usually up already: skip one wake-up.
        self.b.writable = True
        self.step()
        if self.state == "connecting":
            self._arm(CONNECT_TIMEOUT)

    def _connected(self) -> None:
        """The target connection is up: start the TLS client or the pumps."""
        assert self.b is not None
        if self.ctx.client_tls is not None:
            session = self.ctx.tls_session
            self._handshake(TlsEnd(self.b, self.ctx.client_tls, server_side=False, session=session))
        else:
            self._open()

    def _open(self) -> None:
        assert self.b is not None
        self._arm(None)
        self.state = "open"
        if self.tls is not None and self.tls.obj.session_reused:
            self.ctx.resumed += 1
        a, b = self.a, self.b
        # The compiled pumps, unless a rate limit meters the bytes (its buckets are Python's).
        metered = any(v is not None for v in self.ctx.buckets.values())
        if self.tls is None:
            kind: Any = SplicePump
            # ``plain_relay`` auto copies when both ends are loopback addresses (where copying
            # wins, measured), and splices otherwise (a NIC: splice saves two copies).
            local = _is_loopback(self.peer) and _is_loopback(self.target[1])
            mode = getattr(self.ctx, "plain_relay", "splice")
            if mode == "copy" or (mode == "auto" and local):
                kind = CCopyPump if compiled is not None and not metered else CopyPump
                if LOOPBACK_SNDBUF > 0 and local:
                    for side in (a, b):
                        with contextlib.suppress(OSError):
                            side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOOPBACK_SNDBUF)
            kinds = (kind, kind)
        else:
            fast = not metered and self.tls.compiled() is not None
            dec, enc = (CDecryptPump, CEncryptPump) if fast else (DecryptPump, EncryptPump)
            kinds = (dec, enc) if self.tls.side is a else (enc, dec)   # PROD: the WAN side accepted
        self.pumps = [kinds[0](self, a, b, "in"), kinds[1](self, b, a, "out")]
        self.step()
        self._carry()

    def _arm(self, delay: float | None) -> None:
        """Cancel the pending timeout, and start one of ``delay`` seconds (None: none)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if delay is None else self.ctx.loop.call_later(delay, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        self.abort(f"timed out while {self.state}")

    # -- carried in C -----------------------------------------------------
    def _carry(self) -> None:
        """An open plain connection whose pumps copy goes to the loop's hub (if it has one)
        while both directions flow: from here its events are handled in C, until its end
        (a hang-up, EOF, an error) comes back to ``_on_event``, which takes it back."""
        hub = self.ctx.loop.hub
        if (hub is None or self.state != "open" or not isinstance(self.pumps[0], CCopyPump)
                or any(p.eof or p.done for p in self.pumps)):
            return
        a, b = self.a, self.b
        assert b is not None
        hub.attach(a.fd, b.fd, self.pumps[0].cp, self.pumps[1].cp, a.readable, a.writable, b.readable, b.writable)
        self.carried = True

    def _uncarry(self) -> int:
        """Take the connection back from the hub: its counts and what it knows of the two
        sockets; the errno of a call that failed there (0: none)."""
        self.carried = False
        hub = self.ctx.loop.hub
        assert hub is not None and self.b is not None
        n_in, n_out, ra, wa, rb, wb, err = hub.detach(self.a.fd)
        self._count(n_in, n_out)
        self.a.readable, self.a.writable = bool(ra), bool(wa)
        self.b.readable, self.b.writable = bool(rb), bool(wb)
        return err

    def settle(self) -> None:
        """The bytes the hub moved since the last look, counted."""
        if self.carried:
            hub = self.ctx.loop.hub
            assert hub is not None
            self._count(*hub.take(self.a.fd))

    def _count(self, n_in: int, n_out: int) -> None:
        if n_in:
            self.counted("in", n_in)
        if n_out:
            self.counted("out", n_out)

    def _taken_back(self) -> bool:
        """Before Python handles an event of a carried connection: take it back; False if a
        call failed in the hub (the connection is aborted)."""
        err = self._uncarry()
        if err:
            self.abort(os.strerror(err))
            return False
        return True

    # -- events -----------------------------------------------------------
    def _on_event(self, side: Side, ev: int) -> None:
        if self.carried and not self._taken_back():
            return
        side.seen(ev)
        self.step()

    def step(self) -> None:
        """Move the connection on as far as it goes now (also when a rate budget has tokens again)."""
        if self.carried and not self._taken_back():
            return
        try:
            if self.state == "open":
                for p in self.pumps:
                    p.run()
                    if self.state != "open":
                        return
            elif self.state == "connecting":
                self._check_connect()
            elif self.state == "handshake":
                assert self.tls is not None
                if self.tls.handshake():
                    log.debug("conn %d: TLS up (%s)", self.id, self.tls.obj.cipher())
                    if self.tls.side is self.a:
                        self._connect()
                    else:
                        self._open()
        except ssl.SSLError as exc:
            if self.tls is not None:    # best effort: let the peer see the alert, not a reset
                with contextlib.suppress(OSError):
                    self.tls.flush()
            self.abort(f"TLS: {exc.reason or exc}")
        except OSError as exc:
            self.abort(str(exc.strerror or exc))
        except Exception:  # a bug: lose this connection, not the whole session
            log.exception("conn %d: internal error", self.id)
            self.abort("internal error")

    def _check_connect(self) -> None:
        b = self.b
        assert b is not None
        if not (b.writable or b.readable):
            return
        err = b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.abort(f"cannot connect to target: {os.strerror(err)}")
            return
        try:
            b.sock.getpeername()
        except OSError:  # still in progress: wait for the loop to tell us
            b.writable = b.readable = False
            return
        # b was registered (edge-triggered) before the peer could send: data = an event.
        self._connected()

    def pump_done(self, dst: Side) -> None:
        """A direction saw EOF and delivered everything: pass the EOF on (a half-close),
        or close the connection if the other direction is done too."""
        self._done += 1
        if self._done >= len(self.pumps):
            self.close()
        elif not dst.shut_wr:
            dst.shut_wr = True
            with contextlib.suppress(OSError):
                dst.sock.shutdown(socket.SHUT_WR)

    def counted(self, direction: str, n: int) -> None:
        if direction == "in":
            self.bytes_in += n
        else:
            self.bytes_out += n
        self.ctx.count(direction, n)

    # -- teardown ---------------------------------------------------------
    def abort(self, why: str) -> None:
        """Close both sides at once, with a reset, so neither peer mistakes it for an EOF."""
        if self.state == "closed":
            return
        self.why = why
        level = logging.INFO if self.state == "open" else logging.WARNING
        FAILURE_LOG.log(level, "conn %d (listener %d, from %s): %s", self.id, self.listener,
                        address_text(self.peer), why)
        self.close(reset=True)

    def close(self, reset: bool = False) -> None:
        if self.state == "closed":
            return
        if self.carried:
            self._uncarry()
        kept = self.ctx.tls_session
        if (not reset and self.tls is not None and self.tls.side is self.b
                and (kept is None or (self.tls.offered is kept and not self.tls.obj.session_reused))
                and self.tls.obj.context is self.ctx.client_tls):   # not one of a context since replaced
            # TLS 1.3 resumption: the next connection to this PROD skips the certificate
            # exchange (both signatures and verifications), as HAProxy does by default.
            # One session serves until PROD turns it down (its ticket expired): only then
            # is a new one taken. Reading SSLObject.session copies the session, and
            # CPython 3.11 leaks that copy (about 4.5 KB per read; python/cpython#116810,
            # fixed upstream by #123249, not in 3.11), so never once per connection
            # (tests/data/test_builtin_churn.py).
            session = self.tls.obj.session
            if session is not None and session.has_ticket:
                self.ctx.tls_session = session
                self.ctx.sessions_kept += 1
        self.state = "closed"
        self._arm(None)
        for p in self.pumps:
            p.release()
        self.pumps = []   # no cycles left: nothing for the garbage collector to chase
        for side in (self.a, self.b):
            if side is None:
                continue
            self.ctx.loop.forget(side.fd)   # close() takes it out of epoll
            if reset:
                close_with_reset(side.sock)
            else:
                side.sock.close()
        self.ctx.conn_closed(self)
        self.ctx.loop.trim_soon()

    def info(self) -> dict[str, Any]:
        self.settle()
        p = self.pumps[0] if self.pumps else None
        return {"id": self.id, "listener": self.listener, "worker": getattr(self.ctx, "index", 0),
                "peer": address_text(self.peer), "target": address_text(self.target[1]), "state": self.state,
                "relay": "" if p is None else "tls" if self.tls is not None
                else "copy" if isinstance(p, (CopyPump, CCopyPump)) else "splice",
                "pumps": "" if p is None else "c" if isinstance(p, (CEncryptPump, CDecryptPump, CCopyPump))
                else "python",
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "age": round(time.time() - self.started, 3)}


def address_text(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_listener(str(addr[0]), addr[1])
    return str(addr)
