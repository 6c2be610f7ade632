"""A worker process of the node service:
``python -m scistream.data.node.worker FD INDEX [--inbox=FD] [--peer=INDEX:FD ...]``.

The node service (``scistream.data.node``) starts one worker per core and places each
session's listeners on them. A worker is one ``engine.loop.Loop`` in one thread, with no
locks: it accepts on the listening sockets it was given (they arrive over its channel,
``FD``, with ``SCM_RIGHTS``; the service keeps its own copy, so a worker that dies takes
no port with it) and relays every connection it accepts (``engine.conn.Conn``: splice on the
plain legs, TLS 1.3 on the WAN leg) until the connection ends. The part of a session a
worker carries is a ``Slice``: the session's targets, TLS contexts (made just after the
session is added, off the path of its first connection; about 20 KB each), rate buckets,
counters and connections. An idle plain session costs a few kilobytes.

A listener with a second worker (``attach``) has its connections dealt out: the home
worker accepts each one, keeps it if it carries no other live connection of that listener
(one whose client has not closed its side), and otherwise gives every other one to the
second worker: it sends the accepted socket (``SCM_RIGHTS``) with the session and
listener to that worker's inbox (``--peer``: the sending ends of the other workers'
inboxes; ``--inbox``: the receiving end of its own), and the second worker relays it as if
it had accepted it. A connection that cannot be handed (the inbox is full) stays. One
handed for a session this worker does not carry yet (it was restarted, and the service has
not given it its sessions back) waits up to ``HANDED_WAIT`` seconds for it.

Messages from the service (``channel`` frames, each with an ``id`` echoed in the reply):

    {"op": "add", "sid", "cfg", "listeners": [i, ..], "home": bool, "udp": [i, ..], "nfds": n}
        + n sockets: the listening sockets at home here (none for a worker that is only
        second), then the UDP sockets of those listeners (``udp``, when the session carries UDP)
    {"op": "attach", "sid", "partners": {"i": worker}}   hand connections of listener i to
        that worker: the service sends it once the second workers carry the session
    {"op": "targets", "sid", "targets": [..]}      addresses, never names
    {"op": "credentials", "sid", "cert_pem", "key_pem", "ca_pem"}   a new WAN leaf, for new connections
    {"op": "remove", "sid"}                        -> the slice's final counters
    {"op": "stats", "sids": [..] | null}           -> {"stats": {sid: counters}}
    {"op": "conns", "sid"}                         -> {"connections": [..]}, each with "tcp": {"lan", "wan"}:
                                                      its legs' last TCP_INFO sample (``engine.tcpinfo``)
    {"op": "quiesce"}                              stop accepting (a successor serves)
    {"op": "ping"}                                 -> {"pid", "index", "sessions", "connections",
                                                       "spin": {"us", "hits", "missed", "gave_way"},
                                                       "memory_trims", "memory_trim_pending",
                                                       "carried": {"connections", "events"}}

The worker exits when its channel closes (the service is gone: its listeners close with it)
or on SIGTERM; either way every connection it carries is reset.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import select
import itertools
import logging
import os
import socket
import ssl
import sys
import time
from typing import Any

from .channel import ChannelClosed, Decoder, encode, recv_note, send_note
from ..engine.conn import FAILURE_LOG, Conn, accept_one, address_text, close_with_reset
from ..engine.loop import DEFAULT_PIPE, EPOLLIN, EPOLLOUT, SPIN_S, Loop, PipePool, TokenBucket
from ..engine.tcpinfo import LegSampler
from ..engine.tlsleg import tls_contexts
from ..engine.udp import udp_relay
from ..spec import keepalive_setting, resolve_target

log = logging.getLogger(__name__)

EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)
HANDED_WAIT = 5.0
WARM_DELAY = 0.003
#: Seconds between two TCP_INFO samples of every open connection's two legs.
SAMPLE_S = 1.0


class Slice:
    """The listeners and connections of one session in this worker (an ``engine.conn.RelayContext``)."""

    def __init__(self, worker: "NodeWorker", sid: str, cfg: dict, listeners: list[tuple[int, socket.socket]],
                 *, home: bool = True, udp: list[tuple[int, socket.socket]] | None = None) -> None:
        self.worker = worker
        self.sid = sid
        self.cfg = cfg
        self.loop = worker.loop
        self.pipes = worker.pipes
        self.index = worker.index
        self.keepalive = keepalive_setting(cfg.get("keepalive"))
        self.wan_congestion = str(cfg.get("wan_congestion") or "")   # engine.conn.RelayContext
        rate = int(cfg.get("rate_kbps") or 0)
        self.buckets = {d: (TokenBucket(self.loop, rate) if rate > 0 else None) for d in ("in", "out")}
        self.plain_relay = str(cfg.get("plain_relay") or "auto")   # copy or splice (conn.Conn._open)
        self.max_conns = int(cfg.get("max_conns") or 0)      # this worker's share of the session cap
        self.tls_session: ssl.SSLSession | None = None
        self.targets = [resolve_target(t) for t in cfg["targets"]]
        self.listeners = listeners
        self.partners: dict[int, int] = {}   # listener -> the worker its connections are dealt to
        self.turn: dict[int, bool] = {}      # per listener: the next busy-time connection is handed
        self.conns: dict[int, Conn] = {}
        self.wan_side = "a" if cfg.get("role") == "PROD" else "b"   # PROD accepts from the WAN
        self.tcp: dict[int, tuple[LegSampler, LegSampler]] = {}   # per connection: (lan, wan)
        self.bytes = {"in": 0, "out": 0}
        self.total = self.failed = self.refused = self.resumed = self.sessions_kept = 0
        self.failure = (0.0, "")      # the last connection that failed: (when, what happened)
        for index, lsock in listeners:
            lsock.setblocking(False)
            self._watch(index, lsock)
        #: the session's UDP here (engine.udp): its sockets of the listeners at home here, and their flows
        self.udp = udp_relay(self.loop, sid, cfg, udp, lambda: self.targets, self.buckets) if udp else None
        if cfg.get("tls") and home:     # elsewhere: at the first connection, if one comes
            # Made a moment after the add is answered, off the update's path (0.7 ms of a
            # core: at once, it held the core the service and s2cs need to finish the update,
            # measured 1 ms slower from req to first byte for CONS), and usually before the
            # first connection (the client still has the other gateway, or its answer, to go).
            self.loop.call_later(WARM_DELAY, self._warm)

    # -- RelayContext -----------------------------------------------------
    @functools.cached_property
    def contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        """(server, client) TLS contexts of the session's WAN leg (made once, again after ``credentials``)."""
        return tls_contexts(self.cfg)

    def _warm(self) -> None:
        if not self.listeners:      # removed meanwhile
            return
        try:
            self.contexts
        except (OSError, ssl.SSLError, ValueError) as exc:  # the first connection says it again
            log.warning("session %s: cannot load its TLS credentials: %s", self.sid, exc)

    @property
    def server_tls(self) -> ssl.SSLContext | None:
        return self.contexts[0] if self.cfg.get("tls") else None

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self.contexts[1] if self.cfg.get("tls") else None

    def count(self, direction: str, n: int) -> None:
        self.bytes[direction] += n

    def conn_closed(self, conn: Conn) -> None:
        self.conns.pop(conn.id, None)
        self.tcp.pop(conn.id, None)
        if conn.why:
            self.failed += 1
            self.failure = (time.time(), f"connection from {address_text(conn.peer)} to "
                                         f"{address_text(conn.target[1])}: {conn.why}")

    # -- accepting --------------------------------------------------------
    def _watch(self, index: int, lsock: socket.socket) -> None:
        # EPOLLEXCLUSIVE: while a successor service takes over, its workers and ours wait on
        # the same listening sockets; one is woken per connection, not all of them
        self.loop.add(lsock.fileno(), EPOLLIN | EPOLLEXCLUSIVE, lambda ev: self._accept(index, lsock))

    def _accept(self, index: int, lsock: socket.socket) -> None:
        got = accept_one(self.loop, lsock, f"listener {index} of session {self.sid}",
                         lambda: self._resume(index, lsock))
        if got is None:
            return
        sock, peer = got
        to = self.partners.get(index)
        # a connection of this listener is live here (its client has not closed its side)
        if to is not None and any(c.listener == index and not c.a.hup for c in self.conns.values()):
            hand = self.turn[index] = not self.turn.get(index, False)
            if hand and self.worker.hand(to, self.sid, index, sock):
                sock.close()
                return
        self.take(index, sock, peer)

    def take(self, index: int, sock: socket.socket, peer: Any = None) -> None:
        """Relay a connection of listener ``index``: accepted here, or handed over (``peer`` None)."""
        if peer is None:
            try:
                peer = sock.getpeername()
            except OSError:          # the client is gone already
                sock.close()
                return
        if self.max_conns and len(self.conns) >= self.max_conns:
            self.refused += 1
            FAILURE_LOG.log(logging.WARNING, "session %s: refused a connection from %s: %d open, the cap "
                            "is %d (--max-session-conns)", self.sid, peer, len(self.conns), self.max_conns)
            close_with_reset(sock)
            return
        targets = self.targets
        try:
            conn = Conn(self, next(self.worker.conn_ids), index, sock, peer, targets[index % len(targets)])
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

    def _resume(self, index: int, lsock: socket.socket) -> None:
        if self.loop.running and lsock.fileno() >= 0 and (index, lsock) in self.listeners:
            self._watch(index, lsock)

    # -- telemetry --------------------------------------------------------
    def sample(self, now: float) -> None:
        """Read TCP_INFO on both legs (lan, wan) of every open connection (``SAMPLE_S``)."""
        for cid, conn in self.conns.items():
            if conn.state != "open":    # both sockets are there
                continue
            samplers = self.tcp.get(cid) or self.tcp.setdefault(cid, (LegSampler(), LegSampler()))
            legs = (conn.b, conn.a) if self.wan_side == "a" else (conn.a, conn.b)
            for sampler, side in zip(samplers, legs):
                sampler.take(side.sock, now)

    def telemetry(self, cid: int) -> dict[str, Any]:
        samplers = self.tcp.get(cid)
        return {} if samplers is None else {"lan": samplers[0].last, "wan": samplers[1].last}

    # -- control ----------------------------------------------------------
    def retarget(self, texts: list[str]) -> None:
        if not texts:
            raise ValueError("no targets given")
        self.targets = [resolve_target(t) for t in texts]
        self.cfg["targets"] = list(texts)

    def counters(self) -> dict[str, int]:
        for conn in self.conns.values():
            conn.settle()
        return {"bytes_in": self.bytes["in"], "bytes_out": self.bytes["out"], "connections": len(self.conns),
                "total_connections": self.total, "failed_connections": self.failed,
                "refused_connections": self.refused, "tls_resumed": self.resumed,
                "tls_sessions_kept": self.sessions_kept, "failure_at": self.failure[0],
                "failure": self.failure[1],
                **({f"udp_{k}": v for k, v in self.udp.counters().items()} if self.udp is not None else {})}

    def stop_accepting(self) -> None:
        """Close the session's listeners here; its connections go on."""
        for _, lsock in self.listeners:
            self.loop.remove(lsock.fileno())
            lsock.close()
        self.listeners = []
        self.partners = {}
        if self.udp is not None:
            self.udp.quiesce()

    def close(self) -> dict[str, int]:
        self.stop_accepting()
        if self.udp is not None:
            self.udp.close()
        for conn in list(self.conns.values()):
            conn.close(reset=True)
        for b in self.buckets.values():
            if b is not None and b._timer is not None:
                b._timer.cancel()
        return self.counters()


class NodeWorker:
    def __init__(self, chan: socket.socket, index: int, inbox: socket.socket | None = None,
                 peers: dict[int, socket.socket] | None = None) -> None:
        self.chan = chan
        self.index = index
        self.inbox = inbox
        self.peers = peers or {}
        # handed connections of sessions not (yet) here: sid -> [(listener, socket, until)]
        self.waiting: dict[str, list[tuple[int, socket.socket, float]]] = {}
        self.loop = Loop(spin=SPIN_S, carry=True)
        self.pipes = PipePool(DEFAULT_PIPE)
        self.slices: dict[str, Slice] = {}
        self.decoder = Decoder()
        self.outbuf = bytearray()
        self.conn_ids = itertools.count(1)     # of this worker's connections
        self.loop.call_later(SAMPLE_S, self._sample)
        chan.setblocking(False)
        self.loop.add(chan.fileno(), EPOLLIN, self._on_chan)
        if inbox is not None:
            inbox.setblocking(False)
            self.loop.add(inbox.fileno(), EPOLLIN, self._on_inbox)

    # -- connections handed between workers -------------------------------
    def hand(self, to: int, sid: str, index: int, sock: socket.socket) -> bool:
        """Send an accepted connection to worker ``to``; False if it cannot go (it stays)."""
        peer = self.peers.get(to)
        if peer is None:
            return False
        try:
            send_note(peer, {"sid": sid, "listener": index}, sock.fileno())
        except OSError:         # its inbox is full (the worker is slow, or restarting)
            return False
        return True

    def _on_inbox(self, ev: int) -> None:
        assert self.inbox is not None
        for _ in range(64):        # then the other events get their turn
            try:
                data, fds = recv_note(self.inbox)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("worker %d: inbox: %s", self.index, exc)
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            try:
                note = json.loads(data)
                sid, index = str(note["sid"]), int(note["listener"])
                if len(socks) != 1:
                    raise ValueError(f"{len(socks)} sockets with one note")
                sock = socks.pop()
                sock.setblocking(False)
                if sid in self.slices:
                    self.slices[sid].take(index, sock)
                else:       # this worker restarted and has not got the session back yet
                    if not self.waiting:
                        self.loop.call_later(1.0, self._expire)
                    self.waiting.setdefault(sid, []).append((index, sock, time.monotonic() + HANDED_WAIT))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("worker %d: a bad note in the inbox: %s", self.index, exc)
            finally:
                for x in socks:
                    x.close()

    def _sample(self) -> None:
        now = time.monotonic()
        try:
            for slc in self.slices.values():
                slc.sample(now)
        except Exception:   # telemetry must never stop the relay
            log.exception("worker %d: sampling TCP_INFO failed", self.index)
        self.loop.call_later(SAMPLE_S, self._sample)


    def _expire(self) -> None:
        now = time.monotonic()
        for sid, handed in list(self.waiting.items()):
            for _, sock, until in handed:
                if until <= now:
                    log.info("session %s: a connection handed here waited %.0f s for the session; closed",
                             sid, HANDED_WAIT)
                    sock.close()
            self.waiting[sid] = [item for item in handed if item[2] > now]
            if not self.waiting[sid]:
                del self.waiting[sid]
        if self.waiting:
            self.loop.call_later(1.0, self._expire)

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
        with contextlib.suppress(OSError):
            self.loop.ep.modify(self.chan.fileno(), EPOLLIN | (EPOLLOUT if self.outbuf else 0))

    def handle(self, msg: dict, fds: list[int]) -> dict[str, Any]:
        socks = [socket.socket(fileno=fd) for fd in fds]   # owned from here on
        try:
            op = msg.get("op")
            if op == "add":
                sid = msg["sid"]
                tcp = [int(i) for i in msg["listeners"]]
                listeners = list(zip(tcp, socks))
                udp = list(zip([int(i) for i in msg.get("udp") or ()], socks[len(tcp):]))   # after the TCP ones
                old = self.slices.pop(sid, None)
                if old is not None:
                    old.close()
                self.slices[sid] = Slice(self, sid, dict(msg["cfg"]), listeners,
                                         home=bool(msg.get("home", True)), udp=udp)
                socks = socks[len(listeners) + len(udp):]     # the slice's now; any others are closed
                for index, sock, _ in self.waiting.pop(sid, ()):
                    self.slices[sid].take(index, sock)
            elif op == "attach":
                slc = self._slice(msg["sid"])
                slc.partners = {int(i): int(w) for i, w in (msg.get("partners") or {}).items()
                                if int(w) in self.peers and int(w) != self.index}
            elif op == "targets":
                self._slice(msg["sid"]).retarget([str(t) for t in msg["targets"]])
            elif op == "credentials":     # a new WAN leaf: new connections get it
                slc = self._slice(msg["sid"])
                slc.cfg.update({k: str(msg[k]) for k in ("cert_pem", "key_pem", "ca_pem")})
                slc.__dict__.pop("contexts", None)     # made again for the next connection
                slc.tls_session = None     # a session of the old context cannot be resumed in the new
            elif op == "quiesce":        # a successor serves: accept nothing more
                for s in self.slices.values():
                    s.stop_accepting()
            elif op == "remove":
                s = self.slices.pop(msg["sid"], None)
                return {"ok": True, "stats": s.close() if s is not None else None}
            elif op == "stats":
                sids = msg.get("sids")
                chosen = self.slices if sids is None else {k: self.slices[k] for k in sids if k in self.slices}
                return {"ok": True, "stats": {k: s.counters() for k, s in chosen.items()}}
            elif op == "conns":
                slc = self._slice(msg["sid"])
                return {"ok": True, "connections": [{**c.info(), "tcp": slc.telemetry(c.id)}
                                                    for c in slc.conns.values()]}
            elif op == "ping":
                lp = self.loop
                return {"ok": True, "pid": os.getpid(), "index": self.index, "sessions": len(self.slices),
                        "connections": sum(len(s.conns) for s in self.slices.values()),
                        "spin": {"us": round(lp.spin * 1e6), "hits": lp.spin_hits, "missed": lp.spin_missed,
                                 "gave_way": lp.spin_gave_way}, "memory_trims": lp.trims,
                        "memory_trim_pending": lp.trim_pending,
                        "carried": {"connections": lp.hub.attached if lp.hub is not None else 0,
                                    "events": lp.hub.carried if lp.hub is not None else None}}
            else:
                return {"ok": False, "error": f"unknown op {op!r}"}
            return {"ok": True}
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
            for s in (self.inbox, *self.peers.values(), *(w[1] for ws in self.waiting.values() for w in ws)):
                if s is not None:
                    s.close()
            if FAILURE_LOG.held_total:
                log.warning("%d failed connections were not logged one by one", FAILURE_LOG.held_total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scistream.data.node.worker",
                                description="A worker of the node service (started by it).")
    p.add_argument("fd", type=int, help="the channel to the service")
    p.add_argument("index", type=int, nargs="?", default=0)
    p.add_argument("--inbox", type=int, help="the reading end of this worker's inbox")
    p.add_argument("--peer", action="append", default=[], metavar="INDEX:FD",
                   help="the sending end of another worker's inbox")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    index = args.index
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s s2ds-worker-{index}[%(process)d] %(levelname)s %(message)s")
    chan = socket.socket(fileno=args.fd)
    inbox = socket.socket(fileno=args.inbox) if args.inbox is not None else None
    peers = {int(w): socket.socket(fileno=int(fd)) for w, _, fd in (x.partition(":") for x in args.peer)}
    worker = NodeWorker(chan, index, inbox, peers)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    started = time.monotonic()
    worker.run()
    log.info("worker %d stopped after %.0f s", index, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
