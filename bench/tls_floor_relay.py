"""One relay process of bench/tls_floor: plain TCP on one side, TLS 1.3 on the other.

    tls_floor_relay.py ROLE ENGINE LISTEN_PORT TARGET_PORT CERT KEY

ROLE ``client``: accepts plain TCP, connects to TARGET_PORT and speaks TLS there (relay A);
ROLE ``server``: accepts TLS, connects to TARGET_PORT in plain TCP (relay B).

Minimal on purpose: one thread, an edge-triggered epoll loop, blocking accept, connect and
handshake (a new connection stalls the others for a moment; the benchmark does not care),
no counters, no rate limit, 256 KiB reads. ENGINE is the TLS engine, with an optional
``-aes128`` suffix (TLS_AES_128_GCM_SHA256 only; the default is OpenSSL's TLS 1.3 list,
whose first choice is TLS_AES_256_GCM_SHA384):

* ``membio``: ssl.SSLObject over two ssl.MemoryBIOs, the pattern of
  src/scistream/data/tlsleg.py (close_notify only once the engine's input is drained);
* ``sslsocket``: ssl.SSLSocket, non-blocking (socket BIO, no read-ahead: two recv per record).
  Not a correct half-close engine: CPython's shutdown() calls SSL_shutdown twice, and the
  second call reads (and discards) application data still on its way;
* ``ctypes-sock`` / ``ctypes-pair`` / ``ctypes-2pair``: OpenSSL 3 (the libssl.so.3 that
  Python's _ssl uses) called directly through ctypes. ``sock`` and ``pair`` read through a
  socket BIO with read-ahead and a 256 KiB read buffer (one recv for many records; suffix
  ``-ra16``: OpenSSL's default ~16 KiB read buffer), SSL_read into our 256 KiB buffer. Out:
  ``sock``, a socket BIO (one send per 16 KiB record); ``pair``, a BIO pair whose ring buffer
  we send from in place (BIO_nread0/BIO_nread), so ciphertext goes out in large sends.
  ``2pair``: one BIO pair both ways, our recv goes straight into its ring (BIO_nwrite0) and
  OpenSSL reads records from there without read-ahead. SSL_shutdown is called exactly once
  (close_notify out, nothing read), when the plain side says EOF.

Prints ``ready`` on stdout once listening; one ``cipher NAME`` line on stderr per handshake.
"""
from __future__ import annotations

import ctypes
import os
import select
import socket
import ssl
import sys

CHUNK = 256 * 1024
EV_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
EV_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
AES128 = "TLS_AES_128_GCM_SHA256"


def say(*words: object) -> None:
    """One line on stderr in one write (both relays of a chain share the log file)."""
    os.write(2, (" ".join(map(str, words)) + "\n").encode())


class TlsFail(Exception):
    pass


class Side:
    __slots__ = ("sock", "fd", "readable", "writable")

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.readable = self.writable = True

    def seen(self, ev: int) -> None:
        if ev & EV_READ:
            self.readable = True
        if ev & EV_WRITE:
            self.writable = True

    def shut(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def recv_plain(side: Side, view: memoryview) -> int:
    """recv_into; -1 if the socket has nothing now."""
    try:
        return side.sock.recv_into(view, CHUNK)
    except BlockingIOError:
        side.readable = False
        return -1


# --- OpenSSL through ctypes -------------------------------------------------------------

_lib: tuple[ctypes.CDLL, ctypes.CDLL] | None = None


def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libssl.so.3 and libcrypto.so.3: after ``import ssl`` the very copies _ssl is linked to."""
    global _lib
    if _lib is None:
        s, c = ctypes.CDLL("libssl.so.3"), ctypes.CDLL("libcrypto.so.3")
        P, I, L, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_size_t
        for lib, name, res, args in [
            (s, "TLS_method", P, []), (s, "SSL_CTX_new", P, [P]),
            (s, "SSL_CTX_ctrl", L, [P, I, L, P]), (s, "SSL_CTX_set_ciphersuites", I, [P, ctypes.c_char_p]),
            (s, "SSL_CTX_use_certificate_file", I, [P, ctypes.c_char_p, I]),
            (s, "SSL_CTX_use_PrivateKey_file", I, [P, ctypes.c_char_p, I]),
            (s, "SSL_CTX_set_default_read_buffer_len", None, [P, S]),
            (s, "SSL_new", P, [P]), (s, "SSL_free", None, [P]), (s, "SSL_set_bio", None, [P, P, P]),
            (s, "SSL_set0_wbio", None, [P, P]), (s, "SSL_connect", I, [P]), (s, "SSL_accept", I, [P]),
            (s, "SSL_read", I, [P, P, I]), (s, "SSL_write", I, [P, P, I]), (s, "SSL_get_error", I, [P, I]),
            (s, "SSL_shutdown", I, [P]), (s, "SSL_get_current_cipher", P, [P]),
            (s, "SSL_CIPHER_get_name", ctypes.c_char_p, [P]),
            (c, "BIO_new_socket", P, [I, I]), (c, "BIO_new_bio_pair", I, [ctypes.POINTER(P), S, ctypes.POINTER(P), S]),
            (c, "BIO_nread0", I, [P, ctypes.POINTER(P)]), (c, "BIO_nread", I, [P, ctypes.POINTER(P), I]),
            (c, "BIO_nwrite0", I, [P, ctypes.POINTER(P)]), (c, "BIO_nwrite", I, [P, ctypes.POINTER(P), I]),
            (c, "BIO_ctrl", L, [P, I, L, P]),
            (c, "BIO_free", I, [P]), (c, "ERR_clear_error", None, []),
        ]:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        _lib = (s, c)
    return _lib


SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_ZERO_RETURN = 2, 3, 6
SSL_CTRL_MODE, SSL_CTRL_SET_READ_AHEAD, SSL_CTRL_SET_MIN_PROTO_VERSION = 33, 41, 123
SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 2
BIO_C_SHUTDOWN_WR = 142
TLS1_3_VERSION = 0x0304


def python_ctx_ptr(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX* inside an ssl.SSLContext (CPython 3.11: the first field after PyObject_HEAD).
    Only to pick the TLS 1.3 cipher suites, which the ssl module has no API for."""
    return ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value or 0


def python_ctx(server: bool, cert: str, key: str, aes128: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if server:
        ctx.load_cert_chain(cert, key)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if aes128:
        s, _ = libs()
        if s.SSL_CTX_set_ciphersuites(python_ctx_ptr(ctx), AES128.encode()) != 1:
            raise SystemExit("SSL_CTX_set_ciphersuites failed")
    return ctx


def ctypes_ctx(server: bool, cert: str, key: str, aes128: bool, read_ahead: bool, rbuf_len: int) -> int:
    s, _ = libs()
    ctx = s.SSL_CTX_new(s.TLS_method())
    s.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_3_VERSION, None)
    if aes128 and s.SSL_CTX_set_ciphersuites(ctx, AES128.encode()) != 1:
        raise SystemExit("SSL_CTX_set_ciphersuites failed")
    if server and (s.SSL_CTX_use_certificate_file(ctx, cert.encode(), 1) != 1
                   or s.SSL_CTX_use_PrivateKey_file(ctx, key.encode(), 1) != 1):
        raise SystemExit("cannot load the certificate")
    if read_ahead:
        s.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_READ_AHEAD, 1, None)
        if rbuf_len:
            s.SSL_CTX_set_default_read_buffer_len(ctx, rbuf_len)
    s.SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, None)
    return ctx


# --- engines: each moves both directions of one connection; encrypt()/decrypt() return True
# --- once their direction is finished (EOF passed on), False when blocked -----------------

class MemBio:
    """ssl.SSLObject over two MemoryBIOs: tlsleg.py's TlsEnd/EncryptPump/DecryptPump, reduced."""

    def __init__(self, plain: Side, tls: Side, ctx: ssl.SSLContext, server: bool) -> None:
        self.plain, self.tls = plain, tls
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server,
                                server_hostname=None if server else "scistream-session")
        self.raw = self.obj._sslobj
        self.rbuf = bytearray(CHUNK + 64 * 1024)   # ciphertext in, and plaintext in
        self.rview = memoryview(self.rbuf)
        self.pbuf = bytearray(CHUNK)                # plaintext out of the decryptor
        self.pview = memoryview(self.pbuf)
        self.wbuf: memoryview | None = None
        self.pending: memoryview | None = None
        self.eof_in = self.plain_eof = self.peer_closed = False
        self.close_wanted = self.closed_out = False
        sock = tls.sock                             # the handshake, blocking
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.out.pending:
                    sock.sendall(self.out.read())
                data = sock.recv(65536)
                if not data:
                    raise TlsFail("EOF in handshake")
                self.inc.write(data)
        if self.out.pending:
            sock.sendall(self.out.read())
        sock.setblocking(False)
        say("cipher", self.obj.cipher()[0])

    def flush(self) -> bool:
        tls = self.tls
        while True:
            if self.wbuf is None:
                if not self.out.pending:
                    return True
                self.wbuf = memoryview(self.out.read())
            if not tls.writable:
                return False
            try:
                n = tls.sock.send(self.wbuf)
            except BlockingIOError:
                tls.writable = False
                return False
            self.wbuf = self.wbuf[n:] if n < len(self.wbuf) else None

    def feed(self) -> bool:
        tls = self.tls
        if self.eof_in or not tls.readable:
            return False
        try:
            n = tls.sock.recv_into(self.rbuf)
        except BlockingIOError:
            tls.readable = False
            return False
        if n == 0:
            self.eof_in = True
            self.inc.write_eof()
        else:
            self.inc.write(self.rview[:n])
        return True

    def drained(self) -> bool:
        return not self.inc.pending and not self.raw.pending()

    def close_notify(self) -> None:
        if self.closed_out:
            return
        if not self.drained():
            self.close_wanted = True
            return
        self.close_wanted, self.closed_out = False, True
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass

    def encrypt(self) -> bool:
        write, rview = self.raw.write, self.rview
        while True:
            if not self.flush():
                return False
            if self.plain_eof:
                if self.closed_out:
                    self.tls.shut()
                    return True
                return False
            if not self.plain.readable:
                return False
            n = recv_plain(self.plain, rview)
            if n < 0:
                return False
            if n == 0:
                self.plain_eof = True
                self.close_notify()
                continue
            write(rview[:n])

    def send_plain(self, data: memoryview) -> None:
        try:
            n = self.plain.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self.plain.writable = False
            self.pending = memoryview(bytes(data[n:]))

    def decrypt(self) -> bool:
        read, pview, plain = self.raw.read, self.pview, self.plain
        while True:
            if self.pending is not None:
                if not plain.writable:
                    return False
                data, self.pending = self.pending, None
                self.send_plain(data)
                continue
            if self.peer_closed:
                plain.shut()
                return True
            if not plain.writable:
                return False
            got = 0
            try:
                while got < CHUNK:
                    n = read(CHUNK - got, pview[got:])
                    if not n:
                        self.peer_closed = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
            if got:
                self.send_plain(pview[:got])
            if self.close_wanted and self.drained():
                self.close_notify()
            if got or self.peer_closed:
                continue
            if self.eof_in:
                raise TlsFail("TCP EOF without close_notify")
            self.flush()
            if not self.feed():
                return False

    def close(self) -> None:
        pass


class SslSocket:
    """ssl.SSLSocket (socket BIO), non-blocking, 256 KiB per write and per read loop."""

    def __init__(self, plain: Side, tls: Side, ctx: ssl.SSLContext, server: bool) -> None:
        self.plain, self.tls = plain, tls
        self.ssock = ctx.wrap_socket(tls.sock, server_side=server,
                                     server_hostname=None if server else "scistream-session")
        tls.sock = self.ssock
        self.ssock.setblocking(False)
        self.obj = self.ssock._sslobj
        self.ebuf = bytearray(CHUNK)
        self.eview = memoryview(self.ebuf)
        self.pbuf = bytearray(CHUNK)
        self.pview = memoryview(self.pbuf)
        self.wpending: memoryview | None = None
        self.pending: memoryview | None = None
        self.plain_eof = self.peer_closed = False
        say("cipher", self.ssock.cipher()[0])

    def encrypt(self) -> bool:
        write, tls = self.obj.write, self.tls
        while True:
            if self.wpending is not None:
                if not tls.writable:
                    return False
                try:
                    n = write(self.wpending)
                except ssl.SSLWantWriteError:
                    tls.writable = False
                    return False
                self.wpending = self.wpending[n:] if n < len(self.wpending) else None
                continue
            if self.plain_eof:
                try:
                    self.obj.shutdown()   # SSL_shutdown, and (CPython) a second time: see the docstring
                except (ssl.SSLError, OSError):
                    pass
                tls.shut()
                return True
            if not self.plain.readable:
                return False
            n = recv_plain(self.plain, self.eview)
            if n < 0:
                return False
            if n == 0:
                self.plain_eof = True
                continue
            self.wpending = self.eview[:n]

    def decrypt(self) -> bool:
        read, pview, plain, tls = self.obj.read, self.pview, self.plain, self.tls
        while True:
            if self.pending is not None:
                if not plain.writable:
                    return False
                try:
                    n = plain.sock.send(self.pending)
                except BlockingIOError:
                    n = 0
                if n < len(self.pending):
                    plain.writable = False
                    self.pending = self.pending[n:]
                    return False
                self.pending = None
                continue
            if self.peer_closed:
                plain.shut()
                return True
            if not tls.readable and not self.obj.pending():
                return False
            got = 0
            try:
                while got < CHUNK:
                    n = read(CHUNK - got, pview[got:])
                    if not n:
                        self.peer_closed = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                tls.readable = False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.peer_closed = True
            if got:
                self.pending = pview[:got]
                continue
            if not self.peer_closed:
                return False

    def close(self) -> None:
        pass


class CtypesEngine:
    """OpenSSL via ctypes: socket BIO in (read-ahead, 256 KiB buffer); out via a socket BIO
    (``pair=False``) or a BIO pair sent from in place (``pair=True``)."""

    def __init__(self, plain: Side, tls: Side, ctx: int, server: bool, out: str) -> None:
        s, c = self.s, self.c = libs()
        self.plain, self.tls = plain, tls
        self.ssl = s.SSL_new(ctx)
        fd = tls.fd
        s.SSL_set_bio(self.ssl, c.BIO_new_socket(fd, 0), c.BIO_new_socket(fd, 0))   # two BIOs: wbio replaceable
        r = s.SSL_accept(self.ssl) if server else s.SSL_connect(self.ssl)            # the socket is blocking here
        if r != 1:
            raise TlsFail(f"handshake failed ({s.SSL_get_error(self.ssl, r)})")
        self.ext = None          # our end of the BIO pair, if any
        self.ring_in = out == "2pair"
        self.eof_in = False
        if out != "sock":
            internal, external = ctypes.c_void_p(), ctypes.c_void_p()
            if c.BIO_new_bio_pair(ctypes.byref(internal), 2 * CHUNK, ctypes.byref(external),
                                  2 * CHUNK if self.ring_in else 4096) != 1:
                raise TlsFail("BIO_new_bio_pair failed")
            if self.ring_in:
                s.SSL_set_bio(self.ssl, internal, internal)   # frees both socket BIOs
            else:
                s.SSL_set0_wbio(self.ssl, internal)   # frees the write socket BIO
            self.ext = external
        tls.sock.setblocking(False)
        self.ptr = ctypes.c_void_p()
        self.ebuf = (ctypes.c_char * CHUNK)()
        self.eview = memoryview(self.ebuf).cast("B")
        self.eaddr = ctypes.addressof(self.ebuf)
        self.dbuf = (ctypes.c_char * CHUNK)()
        self.dview = memoryview(self.dbuf).cast("B")
        self.daddr = ctypes.addressof(self.dbuf)
        self.wlen = 0            # plaintext in ebuf not yet taken by SSL_write
        self.plen = self.poff = 0   # plaintext in dbuf not yet on the plain socket
        self.plain_eof = self.shut_sent = self.peer_closed = False
        name = s.SSL_CIPHER_get_name(s.SSL_get_current_cipher(self.ssl))
        say("cipher", name.decode())

    def flush(self) -> bool:
        """BIO pair: send the ciphertext from the pair's ring buffer; True when it is empty."""
        ext = self.ext
        if ext is None:
            return True
        c, tls, ptr = self.c, self.tls, self.ptr
        while True:
            n = c.BIO_nread0(ext, ctypes.byref(ptr))
            if n <= 0:
                return True
            if not tls.writable:
                return False
            try:
                sent = tls.sock.send((ctypes.c_char * n).from_address(ptr.value))
            except BlockingIOError:
                tls.writable = False
                return False
            c.BIO_nread(ext, ctypes.byref(ptr), sent)

    def feed(self) -> bool:
        """BIO pair in: recv straight into the pair's ring; False if nothing came."""
        c, tls, ptr, ext = self.c, self.tls, self.ptr, self.ext
        if self.eof_in or not tls.readable:
            return False
        n = c.BIO_nwrite0(ext, ctypes.byref(ptr))
        if n <= 0:
            return False
        try:
            got = tls.sock.recv_into((ctypes.c_char * n).from_address(ptr.value))
        except BlockingIOError:
            tls.readable = False
            return False
        if got == 0:
            self.eof_in = True
            c.BIO_ctrl(ext, BIO_C_SHUTDOWN_WR, 0, None)
            return True
        c.BIO_nwrite(ext, ctypes.byref(ptr), got)
        return True

    def encrypt(self) -> bool:
        s, ssl_, tls = self.s, self.ssl, self.tls
        while True:
            if not self.flush():
                return False
            if self.wlen:
                if not tls.writable:
                    return False
                r = s.SSL_write(ssl_, self.eaddr, self.wlen)
                if r > 0:
                    self.wlen = 0
                    continue
                e = s.SSL_get_error(ssl_, r)
                if e != SSL_ERROR_WANT_WRITE:
                    raise TlsFail(f"SSL_write: error {e}")
                if self.ext is None:
                    tls.writable = False
                    return False
                continue          # the pair's ring is full: flush it
            if self.plain_eof:
                if not self.shut_sent:
                    r = s.SSL_shutdown(ssl_)   # once: close_notify out, nothing read
                    if r < 0 and s.SSL_get_error(ssl_, r) == SSL_ERROR_WANT_WRITE and self.ext is None:
                        tls.writable = False
                        return False
                    self.shut_sent = True
                    continue
                tls.shut()
                return True
            if not self.plain.readable:
                return False
            n = recv_plain(self.plain, self.eview)
            if n < 0:
                return False
            if n == 0:
                self.plain_eof = True
                continue
            self.wlen = n

    def decrypt(self) -> bool:
        s, ssl_, plain, tls = self.s, self.ssl, self.plain, self.tls
        read, daddr = s.SSL_read, self.daddr
        while True:
            if self.plen:
                if not plain.writable:
                    return False
                try:
                    n = plain.sock.send(self.dview[self.poff:self.plen])
                except BlockingIOError:
                    n = 0
                self.poff += n
                if self.poff < self.plen:
                    plain.writable = False
                    return False
                self.plen = self.poff = 0
                continue
            if self.peer_closed:
                plain.shut()
                return True
            if not tls.readable and not self.ring_in:   # the last SSL_read wanted more
                return False
            got = 0
            while got < CHUNK:
                r = read(ssl_, daddr + got, CHUNK - got)
                if r > 0:
                    got += r
                    continue
                e = s.SSL_get_error(ssl_, r)
                if e == SSL_ERROR_WANT_READ:
                    if self.ring_in and self.feed():
                        continue
                    tls.readable = False
                    break
                if e == SSL_ERROR_ZERO_RETURN:
                    self.peer_closed = True
                    break
                if e == SSL_ERROR_WANT_WRITE:   # a reply (key update) waits in the write BIO
                    break
                s.ERR_clear_error()
                raise TlsFail(f"SSL_read: error {e}")
            if got:
                self.plen = got
                continue
            if not self.peer_closed:
                self.flush()
                return False

    def close(self) -> None:
        if self.ssl:
            self.s.SSL_free(self.ssl)   # frees its read and write BIOs
            self.ssl = None
        if self.ext:
            self.c.BIO_free(self.ext)
            self.ext = None


# --- the loop ----------------------------------------------------------------------------

class Conn:
    def __init__(self, ep: select.epoll, conns: dict, plain: Side, tls: Side, engine) -> None:
        self.ep, self.conns, self.plain, self.tls, self.engine = ep, conns, plain, tls, engine
        self.enc_done = self.dec_done = False
        for side in (plain, tls):
            side.sock.setblocking(False)
            conns[side.fd] = (self, side)
            ep.register(side.fd, EV_READ | EV_WRITE | select.EPOLLET)

    def step(self) -> None:
        eng = self.engine
        try:
            if not self.enc_done:
                self.enc_done = eng.encrypt()
            if not self.dec_done:
                self.dec_done = eng.decrypt()
            if not self.enc_done:           # a close_notify the decryptor let go
                self.enc_done = eng.encrypt()
        except (OSError, ssl.SSLError, TlsFail) as exc:
            say("conn:", exc)
            self.close()
            return
        if self.enc_done and self.dec_done:
            self.close()

    def close(self) -> None:
        for side in (self.plain, self.tls):
            if self.conns.pop(side.fd, None) is not None:
                try:
                    self.ep.unregister(side.fd)
                except OSError:
                    pass
        self.engine.close()
        for side in (self.plain, self.tls):
            side.sock.close()


def main() -> int:
    role, engine, listen_port, target_port, cert, key = sys.argv[1:7]
    server = role == "server"
    parts = engine.split("-")
    aes128, ra16 = "aes128" in parts, "ra16" in parts
    base = "-".join(p for p in parts if p not in ("aes128", "ra16"))
    if base == "membio":
        ctx = python_ctx(server, cert, key, aes128)
        make = lambda p, t: MemBio(p, t, ctx, server)  # noqa: E731
    elif base == "sslsocket":
        ctx = python_ctx(server, cert, key, aes128)
        make = lambda p, t: SslSocket(p, t, ctx, server)  # noqa: E731
    elif base in ("ctypes-sock", "ctypes-pair", "ctypes-2pair"):
        out = base.split("-")[1]
        cctx = ctypes_ctx(server, cert, key, aes128, read_ahead=out != "2pair", rbuf_len=0 if ra16 else CHUNK)
        make = lambda p, t: CtypesEngine(p, t, cctx, server, out)  # noqa: E731
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    ls = socket.create_server(("127.0.0.1", int(listen_port)))
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[Conn, Side]] = {}
    print("ready", flush=True)
    while True:
        for fd, ev in ep.poll():
            if fd == ls.fileno():
                a, _ = ls.accept()
                try:
                    b = socket.create_connection(("127.0.0.1", int(target_port)))
                except OSError as exc:
                    say("connect:", exc)
                    a.close()
                    continue
                plain, tls = (Side(b), Side(a)) if server else (Side(a), Side(b))
                try:
                    eng = make(plain, tls)
                except (OSError, ssl.SSLError, TlsFail) as exc:
                    say("handshake:", exc)
                    a.close()
                    b.close()
                    continue
                Conn(ep, conns, plain, tls, eng).step()
                continue
            item = conns.get(fd)
            if item is None:
                continue
            conn, side = item
            side.seen(ev)
            conn.step()


if __name__ == "__main__":
    sys.exit(main())
