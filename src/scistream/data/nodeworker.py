"""A worker process of the node service: ``python -m scistream.data.nodeworker FD INDEX``.

The node service (``scistream.data.node``) starts one worker per core and places each
session's listeners on them. A worker is one ``evloop.Loop`` in one thread, with no
locks: it accepts on the listening sockets it was given (they arrive over its channel,
``FD``, with ``SCM_RIGHTS``; the service keeps its own copy, so a worker that dies takes
no port with it) and relays every connection it accepts (``relay.Conn``: splice on the
plain legs, TLS 1.3 on the WAN leg) until the connection ends. The part of a session a
worker carries is a ``Slice``: the session's targets, TLS contexts (made just after the
session is added, off the path of its first connection; about 20 KB each), rate buckets,
counters and connections. An idle plain session costs a few kilobytes.

Messages from the service (``channel`` frames, each with an ``id`` echoed in the reply):

    {"op": "add", "sid", "cfg", "listeners": [i, ..], "second": [i, ..], "nfds": n}  + n listening
        sockets; those in ``second`` are held until the ``attach`` below
    {"op": "attach", "sid"}                        accept on the held ``second`` listeners too:
        the service sends it once every home worker accepts, so on each listener the home
        worker is first in line (EPOLLEXCLUSIVE) and the add is answered with both in line
    {"op": "targets", "sid", "targets": [..]}      addresses, never names
    {"op": "remove", "sid"}                        -> the slice's final counters
    {"op": "stats", "sids": [..] | null}           -> {"stats": {sid: counters}}
    {"op": "conns", "sid"}                         -> {"connections": [..]}
    {"op": "quiesce"}                              stop accepting (a successor serves)
    {"op": "ping"}                                 -> {"pid", "index", "sessions", "connections"}

The worker exits when its channel closes (the service is gone: its listeners close with it)
or on SIGTERM; either way every connection it carries is reset.
"""
from __future__ import annotations

import gc
import select
import itertools
import logging
import os
import socket
import ssl
import struct
import sys
import time
from typing import Any

from .channel import ChannelClosed, Decoder, encode
from .evloop import EPOLLIN, EPOLLOUT, Loop, PipePool, TokenBucket
from .relay import FAILURE_LOG, Conn, accept_one
from .s2ds import DEFAULT_PIPE, keepalive_setting, resolve_target, tls_contexts

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)
WARM_DELAY = 0.003


class Slice:
    """The listeners and connections of one session in this worker (a ``relay.RelayContext``)."""

    def __init__(self, worker: "NodeWorker", sid: str, cfg: dict, listeners: list[tuple[int, socket.socket]],
                 *, shared: bool = False, home: bool = True) -> None:
        self.worker = worker
        self.sid = sid
        self.cfg = cfg
        self.loop = worker.loop
        self.pipes = worker.pipes
        self.index = worker.index
        self.keepalive = keepalive_setting(cfg.get("keepalive"))
        rate = int(cfg.get("rate_kbps") or 0)
        self.buckets = {d: (TokenBucket(self.loop, rate) if rate > 0 else None) for d in ("in", "out")}
        self.plain_relay = str(cfg.get("plain_relay") or "auto")   # relay.use_copy
        self.max_conns = int(cfg.get("max_conns") or 0)      # this worker's share of the session cap
        self._tls: tuple[ssl.SSLContext | None, ssl.SSLContext | None] | None = None
        self.tls_session: ssl.SSLSession | None = None
        self.targets = [resolve_target(t) for t in cfg["targets"]]
        self.listeners = listeners
        self.shared = shared            # another worker accepts on these listeners too
        self.held: list[tuple[int, socket.socket]] = []   # "second" listeners until "attach"
        self.conns: dict[int, Conn] = {}
        self.bytes = {"in": 0, "out": 0}
        self.total = self.failed = self.refused = self.resumed = self.sessions_kept = 0
        for index, lsock in listeners:
            lsock.setblocking(False)
            self._watch(index, lsock)
        if cfg.get("tls") and home:     # elsewhere: at the first connection, if one comes
            # Made a moment after the add is answered, off the update's path (0.7 ms of a
            # core: at once, it held the core the service and s2cs need to finish the update,
            # measured 1 ms slower from req to first byte for CONS), and usually before the
            # first connection (the client still has the other gateway, or its answer, to go).
            self.loop.call_later(WARM_DELAY, self._warm)

    # -- RelayContext -----------------------------------------------------
    def _contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        if self._tls is None:
            self._tls = tls_contexts(self.cfg)
        return self._tls

    def _warm(self) -> None:
        if not self.listeners:      # removed meanwhile
            return
        try:
            self._contexts()
        except (OSError, ssl.SSLError, ValueError) as exc:  # the first connection says it again
            log.warning("session %s: cannot load its TLS credentials: %s", self.sid, exc)

    @property
    def server_tls(self) -> ssl.SSLContext | None:
        return self._contexts()[0] if self.cfg.get("tls") else None

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self._contexts()[1] if self.cfg.get("tls") else None

    def count(self, direction: str, n: int) -> None:
        self.bytes[direction] += n

    def conn_closed(self, conn: Conn) -> None:
        self.conns.pop(conn.id, None)
        if conn.why:
            self.failed += 1

    # -- accepting --------------------------------------------------------
    def _watch(self, index: int, lsock: socket.socket) -> None:
        self.loop.add(lsock.fileno(), EPOLLIN | (EPOLLEXCLUSIVE if self.shared else 0),
                      lambda ev: self._accept(index, lsock))

    def _accept(self, index: int, lsock: socket.socket) -> None:
        got = accept_one(self.loop, lsock, f"listener {index} of session {self.sid}",
                         lambda: self._resume(index, lsock))
        if got is None:
            return
        sock, peer = got
        if self.shared:
            # To the back of the listener's queue of waiting workers (EPOLLEXCLUSIVE wakes
            # the first idle one): a burst of connections (iperf3 -P 4) is dealt out in turn
            # over the workers instead of piling up on whichever registered first.
            self.loop.remove(lsock.fileno())
            self._watch(index, lsock)
        if self.max_conns and len(self.conns) >= self.max_conns:
            self.refused += 1
            ok, _ = FAILURE_LOG.allow()
            if ok:
                log.warning("session %s: refused a connection from %s: %d open, the cap is %d "
                            "(--max-session-conns)", self.sid, peer, len(self.conns), self.max_conns)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            sock.close()
            return
        targets = self.targets
        try:
            conn = Conn(self, self.worker.new_id(), index, sock, peer, targets[index % len(targets)])
        except OSError as exc:
            log.info("session %s: dropped a connection from %s: %s", self.sid, peer, exc)
            sock.close()
            return
        self.total += 1
        self.conns[conn.id] = conn
        try:
            conn.start()
        except (OSError, ssl.SSLError, ValueError) as exc:   # e.g. its credentials are unreadable
            conn.abort(f"cannot start: {exc}")

    def attach(self) -> None:
        """Accept on the held listeners too, as their second worker (behind the home one)."""
        listeners, self.held = self.held, []
        for index, lsock in listeners:
            lsock.setblocking(False)
            self.listeners.append((index, lsock))
            self._watch(index, lsock)

    def _resume(self, index: int, lsock: socket.socket) -> None:
        if self.loop.running and lsock.fileno() >= 0 and (index, lsock) in self.listeners:
            self._watch(index, lsock)

    # -- control ----------------------------------------------------------
    def retarget(self, texts: list[str]) -> None:
        if not texts:
            raise ValueError("no targets given")
        self.targets = [resolve_target(t) for t in texts]
        self.cfg["targets"] = list(texts)

    def counters(self) -> dict[str, int]:
        return {"bytes_in": self.bytes["in"], "bytes_out": self.bytes["out"], "connections": len(self.conns),
                "total_connections": self.total, "failed_connections": self.failed,
                "refused_connections": self.refused, "tls_resumed": self.resumed,
                "tls_sessions_kept": self.sessions_kept}

    def stop_accepting(self) -> None:
        """Close the session's listeners here, the held ones too; its connections go on."""
        for _, lsock in self.listeners:
            self.loop.remove(lsock.fileno())
            lsock.close()
        for _, lsock in self.held:
            lsock.close()
        self.listeners, self.held = [], []

    def close(self) -> dict[str, int]:
        self.stop_accepting()
        for conn in list(self.conns.values()):
            conn.close(reset=True)
        for b in self.buckets.values():
            if b is not None and b._timer is not None:
                b._timer.cancel()
        return self.counters()


class NodeWorker:
    def __init__(self, chan: socket.socket, index: int) -> None:
        self.chan = chan
        self.index = index
        self.loop = Loop()
        self.pipes = PipePool(DEFAULT_PIPE)
        self.slices: dict[str, Slice] = {}
        self.decoder = Decoder()
        self.outbuf = bytearray()
        self._ids = itertools.count(1)
        chan.setblocking(False)
        self.loop.add(chan.fileno(), EPOLLIN, self._on_chan)

    def new_id(self) -> int:
        return next(self._ids)

    # -- channel ----------------------------------------------------------
    def _on_chan(self, ev: int) -> None:
        if ev & EPOLLOUT:
            self._flush()
        if not ev & ~EPOLLOUT:
            return
        try:
            msgs = self.decoder.feed(self.chan)
        except BlockingIOError:
            return
        except (ChannelClosed, OSError, ValueError) as exc:
            log.info("worker %d: channel closed (%s); stopping", self.index, exc)
            self.loop.stop()
            return
        for msg, fds in msgs:
            reply = self.handle(msg, fds)
            reply["id"] = msg.get("id")
            self.outbuf += encode(reply)
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outbuf:
                n = self.chan.send(self.outbuf)
                del self.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.loop.stop()
            return
        try:
            self.loop.ep.modify(self.chan.fileno(), EPOLLIN | (EPOLLOUT if self.outbuf else 0))
        except OSError:
            pass

    def handle(self, msg: dict, fds: list[int]) -> dict[str, Any]:
        socks = [socket.socket(fileno=fd) for fd in fds]   # owned from here on
        try:
            op = msg.get("op")
            if op == "add":
                sid = msg["sid"]
                listeners = list(zip([int(i) for i in msg["listeners"]], socks))
                socks = []
                second = {int(i) for i in msg.get("second") or ()}
                old = self.slices.pop(sid, None)
                if old is not None:
                    old.close()
                try:
                    self.slices[sid] = Slice(self, sid, dict(msg["cfg"]),
                                             [x for x in listeners if x[0] not in second],
                                             shared=bool(msg.get("shared")), home=bool(msg.get("home", True)))
                except BaseException:
                    for _, s in listeners:
                        s.close()
                    raise
                self.slices[sid].held = [x for x in listeners if x[0] in second]
                return {"ok": True}
            if op == "attach":
                self._slice(msg["sid"]).attach()
                return {"ok": True}
            if op == "targets":
                self._slice(msg["sid"]).retarget([str(t) for t in msg["targets"]])
                return {"ok": True}
            if op == "remove":
                s = self.slices.pop(msg["sid"], None)
                return {"ok": True, "stats": s.close() if s is not None else None}
            if op == "stats":
                sids = msg.get("sids")
                chosen = self.slices if sids is None else {k: self.slices[k] for k in sids if k in self.slices}
                return {"ok": True, "stats": {k: s.counters() for k, s in chosen.items()}}
            if op == "conns":
                return {"ok": True, "connections": [c.info() for c in self._slice(msg["sid"]).conns.values()]}
            if op == "quiesce":        # a successor serves: accept nothing more
                for s in self.slices.values():
                    s.stop_accepting()
                return {"ok": True}
            if op == "ping":
                return {"ok": True, "pid": os.getpid(), "index": self.index, "sessions": len(self.slices),
                        "connections": sum(len(s.conns) for s in self.slices.values())}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError, OSError, ssl.SSLError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        finally:
            for s in socks:
                s.close()

    def _slice(self, sid: str) -> Slice:
        try:
            return self.slices[sid]
        except KeyError:
            raise KeyError(f"no session {sid} in worker {self.index}") from None

    # -- run --------------------------------------------------------------
    def run(self) -> None:
        self.loop.catch_signals()
        try:
            self.loop.run()
        finally:
            for s in list(self.slices.values()):
                s.close()
            self.slices.clear()
            self.pipes.close()
            if FAILURE_LOG.held_total:
                log.warning("%d failed connections were not logged one by one", FAILURE_LOG.held_total)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    index = int(argv[1]) if len(argv) > 1 else 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s s2ds-worker-{index}[%(process)d] %(levelname)s %(message)s")
    chan = socket.socket(fileno=int(argv[0]))
    worker = NodeWorker(chan, index)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    started = time.monotonic()
    worker.run()
    log.info("worker %d stopped after %.0f s", index, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
