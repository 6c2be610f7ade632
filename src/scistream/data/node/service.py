"""The node service: one long-lived data plane for every Builtin session of a gateway node.

    s2ds serve --socket /run/scistream/node.sock --workers 4

One service process owns the control socket and every session's listening sockets; it
runs ``--workers`` worker processes (``scistream.data.node.worker``, default one per
core) that accept and relay the connections. A session is added, re-targeted,
inspected and removed over the control socket, in place: no process starts, so a
session is ready in a millisecond and an idle one costs a few kilobytes.

* **Placement.** A new session goes to the least loaded worker (fewest listeners).
  A session with several listeners is spread over the workers, listener *i* at home on
  the *i*-th least loaded one, and each listener has a second worker: the home worker
  accepts every connection, keeps it when it carries no other live connection of that
  listener, and otherwise hands every other one to the second worker (the accepted
  socket over ``SCM_RIGHTS``, through the second worker's inbox, a datagram socket pair
  the service keeps). So the streams of a session are dealt out over two cores even on
  one listener, while connections that come one after another stay with one worker and
  wake no other (a second worker that accepted on the listener itself cost each such
  connection about 70 µs, ``docs/performance.md``). A rate-limited session stays
  on one worker (its token buckets are one budget), and so does a session with a
  connection cap (``max_conns``, ``s2cs --max-session-conns``), which its worker counts
  exactly; a capped session with several listeners spread over workers gets a share of
  the cap on each, in proportion to its listeners there.
* **Copy or splice.** Plain legs are relayed with ``splice`` (no copy to user space) or
  ``recv``/``send`` through a buffer, whichever costs less per byte: ``--plain-relay
  auto`` (the default) copies when both ends of a leg are loopback addresses, where the
  receiving application pays for spliced pages more than the copy costs, and splices
  otherwise; ``copy`` and ``splice`` force one (``docs/performance.md``).
* **Isolation.** The service keeps its own copy of every listening socket and hands
  duplicates to the workers (``SCM_RIGHTS``). When a worker dies (a crash, ``kill -9``)
  only the connections it carried are lost: the service starts a new worker at once and
  gives it the same listeners, which never stopped listening (connections that arrive
  meanwhile wait in the backlog). The counters of the dead worker's sessions keep what
  was last read from it.
* **Restart without refusing a connection.** A second ``s2ds serve`` on the same socket
  takes over from the running one: the old service hands it every session and listening
  socket, the new one starts its workers and its control socket, then the old one stops.
  The listeners stay open throughout, so no new connection is refused; connections that
  the old workers carried are reset (``s2ds restart`` does this for you).

Control socket: one JSON object per line in, one per line out, with the request's
``id`` (if any) echoed, answered in any order.

    {"op": "ping"}                          -> {"ok", "pid", "workers": [pids], "sessions": n, "argv"}
    {"op": "add", "sid", "cfg"}             -> {"ok", "workers": [index per listener]}
    {"op": "targets", "sid", "targets"}     -> {"ok"}
    {"op": "credentials", "sid", "wan_secret", "cert_until"} -> {"ok"}   a new WAN leaf (new connections)
    {"op": "remove", "sid"}                 -> {"ok", "stats"}        (unknown sid: ok, stats null)
    {"op": "stats", "sid"}                  -> {"ok", "stats"}        (no sid: {"stats": {sid: ..}})
    {"op": "conns", "sid"}                  -> {"ok", "connections": [..]}
    {"op": "config", "sid"}                 -> {"ok", "cfg", "workers": [index per listener]}
    {"op": "list"}                          -> {"ok", "sessions": {sid: {"workers", "failed"}}}
    {"op": "status"}                        -> {"ok", "workers": [{"index", "pid", "sessions", "listeners", "spin",
                                                "carried", "restarts", "memory_trims",
                                                "memory_trim_pending"}], "sessions": n}
    {"op": "watch"}                         -> {"ok"}; then {"event": "failed", "sid", "reason"} lines
    {"op": "shutdown"}                      -> {"ok"}; then the service stops
    {"op": "handover", "to": PATH}          (a successor asks; see above)

``cfg`` is a session's half: uid, role,
listen_host, ports, targets (addresses), rate_kbps, wan_secret (hex: a TLS WAN leg), keepalive,
``max_conns``, and ``udp`` (true: a UDP socket beside each listener, ``engine.udp``; sealed with a
key derived from wan_secret when there is one), ``udp_max_flows``, ``udp_idle``. Errors: ``{"ok": false, "error": "...", "code": "invalid" | "busy" |
"unknown"}``; ``busy`` is worth a retry (a handover is under way).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .channel import ChannelClosed, Decoder, encode, send_frame, MAX_FDS
from ..spec import resolve_target
from .entry import (Entry, OpError, add_counters, bind_listeners, bind_udp_listeners, check_cfg, newest_failure, with_credentials,
                    zero_counters)
from .workerproc import WorkerProc

log = logging.getLogger(__name__)

class Node:
    def __init__(self, path: Path, workers: int, plain_relay: str = "auto") -> None:
        self.path = path
        self.plain_relay = plain_relay
        self.workers = [WorkerProc(self, i) for i in range(max(1, workers))]
        self.sessions: dict[str, Entry] = {}
        self.watchers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None
        self.stopped = asyncio.Event()
        self.handing_over = False
        self.handover_done = asyncio.Event()
        self.closing = False
        self.restarting: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.started = time.time()
        self.tcp: asyncio.AbstractServer | None = None  # a facility's control servers (node.facility)
        self.port_range: range | None = None            # remote adds must stay in it

    # -- life -------------------------------------------------------------
    async def start(self, take_over: bool = True) -> None:
        inherited: list[tuple[dict, list[int]]] = []
        predecessor = None
        if take_over and self.path.exists():
            try:
                predecessor, inherited = await self._take_over()
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
                log.info("no running service on %s to take over (%s); starting fresh", self.path, exc)
        await asyncio.gather(*(w.spawn() for w in self.workers))
        for info, fds in inherited:
            await self._adopt(info, fds)
        await self._listen()
        if predecessor is not None:
            reader, writer = predecessor
            writer.write(json.dumps({"op": "handover_done", "id": "done"}).encode() + b"\n")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await writer.drain()
                await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            log.info("took over %d sessions from the previous service", len(inherited))
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={len(self.sessions)} sessions")
        log.info("node service on %s: %d workers %s, pid %d", self.path, len(self.workers),
                 [w.proc.pid for w in self.workers if w.proc], os.getpid())

    async def _listen(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(tmp), limit=16 << 20)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)         # atomic: the socket path always answers

    async def close(self) -> None:
        self.closing = True
        for server in (self.server, self.tcp):     # the control sockets
            if server is not None:
                server.close()
        if self.handover_done.is_set():
            # the successor's workers accept on the same sockets: ours stop accepting first,
            # so only the connections they already carry are reset
            await asyncio.gather(*(w.call({"op": "quiesce"}, timeout=5) for w in self.workers if w.alive),
                                 return_exceptions=True)
        for w in self.workers:
            await w.stop()
            for s in w.inbox:
                s.close()
        for e in self.sessions.values():
            e.close()
        for t in list(self.tasks):
            t.cancel()
        if not self.handover_done.is_set():
            with contextlib.suppress(OSError):
                if self.path.exists() and self.server is not None:
                    self.path.unlink()
        log.info("node service stopped")

    # -- workers ----------------------------------------------------------
    def worker_lost(self, w: WorkerProc, why: str) -> None:
        if self.closing:
            return
        carried = [e for e in self.sessions.values() if w.index in e.workers()]
        log.error("%s; %d sessions had listeners on it, restarting it", why, len(carried))
        for e in carried:      # what the worker said last stays counted, with no open connection
            seen = dict(e.seen.pop(w.index, None) or zero_counters())
            seen["connections"] = seen["udp_flows"] = 0
            add_counters(e.base, seen)
        if w.index not in self.restarting:
            self.restarting.add(w.index)
            self._spawn(self._restart(w))

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _restart(self, w: WorkerProc) -> None:
        delay = 0.0
        # A worker that dies as soon as it starts (a broken install, a session that crashes
        # it at once) is started again with a growing pause, not in a tight loop.
        w.quick_deaths = w.quick_deaths + 1 if time.monotonic() - w.started < 1.0 else 0
        if w.quick_deaths > 1:
            pause = min(0.05 * 2 ** w.quick_deaths, 10.0)
            log.error("worker %d died %d times in a row within a second of its start; next start in %.1f s",
                      w.index, w.quick_deaths, pause)
            await asyncio.sleep(pause)
        try:
            while not self.closing:
                w.restarts += 1
                try:
                    if w.proc is not None and w.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            w.proc.kill()
                        await w.proc.wait()
                    await w.spawn()
                    for e in list(self.sessions.values()):
                        if w.index in e.workers():
                            reply = await w.call(*e.share(w.index))
                            if reply.get("ok") and w.index in e.spreading():
                                reply = await w.call({"op": "attach", "sid": e.sid,
                                                      "partners": e.partners(w.index)})
                            if not reply.get("ok"):
                                self._fail(e, f"worker {w.index} restarted but refused the session: "
                                              f"{reply.get('error')}")
                    log.info("worker %d is back (pid %d); its sessions accept again", w.index, w.proc.pid)
                    return
                except (ChannelClosed, asyncio.TimeoutError, OSError) as exc:
                    delay = min(max(delay * 2, 0.05), 1.0)
                    log.error("worker %d: restart failed (%s); again in %.2f s", w.index, exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self.restarting.discard(w.index)

    def _fail(self, e: Entry, reason: str) -> None:
        log.error("session %s: %s", e.sid, reason)
        e.failed = reason
        line = json.dumps({"event": "failed", "sid": e.sid, "reason": reason}).encode() + b"\n"
        for wr in list(self.watchers):
            with contextlib.suppress(Exception):
                wr.write(line)

    def _place(self, n: int, cfg: dict) -> tuple[list[int], list[int | None]]:
        """The home worker of each listener (least loaded first, round robin), and a second
        worker that the home worker hands connections to, so that several streams on one
        listener use two cores.
        A rate-limited session stays on one worker (its buckets are one budget), and so does
        one with a connection cap (counted exactly there)."""
        order = sorted(self.workers, key=lambda w: (w.listeners, w.index))
        alone = bool(int(cfg.get("rate_kbps") or 0)) or bool(int(cfg.get("max_conns") or 0))
        if alone or len(order) == 1:
            return [order[0].index] * n, [None] * n
        home = [order[i % len(order)].index for i in range(n)]
        return home, [order[(i + 1) % len(order)].index for i in range(n)]

    # -- control socket -----------------------------------------------------
    async def listen_tcp(self, host: str, port: int, ssl_ctx: Any, token: bytes) -> int:
        """Serve the control protocol on TCP with TLS to a facility's control servers: the
        first line must be ``{"op": "auth", "token": ...}`` with the facility's node token
        (within 10 s), or the connection is closed. Over TCP a session's WAN credentials
        come as its ``wan_secret`` (hex) and are derived here; ports must lie in the node's
        range; ``shutdown`` and ``handover`` stay local. Returns the bound port."""
        import hmac

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
                msg = json.loads(line) if line.strip() else {}
                ok = (isinstance(msg, dict) and msg.get("op") == "auth"
                      and hmac.compare_digest(str(msg.get("token") or "").encode(), token))
            except (OSError, ValueError, asyncio.TimeoutError):
                ok, msg = False, {}
            reply = {"ok": True} if ok else {"ok": False, "error": "this node obeys only its facility's "
                                             "control servers: wrong or missing node token", "code": "denied"}
            with contextlib.suppress(OSError):
                writer.write(json.dumps({**reply, "id": msg.get("id") if isinstance(msg, dict) else None}
                                        ).encode() + b"\n")
                await writer.drain()
            if ok:
                await self._client(reader, writer, remote=True)
            else:
                log.warning("control connection from %s refused: no valid node token",
                            writer.get_extra_info("peername"))
                writer.close()

        # reuse_port: a successor (s2ds restart) listens beside its predecessor until it goes
        self.tcp = await asyncio.start_server(client, host.strip("[]"), port, ssl=ssl_ctx, limit=16 << 20,
                                              reuse_port=True)
        return self.tcp.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      remote: bool = False) -> None:
        lock = asyncio.Lock()
        pending: set[asyncio.Task] = set()

        async def answer(msg: dict) -> None:
            try:
                if remote and msg.get("op") in ("shutdown", "handover", "handover_done"):
                    raise OpError(f"{msg.get('op')} is for the node's own operator (its unix socket)")
                if remote and msg.get("op") == "add":
                    msg = {**msg, "cfg": self._remote_cfg(msg.get("cfg"))}
                reply = await self.handle(msg, writer)
            except OpError as exc:
                reply = {"ok": False, "error": str(exc), "code": exc.code}
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                log.exception("control op %r failed", msg.get("op"))
                reply = {"ok": False, "error": f"internal error: {exc!r}", "code": "unknown"}
            if "id" in msg:
                reply["id"] = msg["id"]
            async with lock:
                with contextlib.suppress(OSError):
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()

        try:
            async for line in reader:      # until EOF; OSError or ValueError (a line too long): the end
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    async with lock:
                        writer.write(json.dumps({"ok": False, "error": f"bad request: {exc}",
                                                 "code": "invalid"}).encode() + b"\n")
                    continue
                t = asyncio.create_task(answer(msg))
                pending.add(t)
                t.add_done_callback(pending.discard)
        except (OSError, ValueError):
            pass
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self.watchers.discard(writer)
            writer.close()

    async def handle(self, msg: dict, writer: asyncio.StreamWriter) -> dict:
        op = msg.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "workers": [w.proc.pid if w.proc else None for w in self.workers],
                    "sessions": len(self.sessions), "argv": sys.argv[1:], "uptime": round(time.time() - self.started, 3)}
        if op in ("add", "remove", "targets", "credentials") and self.handing_over:
            raise OpError("the node service is handing over to a new instance; retry", "busy")
        if op == "add":
            return await self.add(str(msg.get("sid") or ""), msg.get("cfg"))
        if op == "remove":
            return await self.remove(str(msg.get("sid") or ""))
        if op == "targets":
            return await self.retarget(self._entry(msg), msg.get("targets"))
        if op == "credentials":
            return await self.new_credentials(self._entry(msg), msg)
        if op == "stats":
            if msg.get("sid") is None:
                return {"ok": True, "stats": await self.all_stats()}
            return {"ok": True, "stats": await self.stats(self._entry(msg))}
        if op == "conns":
            e = self._entry(msg)
            replies = await self._ask(e, {"op": "conns", "sid": e.sid})
            return {"ok": True, "connections": [c for r in replies for c in r.get("connections") or []]}
        if op == "config":
            e = self._entry(msg)
            shown = {k: v for k, v in e.cfg.items()
                     if k not in ("key_pem", "cert_pem", "ca_pem", "ticket_keys", "udp_key")}
            return {"ok": True, "cfg": shown, "workers": e.placement, "also": e.also}
        if op == "list":
            return {"ok": True, "sessions": {sid: {"workers": e.workers(), "failed": e.failed}
                                             for sid, e in self.sessions.items()}}
        if op == "status":
            pings = await asyncio.gather(*(w.call({"op": "ping"}, timeout=2) for w in self.workers),
                                         return_exceptions=True)
            return {"ok": True, "pid": os.getpid(), "sessions": len(self.sessions),
                    "workers": [{"index": w.index, "pid": w.proc.pid if w.proc else None, "alive": w.alive,
                                 "listeners": w.listeners, "restarts": w.restarts,
                                 "sessions": sum(1 for e in self.sessions.values() if w.index in e.placement),
                                 **{k: None if isinstance(p, BaseException) else p.get(k)
                                    for k in ("spin", "carried", "memory_trims", "memory_trim_pending")}}
                                for w, p in zip(self.workers, pings)]}
        if op == "watch":
            self.watchers.add(writer)
            return {"ok": True}
        if op == "shutdown":
            self.stopped.set()
            return {"ok": True}
        if op == "handover":
            return await self._hand_over(str(msg.get("to") or ""))
        if op == "handover_done":
            self.handover_done.set()
            self.stopped.set()
            return {"ok": True}
        raise OpError(f"unknown op {op!r}")

    def _entry(self, msg: dict) -> Entry:
        sid = str(msg.get("sid") or "")
        try:
            return self.sessions[sid]
        except KeyError:
            raise OpError(f"no session {sid!r} in this node service", "unknown") from None

    def _remote_cfg(self, cfg: Any) -> dict:
        """A facility's add: the ports must lie in the node's range; paths on another host
        mean nothing here (the credentials come as the session's secret)."""
        if not isinstance(cfg, dict):
            raise OpError("cfg must be an object")
        cfg = dict(cfg)
        if self.port_range is not None:
            bad = [p for p in cfg.get("ports") or [] if not isinstance(p, int) or p not in self.port_range]
            if bad:
                raise OpError(f"ports {bad} are outside this node's range "
                              f"{self.port_range.start}-{self.port_range.stop - 1}")
        for k in ("cert_pem", "key_pem", "ca_pem", "ticket_keys", "udp_key"):
            cfg.pop(k, None)
        return cfg

    # -- operations ---------------------------------------------------------
    async def add(self, sid: str, cfg: Any) -> dict:
        if not sid:
            raise OpError("sid is required")
        cfg = check_cfg(with_credentials(cfg))
        cfg.setdefault("plain_relay", self.plain_relay)
        old = self.sessions.get(sid)
        if old is not None:
            if old.cfg["ports"] != cfg["ports"]:
                raise OpError(f"session {sid} exists with other ports {old.cfg['ports']}")
            await self.retarget(old, cfg["targets"])          # an add retried: same session
            return {"ok": True, "workers": old.placement}
        socks = bind_listeners(str(cfg["listen_host"]), cfg["ports"])
        try:
            udp_socks = bind_udp_listeners(cfg)
        except BaseException:
            for x in socks:
                x.close()
            raise
        e = self._enter(sid, cfg, socks, udp_socks)
        try:
            await self._install(e)
        except BaseException:
            await self.remove(sid)
            raise
        log.info("session %s %s: listening on %s ports %s -> %s (workers %s)%s%s", sid, cfg["role"],
                 cfg["listen_host"], cfg["ports"], cfg["targets"], e.placement,
                 " (TLS WAN leg)" if cfg.get("tls") else "", " (UDP too)" if udp_socks else "")
        return {"ok": True, "workers": e.placement}

    async def remove(self, sid: str) -> dict:
        e = self.sessions.pop(sid, None)
        if e is None:
            return {"ok": True, "stats": None}
        total = dict(e.base)
        for r in await self._ask(e, {"op": "remove", "sid": sid}, strict=False):
            add_counters(total, r.get("stats"))
        for i in e.placement:
            self.workers[i].listeners -= 1
        e.close()
        total["connections"] = total["udp_flows"] = 0
        log.info("session %s removed: in %d, out %d bytes, %d connections", sid, total["bytes_in"],
                 total["bytes_out"], total["total_connections"])
        return {"ok": True, "stats": total}

    async def retarget(self, e: Entry, targets: Any) -> dict:
        if not isinstance(targets, list) or not targets:
            raise OpError("no targets given")
        texts = [str(t) for t in targets]
        try:
            for t in texts:
                resolve_target(t)
        except ValueError as exc:
            raise OpError(str(exc)) from None
        e.cfg["targets"] = texts
        await self._ask(e, {"op": "targets", "sid": e.sid, "targets": texts})
        log.info("session %s retargeted -> %s", e.sid, texts)
        return {"ok": True}

    async def new_credentials(self, e: Entry, msg: dict) -> dict:
        """A new WAN leaf for the session (``wan_secret``, ``cert_until``), for its new connections."""
        if not e.cfg.get("tls"):
            raise OpError(f"session {e.sid} has no TLS WAN leg")
        made = with_credentials({"uid": e.cfg.get("uid"), "wan_secret": msg.get("wan_secret"),
                                 "cert_until": msg.get("cert_until")})
        if not isinstance(made, dict) or not made.get("cert_pem"):
            raise OpError("wan_secret is required")
        if e.cfg.get("ca_pem") and made["ca_pem"] != e.cfg["ca_pem"]:
            raise OpError(f"that wan_secret is not session {e.sid}'s")
        pems = {k: made[k] for k in ("cert_pem", "key_pem", "ca_pem")}
        await self._ask(e, {"op": "credentials", "sid": e.sid, **pems})
        e.cfg.update(pems)
        log.info("session %s: WAN certificate issued again", e.sid)
        return {"ok": True}

    async def stats(self, e: Entry) -> dict:
        idx = e.workers()
        replies = await asyncio.gather(*(self.workers[i].call({"op": "stats", "sids": [e.sid]}) for i in idx),
                                       return_exceptions=True)
        return self._total(e, dict(zip(idx, replies)))

    async def all_stats(self) -> dict[str, dict]:
        per_worker = await asyncio.gather(*(w.call({"op": "stats", "sids": None}) for w in self.workers),
                                          return_exceptions=True)
        return {sid: self._total(e, per_worker) for sid, e in self.sessions.items()}

    @staticmethod
    def _total(e: Entry, replies: Any) -> dict:
        """A session's counters: its base plus each of its workers' stats reply (``replies[i]``);
        a worker that did not answer counts what it reported last, with no open connection."""
        total = dict(e.base)
        for i in e.workers():
            r = replies[i]
            got = None if not r or isinstance(r, BaseException) else (r.get("stats") or {}).get(e.sid)
            if got is None:
                got = {**e.seen.get(i, zero_counters()), "connections": 0, "udp_flows": 0}
            else:
                e.seen[i] = got
            add_counters(total, got)
        return {**total, "failed": e.failed, **newest_failure(e)}

    async def _ask(self, e: Entry, msg: dict, *, strict: bool = True) -> list:
        """Send ``msg`` to every worker carrying ``e``. strict: any failure is an error;
        otherwise failures (a worker restarting) are skipped."""
        idx = e.workers()
        replies = await asyncio.gather(*(self.workers[i].call(msg) for i in idx), return_exceptions=True)
        out = []
        for r in replies:
            if isinstance(r, BaseException) or not r.get("ok"):
                if strict:
                    why = r if isinstance(r, BaseException) else r.get("error")
                    raise OpError(f"session {e.sid}: {why}", "busy" if isinstance(r, BaseException) else "invalid")
                continue
            out.append(r)
        return out

    def _enter(self, sid: str, cfg: dict, socks: list[socket.socket],
               udp_socks: list[socket.socket] = ()) -> Entry:
        """A new session's entry, its listeners placed on the workers and counted there."""
        e = Entry(sid, cfg, socks, *self._place(len(socks), cfg), udp_socks=list(udp_socks))
        for i in e.placement:
            self.workers[i].listeners += 1
        self.sessions[sid] = e
        return e

    async def _install(self, e: Entry) -> None:
        """Give the session to its workers: each takes its share and accepts at once on the
        listeners at home there; then, once every worker carries the session, the home
        workers learn where to hand connections (a connection handed to a worker that does
        not know its session yet would be lost). Both steps are answered before the session
        is, so the first streams of a session are dealt out already."""
        msgs = [[(i, e.share(i)) for i in e.workers()],
                [(i, ({"op": "attach", "sid": e.sid, "partners": e.partners(i)},)) for i in e.spreading()]]
        for step in msgs:
            replies = await asyncio.gather(*(self.workers[i].call(*m) for i, m in step),
                                           return_exceptions=True)
            for r in replies:
                if isinstance(r, BaseException):
                    raise OpError(f"a worker did not take the session: {r}", "busy")
                if not r.get("ok"):
                    raise OpError(f"cannot start the session: {r.get('error')}")

    async def _adopt(self, info: dict, fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(False)
        n_udp = int(info.get("udp") or 0)        # the UDP sockets come after the TCP listeners
        udp_socks = socks[len(socks) - n_udp:] if n_udp else []
        e = self._enter(info["sid"], info["cfg"], socks[:len(socks) - n_udp], udp_socks)
        e.base = {**zero_counters(), **(info.get("base") or {})}
        try:
            await self._install(e)
        except OpError as exc:
            self._fail(e, f"taken over, but a worker refused it: {exc}")

    # -- handover -------------------------------------------------------------
    async def _take_over(self) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], list]:
        """Ask the service running on our socket for its sessions and listeners."""
        loop = asyncio.get_running_loop()
        ho_path = self.path.with_name(f".{self.path.name}.ho.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            ho_path.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            lsock.bind(str(ho_path))
        finally:
            os.umask(old)
        lsock.listen(1)
        lsock.setblocking(False)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 2)
            writer.write(json.dumps({"op": "handover", "to": str(ho_path), "id": "ho"}).encode() + b"\n")
            await writer.drain()
            conn, _ = await asyncio.wait_for(loop.sock_accept(lsock), 10)
            with conn:
                got = await asyncio.to_thread(_receive_sessions, conn, time.monotonic() + 30)
            reply = json.loads(await asyncio.wait_for(reader.readline(), 10) or b"{}")
            if not reply.get("ok"):
                for _, fds in got:
                    for fd in fds:
                        os.close(fd)
                raise ValueError(f"the running service refused the handover: {reply.get('error')}")
            return (reader, writer), got
        finally:
            lsock.close()
            with contextlib.suppress(FileNotFoundError):
                ho_path.unlink()

    async def _hand_over(self, to: str) -> dict:
        """Give every session and listening socket to a successor at ``to``; stop once it
        says it serves (``handover_done``), or carry on if it never does."""
        if self.handing_over:
            raise OpError("a handover is already under way", "busy")
        wide = [e.sid for e in self.sessions.values() if len(e.socks) + len(e.udp_socks) > MAX_FDS]
        if wide:
            raise OpError(f"sessions of more than {MAX_FDS} listeners cannot be handed over: {wide}")
        self.handing_over = True
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            with sock:
                await asyncio.wait_for(loop.sock_connect(sock, to), 5)
                sock.settimeout(10)     # blocking, as send_frame wants, but bounded
                for e in self.sessions.values():
                    base = dict(e.base)
                    for seen in e.seen.values():
                        add_counters(base, seen)
                    info = {"sid": e.sid, "cfg": e.cfg, "base": base, "udp": len(e.udp_socks)}
                    fds = [s.fileno() for s in e.socks + e.udp_socks]
                    send_frame(sock, encode({"session": info, "nfds": len(fds)}), fds)
                send_frame(sock, encode({"done": True}))
        except BaseException:
            self.handing_over = False
            raise
        log.info("handed %d sessions over to a new service; waiting for it to take over", len(self.sessions))
        self._spawn(self._await_successor())
        return {"ok": True}

    async def _await_successor(self) -> None:
        try:
            await asyncio.wait_for(self.handover_done.wait(), 60)
            log.info("the new service took over; stopping (connections of the old workers are reset)")
        except asyncio.TimeoutError:
            log.error("the new service never said it took over; carrying on")
            self.handing_over = False


def _receive_sessions(conn: socket.socket, deadline: float) -> list[tuple[dict, list[int]]]:
    """What a predecessor hands over (blocking, in a thread): each session and its sockets,
    until it says it is done; TimeoutError past ``deadline``."""
    got: list[tuple[dict, list[int]]] = []
    dec = Decoder()
    while True:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        for msg, fds in dec.feed(conn):
            if msg.get("done"):
                return got
            got.append((msg["session"], fds))


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify units, deploy/s2ds.service) we are ready, and which process
    is the service's main one: a successor that took over says so. No-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError as exc:
        log.warning("cannot notify systemd on %s: %s", addr, exc)


async def serve(path: Path, workers: int, take_over: bool = True, plain_relay: str = "auto",
                member: dict | None = None) -> int:
    """Run the service; ``member``: the options of a facility member (``data.node.facility``)."""
    node = Node(path, workers, plain_relay)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stopped.set)
    membership = None
    try:
        await node.start(take_over=take_over)
        if member is not None:
            from .facility import Membership
            membership = Membership(node, **member)
            await membership.start()
        await node.stopped.wait()       # shutdown, a successor took over, or a signal
    finally:
        if membership is not None:
            await membership.close()
        await node.close()
    return 0


def default_workers() -> int:
    return len(os.sched_getaffinity(0))
