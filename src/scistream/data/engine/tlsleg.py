"""The TLS leg of a built-in data server connection: handshake, encrypt, decrypt, half-close.

The TLS engine is an ``ssl.SSLObject`` over two memory BIOs; the socket I/O is ours.
That gives three things a TLS socket (and asyncio's SSL transport) does not:

* a real half-close: when the plaintext side says EOF we send TLS ``close_notify``
  (then ``shutdown(SHUT_WR)``) and keep decrypting what the peer still sends; when the
  peer's ``close_notify`` arrives we shut the plaintext side's write half, and the other
  direction keeps going. OpenSSL discards unread application data if asked to shut down
  while records are waiting, so ``close_notify`` waits until the engine's input is empty.
* a TCP EOF without ``close_notify`` (a truncation attack, or a crashed peer) is not
  passed on as a clean EOF: the connection is reset.
* back-pressure per direction with no threads: the loop wakes us, we move what we can.

Large reads (256 KiB of plaintext per ``write``, i.e. 16 full records) keep the per-byte
cost at the cipher's; the scratch buffers are shared by the connections of a thread.

    tls = TlsEnd(side, ctx, server_side=True)
    while not tls.handshake(): ...          # called again on each socket event
    conn.tls = tls     # PROD: the TLS side is a, the accepted one
    pumps = [DecryptPump(conn, conn.a, conn.b, "in"), EncryptPump(conn, conn.b, conn.a, "out")]
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import TYPE_CHECKING

from .compiled import F_DST_AGAIN, F_EMPTY, F_EOF, F_SRC_AGAIN, TLS_ENGINE, on_context, pump, ssl_ext

if TYPE_CHECKING:
    from .conn import Conn, Side

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
SERVER_NAME = "scistream-session"

def tls_contexts(cfg: dict) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context for the listeners, client context for the targets) of a session's
    WAN leg (``cfg``: its role, and ``cert_pem``/``key_pem`` when ``tls``, ``ticket_keys`` for
    PROD): TLS 1.3, mutual, the session's one certificate the only identity either end trusts."""
    if not cfg.get("tls"):
        return None, None
    server = cfg["role"] == "PROD"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("X25519")             # both ends ours: this group alone (wankeys.WAN_GROUP)
    # the credentials derived from the session's secret live in memory only: loaded
    # through an anonymous memory file, never written to a disk
    fd = os.memfd_create("scistream-session-credentials", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cfg["key_pem"] + cfg["cert_pem"]).encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    ctx.load_verify_locations(cadata=cfg.get("ca_pem") or cfg["cert_pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED      # mutual: the peer's leaf must come from the session anchor
    ctx.check_hostname = False               # the one trusted certificate is the identity
    if server:
        ctx.num_tickets = 1                  # one resumption ticket per connection (see conn)
        if cfg.get("ticket_keys"):
            share_tickets(ctx, bytes.fromhex(cfg["ticket_keys"]))
    return (ctx, None) if server else (None, ctx)


def share_tickets(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give a session's PROD context the session's ticket keys (``wankeys.ticket_keys``), so
    that every worker (and every node) serving the session resumes the tickets any of them
    issued; with OpenSSL's random keys each, a ticket from one is refused by the other (a
    full handshake, and CONS takes a new session). Needs the compiled module (``ssl_ext``):
    without it each process keeps its own keys, and says nothing."""
    if ssl_ext is None:
        return False
    try:
        on_context(ctx, "set_ticket_keys", keys)
    except (TypeError, ValueError) as exc:
        log.warning("session tickets not shared between workers: %s", exc)
        return False
    return True


_layout_warned = False   # said once: this Python's _ssl is not laid out as _pump.c reads it


class Buffers:
    """Scratch buffers of one thread, shared by its connections: whatever a pump puts in
    them is consumed (or copied) before the pump returns."""
    __slots__ = ("rbuf", "rview", "pbuf", "pview")

    def __init__(self) -> None:
        self.rbuf = bytearray(CHUNK + 64 * 1024)   # ciphertext in, and plaintext in
        self.rview = memoryview(self.rbuf)
        self.pbuf = bytearray(CHUNK)                # plaintext out of the decryptor
        self.pview = memoryview(self.pbuf)


_local = threading.local()


def thread_buffers() -> Buffers:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = Buffers()
    return bufs


class TlsEnd:
    """The TLS engine of one socket."""
    __slots__ = ("side", "inc", "out", "obj", "raw", "bufs", "wbuf", "eof_in", "close_wanted", "closed_out",
                 "offered", "eng")

    def __init__(self, side: "Side", ctx: ssl.SSLContext, *, server_side: bool,
                 session: ssl.SSLSession | None = None) -> None:
        self.side = side
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                server_hostname=None if server_side else SERVER_NAME, session=session)
        self.offered = session                # the session this client tried to resume
        # The C object behind ssl.SSLObject: same read/write, one Python frame less per
        # 16 KiB record on the hot path.
        self.raw = getattr(self.obj, "_sslobj", self.obj)
        self.bufs = thread_buffers()          # of the thread that owns this connection
        self.wbuf: memoryview | None = None   # ciphertext not yet on the socket
        self.eof_in = False                   # TCP EOF seen on the socket
        self.close_wanted = False             # close_notify owed, waiting for input to drain
        self.closed_out = False               # close_notify sent (queued)
        self.eng: "pump.Engine | None" = None    # the compiled engine, once it took over (``compiled``)

    def flush(self) -> bool:
        """Put queued ciphertext on the socket; True when nothing is left."""
        side = self.side
        while True:
            if self.wbuf is None:
                if not self.out.pending:
                    return True
                self.wbuf = memoryview(self.out.read())
            if not side.writable:
                return False
            try:
                n = side.sock.send(self.wbuf)
            except BlockingIOError:
                side.writable = False
                return False
            self.wbuf = self.wbuf[n:] if n < len(self.wbuf) else None

    def feed(self) -> bool:
        """Move ciphertext from the socket into the engine; False if there was none."""
        side = self.side
        if self.eof_in or not side.readable:
            return False
        try:
            n = side.sock.recv_into(self.bufs.rbuf)
        except BlockingIOError:
            side.readable = False
            return False
        if n == 0:
            self.eof_in = True
            self.inc.write_eof()
        else:
            self.inc.write(self.bufs.rview[:n])
        return True

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self.flush()
                if not self.feed():
                    return False
                continue
            self.flush()
            return True

    def compiled(self) -> "pump.Engine | None":
        """Hand the engine's SSL* over to the compiled pumps (after the handshake, with no
        rate limit): what the memory BIOs still hold moves along (``eng``). None where it was not
        built or is turned off, or if this Python's ``_ssl`` is laid out otherwise (said
        once in the log); the Python pumps go on then, with nothing lost."""
        global _layout_warned
        if not TLS_ENGINE:
            return None
        pin = self.inc.read()
        pout = (bytes(self.wbuf) if self.wbuf is not None else b"") + self.out.read()
        try:
            eng = pump.Engine(self.raw, self.inc, self.out, pin, pout, self.eof_in)
        except (TypeError, ValueError) as exc:
            if pin:
                self.inc.write(pin)
            self.wbuf = memoryview(pout) if pout else None
            if not _layout_warned:
                _layout_warned = True
                log.warning("compiled TLS engine not usable here (%s): using the Python pumps", exc)
            return None
        self.wbuf = None
        self.eng = eng
        return eng

    @property
    def input_drained(self) -> bool:
        return not self.inc.pending and not self.obj.pending()

    def close_notify(self) -> None:
        """Send close_notify now if that loses nothing, else as soon as input is drained."""
        if self.closed_out:
            return
        if not self.input_drained:
            self.close_wanted = True
            return
        self.close_wanted = False
        self.closed_out = True
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify comes later (or already came)
        except ssl.SSLError as exc:
            log.debug("close_notify: %s", exc)


class Pump:
    """One direction of a connection, ``src`` to ``dst``: ``run`` moves what it can now,
    ``release`` lets go of what it holds. ``eof``: the source said EOF; ``done``: the EOF
    was carried over (``Conn.pump_done``). The plain pumps are in ``conn``."""
    __slots__ = ("conn", "src", "dst", "direction", "eof", "done", "bucket")

    def __init__(self, conn: "Conn", src: "Side", dst: "Side", direction: str) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.direction = direction
        self.eof = False
        self.done = False
        self.bucket = conn.ctx.buckets.get(direction)

    def finish(self) -> None:
        self.done = True
        self.conn.pump_done(self.dst)

    def release(self) -> None:
        if self.bucket is not None:
            self.bucket.discard(self.conn.step)

    def _recv(self, buf: bytearray, want: int) -> int | None:
        """Read at most ``want`` bytes from ``src`` into ``buf``, fewer if the rate budget
        (``bucket``, or None) has less: the count, 0 at EOF, -1 if the socket has nothing now
        (``src`` is marked not readable), None if the budget has nothing now (the connection
        runs again when it has). What the read did not use goes back to the budget."""
        bucket, src = self.bucket, self.src
        if bucket is not None:
            want = bucket.take(want, self.conn.step)
            if not want:
                return None
        try:
            n = src.sock.recv_into(buf, want)
        except BlockingIOError:
            src.readable = False
            n = -1
        if bucket is not None:
            bucket.refund(want - max(n, 0))
        return n


class SendKeepingRest(Pump):
    """A pump that sends from a scratch buffer: what the destination does not take now is
    copied and kept (``pending``) until it is writable again."""
    __slots__ = ("pending",)

    def __init__(self, conn: "Conn", src: "Side", dst: "Side", direction: str) -> None:
        super().__init__(conn, src, dst, direction)
        self.pending: memoryview | None = None

    def _send(self, data: memoryview) -> None:
        try:
            n = self.dst.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self.dst.writable = False
            self.pending = memoryview(bytes(data[n:]))
        if n:
            self.conn.counted(self.direction, n)

    def _settle(self) -> bool:
        """Send what the destination did not take before, while it takes it; at the source's
        EOF with nothing left, end this direction. True: nothing more to do for now."""
        while self.pending is not None:
            if not self.dst.writable:
                return True
            data, self.pending = self.pending, None
            self._send(data)
        if self.eof:
            self.finish()
            return True
        return False


def run_compiled(pump: Pump, call, *args) -> int:
    """One call of a compiled pump: count what it moved and mark a socket that said EAGAIN
    as not ready (the loop says when it is again); its flags. A call that fails (a reset,
    mostly) still counts what it moved before (``exc.moved``): those bytes went into the
    destination socket (or, encrypting, into the TLS engine), and one call can move
    megabytes. The caller then aborts the connection; the count of a direction is what it
    wrote toward its destination, at least what the receiving application got."""
    try:
        n, fl = call(*args)
    except OSError as exc:          # ssl.SSLError too
        if moved := getattr(exc, "moved", 0):
            pump.conn.counted(pump.direction, moved)
        raise
    if n:
        pump.conn.counted(pump.direction, n)
    if fl & F_SRC_AGAIN:
        pump.src.readable = False
    if fl & F_DST_AGAIN:
        pump.dst.writable = False
    return fl


class CEncryptPump(Pump):
    """plain socket -> compiled engine -> TLS socket (``TlsEnd.compiled``). ``eof``: the
    source's EOF, close_notify queued; ``done``: close_notify on the wire, TCP write side shut."""
    __slots__ = ()

    def run(self) -> None:
        if self.done:
            return
        src, dst, eng = self.src, self.dst, self.conn.tls.eng
        fl = run_compiled(self, eng.encrypt, src.fd, dst.fd, src.readable and not self.eof, dst.writable)
        if fl & F_EOF:
            self.eof = True
            eng.shutdown()       # once: it never reads, the other direction loses nothing
            _, fl = eng.encrypt(src.fd, dst.fd, False, dst.writable)
            if fl & F_DST_AGAIN:
                dst.writable = False
        if self.eof and fl & F_EMPTY:
            self.finish()


class CDecryptPump(Pump):
    """TLS socket -> compiled engine -> plain socket; ``done``: the peer's close_notify
    passed on as a TCP EOF."""
    __slots__ = ()

    def run(self) -> None:
        if self.done:
            return
        src, dst = self.src, self.dst
        fl = run_compiled(self, self.conn.tls.eng.decrypt, src.fd, dst.fd, src.readable, dst.writable)
        if fl & F_EOF:
            self.finish()


class EncryptPump(Pump):
    """plain socket -> TLS engine -> TLS socket. ``eof``: the source's EOF; ``done``:
    close_notify on the wire, TCP write side shut."""
    __slots__ = ()

    def run(self) -> None:
        tls, src = self.conn.tls, self.src
        write = tls.raw.write
        rbuf, rview = tls.bufs.rbuf, tls.bufs.rview
        while True:
            if not tls.flush():
                return
            if self.eof:
                if tls.closed_out and not self.done:
                    self.finish()
                return
            if not src.readable:
                return
            n = self._recv(rbuf, CHUNK)
            if n is None or n < 0:
                return
            if n == 0:
                self.eof = True
                tls.close_notify()   # may wait for the decryptor to drain the input
                continue
            write(rview[:n])
            self.conn.counted(self.direction, n)

    def resume_close(self) -> None:
        """The engine's input is drained: the owed close_notify can go now."""
        if self.eof and self.conn.tls.close_wanted:
            self.conn.tls.close_notify()
            self.run()


class DecryptPump(SendKeepingRest):
    """TLS socket -> TLS engine -> plain socket. ``pending``: plaintext not yet on dst;
    ``eof``: the peer's close_notify arrived; ``done``: ... and was passed on as a TCP EOF."""
    __slots__ = ()

    def run(self) -> None:
        tls, dst = self.conn.tls, self.dst
        read = tls.raw.read
        pview = tls.bufs.pview
        while not self.done:
            if self._settle() or not dst.writable:
                return
            room = CHUNK
            if self.bucket is not None:
                room = self.bucket.take(room, self.conn.step)
                if not room:
                    return
            got = 0
            try:
                while got < room:
                    n = read(room - got, pview[got:])
                    if not n:
                        self.eof = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.eof = True
            if self.bucket is not None:
                self.bucket.refund(room - got)
            if got:
                self._send(pview[:got])
            if tls.close_wanted and tls.input_drained:
                for p in self.conn.pumps:
                    if isinstance(p, EncryptPump):
                        p.resume_close()
                if self.conn.state != "open":
                    return
            if got or self.eof:
                continue
            tls.flush()  # anything the engine wants to say (alerts, key updates)
            if not tls.feed():
                return
