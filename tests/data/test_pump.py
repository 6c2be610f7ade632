"""The compiled pumps (``scistream.data.engine._pump``) on their own: the plain copy against a
destination that stops reading, and the TLS engine's refusals of what it cannot take
over. (Both carry real sessions in test_builtin_tls.py and test_node_service.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import select
import socket
import ssl
import struct
import threading
import time

import pytest
from tlsmemory import handshake

from scistream.data import wankeys
from scistream.data.engine import compiled, tlsleg
from scistream.data.engine.compiled import module as pump   # built by scripts/setup (gcc, libssl-dev, python3-dev)

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


def test_a_failed_copy_says_what_it_moved_before_the_error():
    """A reset ends a call that moved bytes first: the error carries them (``moved``), the
    node counts them (tests/data/test_builtin_counts.py)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        peer = socket.create_connection(lsock.getsockname(), 10)
        src, _ = lsock.accept()
    data = os.urandom(300_000)
    peer.sendall(data)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()                       # the data, then a reset: recv gives the data, then ECONNRESET
    dst_w, dst_r = _pair(4 << 20)
    select.select([src], [], [], 10)
    with pytest.raises(ConnectionResetError) as info:
        pump.Copier().copy(src.fileno(), dst_w.fileno(), True, True)
    moved = info.value.moved
    got = bytearray()
    while True:          # all the copy sent is in dst_r's buffer already
        try:
            got += dst_r.recv(1 << 20)
        except BlockingIOError:
            break
    # the reset threw away what the peer had not sent yet: a prefix came
    assert 0 < moved == len(got) and bytes(got) == data[:moved]
    for s in (src, dst_w, dst_r):
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


def test_libssl_check_names_a_foreign_openssl():
    """The TLS engine may take an SSL* over only from the libssl it was linked with: the
    _ssl extension's own (same) and another object (a Python that links OpenSSL into
    something else: here the _json extension, which has no SSL at all)."""
    import _json
    assert compiled.libssl_mismatch(pump, ssl._ssl.__file__) == ""
    why = compiled.libssl_mismatch(pump, _json.__file__)
    assert "another OpenSSL" in why and _json.__file__ in why
    assert "not built" in compiled.libssl_mismatch(None, ssl._ssl.__file__)


def test_a_foreign_libssl_refuses_the_tls_engine_and_keeps_the_rest(tmp_path):
    """A process whose ``_ssl`` is not in the libssl the module was linked with (python-
    build-standalone links OpenSSL into the executable): one log line, no TLS engine and
    no shared ticket keys, the Python pumps on TLS legs, the plain copier still compiled;
    a TLS leg set up there hands nothing to the compiled engine."""
    script = r"""
import _json, logging, ssl, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
ssl._ssl.__file__ = _json.__file__          # where this "Python" keeps its OpenSSL
from scistream.data import wankeys
from scistream.data.engine import compiled, tlsleg
secret = wankeys.new_secret()
creds = wankeys.derive_credentials(secret, "u")
cfg = {"tls": True, "role": "PROD", "cert_pem": creds.cert_pem.decode(), "key_pem": creds.key_pem.decode(),
       "ca_pem": creds.ca_pem.decode()}
server, _ = tlsleg.tls_contexts(cfg)
print(compiled.PUMPS, compiled.TLS_ENGINE, compiled.ssl_ext is None, compiled.pump is not None,
      tlsleg.share_tickets(server, wankeys.ticket_keys(secret)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["c", "False", "True", "True", "False"]
    refusals = [ln for ln in done.stderr.splitlines() if "compiled TLS engine refused" in ln]
    assert len(refusals) == 1 and "another OpenSSL" in refusals[0], done.stderr


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, session=None):
    """A TLS 1.3 connection over memory: handshake, one record each way (the client then
    holds the server's ticket); the client's session and whether it was resumed."""
    t = handshake(server, client, session=session)
    t.server.write(b"ticket, please")
    t.shuttle()
    assert t.client.read(100) == b"ticket, please"
    return t.client.session, t.client.session_reused


def test_workers_of_a_session_resume_each_others_tickets():
    """Two workers build their PROD context from the same session configuration: a ticket
    one issued resumes on the other (their ticket keys derive from the session's secret).
    A context with other keys does not."""
    secret = wankeys.new_secret()
    creds = wankeys.derive_credentials(secret, "u")
    cfg = {"tls": True, "role": "PROD", "cert_pem": creds.cert_pem.decode(), "key_pem": creds.key_pem.decode(),
           "ca_pem": creds.ca_pem.decode(), "ticket_keys": wankeys.ticket_keys(secret).hex()}
    one, _ = tlsleg.tls_contexts(cfg)
    other, _ = tlsleg.tls_contexts(cfg)
    _, client = tlsleg.tls_contexts({**cfg, "role": "CONS"})
    session, reused = _handshake(client, one)
    assert not reused and session.has_ticket
    assert _handshake(client, other, session)[1]
    own, _ = tlsleg.tls_contexts(cfg)
    assert _handshake(client, own, session)[1]
    lone = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)        # the same credentials, keys of its own
    lone.minimum_version = ssl.TLSVersion.TLSv1_3
    lone.verify_mode = ssl.CERT_REQUIRED
    lone.load_verify_locations(cadata=cfg["ca_pem"])
    assert tlsleg.share_tickets(lone, wankeys.ticket_keys(wankeys.new_secret()))
    fd = os.memfd_create("c")
    os.write(fd, (cfg["key_pem"] + cfg["cert_pem"]).encode())
    lone.load_cert_chain(f"/proc/self/fd/{fd}")
    os.close(fd)
    assert not _handshake(client, lone, session)[1]
