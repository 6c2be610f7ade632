"""The built-in data server process: ``python -m scistream.data.s2ds CONFIG.json``.

One process serves one session on one gateway. It binds every listener first, then
opens its control socket (``control`` in the config, a Unix socket of mode 0600) - so a
control server that can talk to the socket knows the listeners are up. It runs in its
own process group, so the control server can be restarted (even killed) without cutting
the session's streams, and a new control server re-adopts it through the socket.

Each listener accepts any number of connections and forwards each to its target
(``relay.Conn``): plain legs with ``splice`` (no copy), the WAN leg in TLS 1.3 with
mutual authentication when ``tls`` is set (``tlsleg``): PROD's listeners are TLS
servers, CONS's connections to its targets are TLS clients. ``rate_kbps`` caps each
direction of the whole session (all connections together) with a token bucket.

Control socket: one JSON object per line in, one per line out.
    {"op": "ping"}                         -> {"ok": true, "pid": 123, "uid": .., "role": ..}
    {"op": "stats"}                        -> {"ok": true, "bytes_in": .., "bytes_out": ..,
                                               "connections": .., "total_connections": ..,
                                               "failed_connections": .., "tls_resumed": ..,
                                               "tls_sessions_kept": ..,
                                               "threads": .., "memory_trims": ..,
                                               "memory_trim_pending": .., ...}
    {"op": "conns"}                        -> {"ok": true, "connections": [{"id", "listener",
                                               "worker", "peer", "target", "state", "bytes_in",
                                               "bytes_out", "age"}, ...]}   (open connections)
    {"op": "targets", "targets": [..]}     -> {"ok": true}   new connections go there (addresses, not names)
    {"op": "stop"}                         -> {"ok": true}   then the process exits

``bytes_in`` counts bytes carried towards the producer, ``bytes_out`` towards the consumer;
``failed_connections`` those that ended in an error (target unreachable, TLS refused, reset);
``tls_resumed`` the TLS handshakes that resumed an earlier session; ``tls_sessions_kept`` how
often CONS took a session to resume (once, and again each time PROD stops accepting it).

Config (JSON): uid, role, listen_host, ports, targets (addresses, never names), rate_kbps, tls (bool), cert, key
(paths, when tls), control (socket path); optional keepalive ([idle s, interval s, probes],
default [60, 15, 4]: a vanished peer is dropped within 2 minutes; [0, 0, 0]: the system's),
pipe_size (bytes, default 1 MiB) and
threads (event-loop threads, ``workers``; default: the environment variable
SCISTREAM_S2DS_THREADS, else one per CPU up to 4 with a TLS leg and one without; always
one when rate-limited).
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .evloop import EPOLLIN, EPOLLOUT, Loop, TokenBucket
from .base import KEEPALIVE, parse_keepalive
from .relay import FAILURE_LOG, Conn
from .workers import Worker

log = logging.getLogger(__name__)

DEFAULT_PIPE = 1 << 20
MAX_THREADS = 4


def resolve_target(text: str) -> tuple[int, Any]:
    """``address:port`` (``[v6]:port``) -> (family, sockaddr); ValueError otherwise.

    Addresses only, never a name lookup: a lookup would stall every connection of the
    loop, so the control server resolves names before it starts or retargets a data
    server (``addr.resolve_listener``)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad target {text!r}; expected host:port")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve target {text!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def keepalive_setting(value: Any) -> tuple[int, int, int]:
    """``[idle s, interval s, probes]`` from the configuration (default ``base.KEEPALIVE``);
    ``[0, 0, 0]``: the system's timings."""
    if value is None:
        return KEEPALIVE
    return parse_keepalive(value)


def tls_contexts(cfg: dict) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context for the listeners, client context for the targets) for this role."""
    if not cfg.get("tls"):
        return None, None
    server = cfg["role"] == "PROD"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("X25519")             # both ends ours: this group alone (wankeys.WAN_GROUP)
    if cfg.get("cert_pem"):
        # the node service's sessions carry their credentials in memory: loaded through an
        # anonymous memory file, never written to a disk
        fd = os.memfd_create("scistream-session-credentials", os.MFD_CLOEXEC)
        try:
            os.write(fd, (cfg["key_pem"] + cfg["cert_pem"]).encode())
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        ctx.load_verify_locations(cadata=cfg.get("ca_pem") or cfg["cert_pem"])
    else:
        ctx.load_cert_chain(cfg["cert"], cfg["key"])
        ctx.load_verify_locations(cafile=cfg.get("ca") or cfg["cert"])
    ctx.verify_mode = ssl.CERT_REQUIRED      # mutual: the peer's leaf must come from the session anchor
    ctx.check_hostname = False               # the one trusted certificate is the identity
    if server:
        ctx.num_tickets = 1                  # one resumption ticket per connection (see relay)
    return (ctx, None) if server else (None, ctx)


class ControlClient:
    """One connection to the control socket (line-delimited JSON)."""

    def __init__(self, server: "S2DS", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        sock.setblocking(False)
        server.loop.add(sock.fileno(), EPOLLIN, self.on_event)

    def on_event(self, ev: int) -> None:
        if ev & EPOLLOUT:
            self.flush()
        if not ev & ~EPOLLOUT:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbuf += data
        if len(self.inbuf) > 1 << 20:
            self.close()
            return
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                self.outbuf += json.dumps(self.server.handle(line)).encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        try:
            while self.outbuf:
                n = self.sock.send(self.outbuf)
                self.outbuf = self.outbuf[n:]
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        want = EPOLLIN | (EPOLLOUT if self.outbuf else 0)
        try:
            self.server.loop.ep.modify(self.sock.fileno(), want)
        except OSError:
            pass

    def close(self) -> None:
        self.server.loop.remove(self.sock.fileno())
        self.sock.close()
        self.server.clients.discard(self)


class S2DS:
    """The whole data server: listeners, connections, counters, control socket."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.uid = cfg.get("uid", "")
        self.role = cfg["role"]
        self.loop = Loop()
        self.pipe_size = int(cfg.get("pipe_size") or DEFAULT_PIPE)
        self.keepalive = keepalive_setting(cfg.get("keepalive"))
        rate = int(cfg.get("rate_kbps") or 0)
        self.buckets = {d: (TokenBucket(self.loop, rate) if rate > 0 else None) for d in ("in", "out")}
        self.server_tls, self.client_tls = tls_contexts(cfg)
        self.tls_session: ssl.SSLSession | None = None   # CONS: resume the last good session
        self.targets = [resolve_target(t) for t in cfg["targets"]]
        self.target_texts = [str(t) for t in cfg["targets"]]
        self.listeners: list[socket.socket] = []
        self.conns: dict[int, Conn] = {}                # every worker's, by id
        self.clients: set[ControlClient] = set()
        self._ids = itertools.count(1)
        self.open_lock = threading.Lock()
        threads = int(cfg.get("threads") or os.environ.get("SCISTREAM_S2DS_THREADS") or 0)
        if not threads:
            # Plain legs are splice calls with a sliver of Python between them: a second
            # thread only fights over the GIL (measured: -10% on 4 streams). TLS legs spend
            # their time in OpenSSL with the GIL released, so they get one thread per CPU.
            threads = min(os.cpu_count() or 1, MAX_THREADS) if cfg.get("tls") else 1
        if rate > 0:
            threads = 1          # the token buckets live in the main loop
        self.workers = [Worker(self, 0, self.loop)] + [Worker(self, i, Loop()) for i in range(1, threads)]
        self.started = time.time()
        self.control: socket.socket | None = None

    def new_id(self) -> int:
        return next(self._ids)   # atomic under the GIL: workers call it concurrently

    def totals(self) -> dict[str, int]:
        """The counters of every worker, summed."""
        out = {"bytes_in": 0, "bytes_out": 0, "total_connections": 0, "failed_connections": 0,
               "tls_resumed": 0, "tls_sessions_kept": 0}
        for w in self.workers:
            out["bytes_in"] += w.bytes["in"]
            out["bytes_out"] += w.bytes["out"]
            out["total_connections"] += w.total
            out["failed_connections"] += w.failed
            out["tls_resumed"] += w.resumed
            out["tls_sessions_kept"] += w.sessions_kept
        return out

    # -- listeners --------------------------------------------------------
    def listen(self) -> None:
        host = self.cfg["listen_host"]
        for i, port in enumerate(self.cfg["ports"]):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host.strip("[]"), int(port)))
            except OSError:
                s.close()
                raise
            s.listen(4096)
            s.setblocking(False)
            self.listeners.append(s)

    # -- control ----------------------------------------------------------
    def open_control(self) -> None:
        path = self.cfg["control"]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(16)
        s.setblocking(False)
        self.control = s
        self.loop.add(s.fileno(), EPOLLIN, self._control_accept)

    def _control_accept(self, _ev: int) -> None:
        assert self.control is not None
        while True:
            try:
                sock, _ = self.control.accept()
            except (BlockingIOError, OSError):
                return
            self.clients.add(ControlClient(self, sock))

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "ping":
                return {"ok": True, "pid": os.getpid(), "uid": self.uid, "role": self.role}
            if op == "stats":
                return {"ok": True, **self.totals(), "connections": len(self.conns),
                        "threads": len(self.workers), "per_thread": [w.total for w in self.workers],
                        "memory_trims": sum(w.loop.trims for w in self.workers),
                        "memory_trim_pending": any(w.loop.trim_pending for w in self.workers),
                        "targets": self.target_texts,
                        "rate_kbps": int(self.cfg.get("rate_kbps") or 0),
                        "uptime": round(time.time() - self.started, 3)}
            if op == "conns":
                return {"ok": True, "connections": [c.info() for c in list(self.conns.values())]}
            if op == "targets":
                texts = [str(t) for t in msg["targets"]]
                if not texts:
                    raise ValueError("no targets given")
                self.targets = [resolve_target(t) for t in texts]
                self.target_texts = texts
                log.info("retargeted -> %s", texts)
                return {"ok": True}
            if op == "stop":
                log.info("stop requested")
                self.loop.stop()
                return {"ok": True}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return {"ok": False, "error": str(exc)}

    # -- run --------------------------------------------------------------
    def run(self) -> None:
        self.listen()
        self.workers[0].watch(self.listeners)    # it accepts; the others get hand-overs
        for w in self.workers[1:]:
            w.start_thread()
        self.open_control()
        self.loop.catch_signals()
        log.info("session %s %s: listening on %s ports %s -> %s%s%s", self.uid, self.role,
                 self.cfg["listen_host"], self.cfg["ports"], self.target_texts,
                 " (TLS WAN leg)" if self.cfg.get("tls") else "",
                 f", {self.cfg['rate_kbps']} kbit/s" if self.cfg.get("rate_kbps") else "")
        try:
            self.loop.run()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for client in list(self.clients):
            client.flush()
            client.close()
        for w in self.workers[1:]:
            w.stop()
        self.workers[0].close()
        for s in self.listeners:
            self.loop.remove(s.fileno())
            s.close()
        if self.control is not None:
            self.loop.remove(self.control.fileno())
            self.control.close()
            try:
                os.unlink(self.cfg["control"])
            except FileNotFoundError:
                pass
        t = self.totals()
        if FAILURE_LOG.held_total:
            log.warning("%d failed connections were not logged one by one (at most %d lines per %g s)",
                        FAILURE_LOG.held_total, FAILURE_LOG.burst, FAILURE_LOG.window)
        log.info("stopped: in %d, out %d bytes, %d connections", t["bytes_in"], t["bytes_out"],
                 t["total_connections"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s s2ds[%(process)d] %(levelname)s %(message)s")
    try:
        cfg = json.loads(Path(argv[0]).read_text())
        server = S2DS(cfg)
    except (OSError, ValueError, KeyError, IndexError, ssl.SSLError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    # Connections break their own reference cycles when they close; a collector that
    # walks every object of the process many times a second is pure overhead here.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        server.run()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
