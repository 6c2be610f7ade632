"""A facility of several nodes: every control server active, the database the one truth.

    s2cs --facility --store postgresql://scistream@db/scistream --node-token-file /etc/scistream/node.token

With ``--facility`` a control server keeps no session in memory and runs no data plane.
Sessions live in the ``fsessions`` table of the shared PostgreSQL store, and their data
servers on the facility's nodes: node services that registered themselves in ``nodes``
(``s2ds serve --store ...``, ``scistream.data.node.facility``). Any ``req``, ``hello``,
``update``, ``release`` or ``status`` may reach any instance:

* **req** places the session on a live node with room (heartbeat within
  ``--node-timeout``, not drained; free ports in its range, bandwidth under its
  ``--max-rate``, sessions under its ``--max-sessions``), the least loaded first, under
  that node's row lock (``SELECT ... FOR UPDATE``): two instances never hand out one
  port. The listeners carry the node's address. The req then waits for the hello: a
  hello that lands on another instance wakes it through ``LISTEN``/``NOTIFY`` (sent in
  the transaction that records the hello). A req retried by the same owner (its first
  instance died) attaches to the live session and gets the same answer.
* **hello**, **update**, **release** lock the session's row; update calls the node
  (TLS pinned to the certificate the node registered, the facility's node token) inside
  that transaction, so the record and the node agree. Repeating a hello with the same
  endpoints, or an update, is harmless.
* **Timers** - a hello that never came (``--hello-timeout``), a lease that ended, no
  update after the hello (``--update-timeout``) - are due times in the rows; every
  instance looks for due rows with ``FOR UPDATE SKIP LOCKED`` and a conditional
  ``UPDATE ... WHERE state = ...``, so each is acted on exactly once, by whichever
  instance is alive: a killed instance's sessions are taken over within a second.
* **Nodes** whose heartbeat stopped for ``--node-timeout``: one instance marks the node
  ``lost`` (a conditional update) and fails its sessions with the reason; their ports
  and bandwidth are free at once (a reservation is a live row). New sessions go to the
  other nodes. The node, when it comes back, removes what the store no longer lists.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import os
import random
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..addr import check_uid, format_listener, parse_listener, resolve_listener
from ..auth.base import Identity
from ..data import wankeys
from ..data.spec import KEEPALIVE, Stats
from ..data.telemetry import summarize
from ..data.node.client import ServiceConnection, ServiceError
from . import facilitydb as db
from ..errors import (AlreadyExists, DataServerError, DeadlineExceeded,
                      FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ScistreamError, Status)
from .sessions import (BaseRegistry, Observer, RegistryConfig, Session, SessionState, TERMINAL, check_hello,
                       check_owner, check_request, check_update, choose_wan_secret, rate_enforced)

log = logging.getLogger(__name__)

S = SessionState
NODE_CALL_TIMEOUT = 5.0


class Unavailable(ScistreamError):
    """No node of the facility can take a session now, or this instance is stopping: worth
    retrying (on another instance)."""
    status = Status.UNAVAILABLE


#: The ``fsessions`` columns a Session takes as they are.
_COLUMNS = ("uid", "role", "num_conn", "rate", "ports", "listeners", "wan_security", "rate_enforced",
            "prod_listeners", "targets", "created", "connected_at", "ready_at", "ended", "lease_expires",
            "last_error", "bandwidth", "udp", "node", "instance")


def _session(row: Any) -> Session:
    """A Session object (what the servicer answers with) from an ``fsessions`` row."""
    st = json.loads(row["stats"]) if isinstance(row["stats"], str) else dict(row["stats"] or {})
    s = Session(**{name: row[name] for name in _COLUMNS}, owner=Identity(row["owner_id"], row["owner_name"]),
                workdir=Path("."), server_type="Builtin", state=S(row["state"]),
                wan_secret=bytes(row["wan_secret"]) if row["wan_secret"] is not None else None)
    stats = _stats(st, s.udp)
    if s.state in TERMINAL:
        stats.connections = 0
        if stats.udp:
            stats.udp["flows"] = 0
        s.final_stats = stats
    else:
        s.last_stats = stats
    return s


def _counters(r: dict | None) -> dict[str, int]:
    """The counters a row's ``stats`` keeps (from a node's stats or the row): the TCP ones and
    the UDP ones (``udp_``-prefixed, as the node reports them)."""
    r = r or {}
    out = {k: int(r.get(k, 0) or 0) for k in ("bytes_in", "bytes_out", "connections",
                                               "total_connections", "refused_connections")}
    out.update({k: int(v or 0) for k, v in r.items() if k.startswith("udp_")})
    return out


def _stats(r: dict | None, udp: str) -> Stats:
    """A node's counters (or a row's ``stats``) as Stats; the UDP ones in ``udp`` if the
    session carries UDP (its carriage ``udp``: see ``udp_carriage``), as a single gateway's."""
    c = _counters(r)
    counted = {k[4:]: c.pop(k) for k in [k for k in c if k.startswith("udp_")]}
    return Stats(**c, udp=counted if udp in ("plain", "encrypted") else {})   # the carriages that carry UDP


def udp_carriage(config: RegistryConfig, secret: bytes | None) -> str:
    """How a facility's session carries UDP (its nodes seal it, as the Builtin type does):
    "off" (s2cs --no-udp), "plain" (the WAN leg is plain) or "encrypted"."""
    return "off" if not config.udp else "plain" if secret is None else "encrypted"


class NodeLinks:
    """One connection per node, TLS pinned to the certificate the node registered, the
    facility's node token sent first. ``on_event(node, msg)``: a node's failure events."""

    def __init__(self, token: str, on_event: Callable[[str, dict], None]) -> None:
        self.token = token
        self.on_event = on_event
        self.links: dict[str, tuple[tuple[str, str], ServiceConnection]] = {}

    def _link(self, node: Any) -> ServiceConnection:
        name, key = node["name"], (node["control"], node["cert"])
        cur = self.links.get(name)
        if cur is not None and cur[0] == key:
            return cur[1]
        if cur is not None:
            asyncio.get_running_loop().create_task(cur[1].close())
        ctx = ssl.create_default_context(cadata=node["cert"])  # exactly this certificate
        ctx.check_hostname = False   # pinned: the one trusted root is the node's own certificate
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        host, port = parse_listener(node["control"])
        conn = ServiceConnection(f"node {name} ({node['control']})", token=self.token,
                                 opener=lambda: asyncio.open_connection(host, port, ssl=ctx, limit=16 << 20),
                                 on_event=lambda msg: self.on_event(name, msg))
        self.links[name] = (key, conn)
        return conn

    async def call(self, node: Any, msg: dict, timeout: float = NODE_CALL_TIMEOUT) -> dict:
        return await self._link(node).call(msg, timeout, busy_retry=min(timeout, 2.0))

    async def close(self) -> None:
        for _, conn in self.links.values():
            await conn.close()
        self.links.clear()


class FacilityRegistry(BaseRegistry):
    """The session registry of a facility's control server (same coroutines as
    ``SessionRegistry``, state in PostgreSQL). Nothing is kept in memory: ``active`` and
    ``ended`` are the web view's copy of the store (``refresh_view``)."""

    def __init__(self, config: RegistryConfig, store: Any, *, token: str, node_timeout: float = 15.0,
                 events: Observer | Iterable[Observer] | None = None, instance: str = "") -> None:
        super().__init__(config, events)
        self.store = store
        self.node_timeout = node_timeout
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.nodes_view: list[dict] = []
        self.links = NodeLinks(token, self._node_event)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listen: Any = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # -- life ---------------------------------------------------------------------------
    async def start(self, address: str = "") -> None:
        await self._connect_listener()
        await self._call(lambda c: db.register_instance(c, self.instance, address, os.getpid()),
                         "register the instance in")
        self._tasks.append(asyncio.create_task(self._timer_loop()))

    async def _connect_listener(self) -> None:
        import asyncpg
        try:
            conn = await asyncpg.connect(self.store.url, timeout=self.store.timeout)
            await conn.add_listener(db.CHANNEL, self._notified)
        except Exception as exc:  # noqa: BLE001
            raise self.store._unavailable(exc, "listen on") from None
        conn.add_termination_listener(lambda _c: self._listener_lost())
        self._listen = conn

    def _listener_lost(self) -> None:
        if self._closed:
            return
        log.warning("lost the LISTEN connection to %s; reconnecting", self.store.path)
        self._tasks.append(asyncio.get_running_loop().create_task(self._relisten()))

    async def _relisten(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self._connect_listener()
                break
            except ScistreamError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._wake_all()   # whatever was missed meanwhile: every waiter reads its row again

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        uid = payload.split("\n", 1)[0]
        for ev in self._waiters.get(uid, ()):
            ev.set()

    @contextlib.contextmanager
    def _watching(self, uid: str):
        """An event set by every NOTIFY about ``uid`` while the block runs."""
        ev = asyncio.Event()
        self._waiters.setdefault(uid, set()).add(ev)
        try:
            yield ev
        finally:   # the set stays while one of its events does
            self._waiters[uid].discard(ev)
            if not self._waiters[uid]:
                del self._waiters[uid]

    def _wake_all(self) -> None:
        for evs in self._waiters.values():
            for ev in evs:
                ev.set()

    def begin_shutdown(self) -> None:
        """This instance stops: a req waiting here for its hello answers UNAVAILABLE at once
        (its client retries on another instance and finds the same session there)."""
        self._closed = True
        self._wake_all()

    async def close(self, release: bool = False) -> None:
        """Stop this instance. Sessions stay: the store and the other instances keep them."""
        self.begin_shutdown()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listen is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listen.close(), 5)
        await self.links.close()
        with contextlib.suppress(ScistreamError):
            await self._call(lambda c: db.unregister_instance(c, self.instance), "unregister the instance from")

    # -- helpers ------------------------------------------------------------------------
    async def _call(self, fn: Callable[[Any], Any], doing: str) -> Any:
        return await self.store._call(fn, doing)

    async def _end(self, conn: Any, row: Any, state: SessionState, reason: str,
                   stats: dict | None = None) -> Any:
        """Move a live row to a terminal state (only if it is still ``row['state']``);
        its ports and bandwidth are free from this commit on. Returns the new row or None."""
        return await db.end(conn, row, state.value, reason, time.time(),
                            None if stats is None else json.dumps(_counters(stats)))

    async def _remove_from_node(self, node: Any, uid: str, role: str) -> dict | None:
        """Take the session off its node; its last counters, or None if the node is away
        (it removes the session itself when it beats again and the store no longer lists it)."""
        if node is None:
            return None
        try:
            r = await self.links.call(node, {"op": "remove", "sid": f"{uid}/{role}"}, 3.0)
            return r.get("stats")
        except ServiceError as exc:
            log.warning("session %s/%s: node %s did not take the removal (%s); it will drop the "
                        "session at its next heartbeat", uid, role, node["name"], exc)
            return None

    # -- req ----------------------------------------------------------------------------
    async def request(self, uid: str, role: str, num_conn: int, rate: int, owner: Identity,
                      lease: int = 0) -> Session:
        lease_s = check_request(self.config, uid, role, num_conn, rate, lease)
        row, attached = await self._call(
            lambda c: self._place(c, uid, role, num_conn, rate, owner, lease_s), "write")
        session = _session(row)
        if attached:
            log.info("session %s/%s: req retried by its owner; attached to the live session on node %s",
                     uid, role, row["node"])
        else:
            self._events("req", session, f"num_conn={num_conn} rate={rate} lease={lease_s:g} node={row['node']}")
        try:
            return await self._wait_hello(row)
        except asyncio.CancelledError:
            # the client went away before the hello: free what it reserved (if still waiting);
            # not when this instance is stopping: the client retries on another one
            if not self._closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._give_up(row, S.RELEASED, "client went away before the hello"))
            raise

    async def _place(self, conn: Any, uid: str, role: str, num_conn: int, rate: int, owner: Identity,
                     lease_s: float) -> tuple[Any, bool]:
        import asyncpg
        taken = AlreadyExists(f"session {uid} is already active as {role} in this facility; "
                              "use a new uid, or release this one first")
        async with conn.transaction():
            for old in await db.live(conn, uid=uid, role=role):
                if (old["owner_id"] == owner.id and old["state"] in ("requested", "ready")
                        and old["num_conn"] == num_conn):
                    return old, True       # a retried req: the same session
                raise taken
            names = await db.candidates(conn, self.node_timeout)
            if not names:
                raise Unavailable("no data-transfer node of this facility is up and accepting "
                                      "sessions (s2cs nodes list); start or undrain one")
            why: list[str] = []
            # a node another instance is placing on right now is passed over at first (SKIP
            # LOCKED), so concurrent reqs spread over the nodes; then waited for
            order = [(name, True) for name in names] + [(name, False) for name in names]
            tried: set[str] = set()
            for name, skip_locked in order:
                if name in tried:
                    continue
                node = await db.lock_node(conn, name, skip_locked=skip_locked)
                if node is None:
                    continue
                tried.add(name)
                ports, reason = await self._room(conn, node, num_conn, rate)
                if ports is None:
                    why.append(f"{node['name']}: {reason}")
                    continue
                now = time.time()
                secret = wankeys.new_secret() if role == "PROD" and not self.config.wan_plaintext else None
                try:
                    row = await db.insert_session(
                        conn, uid=uid, role=role, created=now, owner_id=owner.id, owner_name=owner.name,
                        node=node["name"], instance=self.instance, num_conn=num_conn, rate=rate,
                        bandwidth=rate if node["max_rate"] else 0, ports=ports,
                        listeners=[format_listener(node["address"], p) for p in ports], wan_secret=secret,
                        hello_due=now + self.config.hello_timeout, lease_expires=now + lease_s if lease_s else 0.0)
                except asyncpg.UniqueViolationError:
                    raise taken from None
                return row, False
            if all("kbit/s" in w for w in why) and rate <= 0:
                raise InvalidArgument("every node of this facility caps bandwidth; ask for a rate (kbit/s) "
                                      "with --rate")
            if all("ports free" in w for w in why):
                raise ResourceExhausted(f"need {num_conn} ports; no node has that many free "
                                        f"({'; '.join(why)}); release idle sessions or add nodes")
            raise ResourceExhausted(f"no node of this facility has room for this session: {'; '.join(why)}")

    async def _room(self, conn: Any, node: Any, num_conn: int, rate: int) -> tuple[list[int] | None, str]:
        """Free ports for the session on the node (its row locked), or None and why not. A
        port is free when no live session lists it and the node did not find it held by
        another program; the search starts at a random port of the range."""
        used = await db.usage(conn, node["name"])
        if node["max_sessions"] and used["n"] >= node["max_sessions"]:
            return None, f"{used['n']} sessions, its most (--max-sessions)"
        if node["max_rate"]:
            if rate <= 0:
                return None, f"caps bandwidth at {node['max_rate']} kbit/s and this req asks no rate"
            left = node["max_rate"] - int(used["bw"])
            if rate > left:
                return None, f"{left} kbit/s left of {node['max_rate']} kbit/s"
        taken = set(used["ports"]) | set(node["busy_ports"] or ())
        ports = range(node["port_lo"], node["port_hi"] + 1)
        start = random.randrange(len(ports))
        free = [p for p in (*ports[start:], *ports[:start]) if p not in taken]
        if len(free) < num_conn:
            held = len(set(node["busy_ports"] or ()) - set(used["ports"]))
            return None, (f"{len(free)} ports free in {node['port_lo']}-{node['port_hi']}"
                          + (f" ({held} held by other programs)" if held else ""))
        return free[:num_conn], ""

    async def _wait_hello(self, row: Any) -> Session:
        uid, role, created = row["uid"], row["role"], row["created"]
        with self._watching(uid) as ev:
            while True:
                ev.clear()
                cur = await self._call(lambda c: db.session(c, uid, role, created), "read")
                if cur is None:
                    raise NotFound(f"session {uid} is gone from the store")
                state = S(cur["state"])
                if state in (S.READY, S.CONNECTED):
                    return _session(cur)
                if state in TERMINAL:
                    if state is S.EXPIRED and cur["last_error"].startswith("no hello within"):
                        raise DeadlineExceeded(
                            f"no hello for session {uid} within {self.config.hello_timeout:g} s; every port "
                            "reserved for it was freed. Start the application controller with this uid "
                            "sooner, or raise the server's --hello-timeout")
                    raise FailedPrecondition(f"session {uid} was {state.value} while waiting for its hello"
                                             + (f": {cur['last_error']}" if cur["last_error"] else ""))
                left = cur["hello_due"] - time.time()
                if left <= 0:
                    await self._give_up(cur, S.EXPIRED, f"no hello within {cur['hello_due'] - cur['created']:g} s")
                    continue
                if self._closed:
                    raise Unavailable("this control server is shutting down; retry on another instance")
                # woken by NOTIFY; the bounded wait re-reads the row should a notice be lost
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(left, 5.0))

    async def _give_up(self, row: Any, state: SessionState, reason: str) -> None:
        """End a session still in the state ``row`` shows (exactly once across instances)."""
        async def tx(c: Any) -> Any:
            async with c.transaction():
                return await self._end(c, row, state, reason)
        new = await self._call(tx, "write")
        if new is not None:
            self._events(state.value, _session(new), reason)

    # -- hello --------------------------------------------------------------------------
    async def hello(self, uid: str, role: str, prod_listeners: Iterable[str], who: Identity) -> Session:
        endpoints = check_hello(uid, prod_listeners)
        deadline = time.time() + self.config.hello_grace
        with self._watching(uid) as ev:
            while True:
                ev.clear()
                row, fresh = await self._call(lambda c: self._hello_tx(c, uid, role, endpoints, who), "write")
                if row is not None:
                    s = _session(row)
                    if fresh:
                        self._events("hello", s, f"{len(endpoints)} endpoints")
                    return s
                left = deadline - time.time()
                if left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ev.wait(), left)
        raise NotFound(f"no request for session {uid} arrived within {self.config.hello_grace:g} s "
                       "of this hello; run s2uc prod-req/cons-req first, then the app controller")

    async def _hello_tx(self, conn: Any, uid: str, role: str, endpoints: list[str], who: Identity) -> Any:
        async with conn.transaction():
            rows = await db.live(conn, uid=uid)
            if not rows:
                return None, False
            waiting = [r for r in rows if r["state"] == "requested"]
            if len(waiting) == 2:
                waiting = [r for r in waiting if r["role"] == role]
                if not waiting:
                    raise InvalidArgument(f"uid {uid} waits for a hello as PROD and CONS here; "
                                          "the hello must give its role")
            if not waiting:
                # a hello repeated (its first answer was lost): the same endpoints are fine
                for r in rows:
                    if (r["state"] in ("ready", "connected") and (not role or r["role"] == role)
                            and r["owner_id"] == who.id
                            and (r["role"] != "PROD" or list(r["prod_listeners"]) == endpoints)):
                        return r, False
                if role and all(r["role"] != role for r in rows):
                    # the other half of the uid is live here and this role's req has not come
                    # yet (the original's order: hello first): wait for it, as one gateway does
                    return None, False
                raise FailedPrecondition(f"session {uid} already had its hello")
            row = waiting[0]
            check_owner(self.config, uid, row["owner_id"], who, "hello")
            if row["role"] == "PROD" and not endpoints:
                raise InvalidArgument("a PROD hello must name the producer's endpoints (host:port)")
            now = time.time()
            new = await db.set_ready(conn, row, endpoints if row["role"] == "PROD" else [], now,
                                     now + self.config.update_timeout if self.config.update_timeout else 0.0)
            return new, True

    # -- update -------------------------------------------------------------------------
    async def update(self, uid: str, role: str, remote_listeners: Iterable[str],
                     wan_secret: bytes, who: Identity) -> Session:
        remote = check_update(uid, role, remote_listeners)
        names = list(dict.fromkeys(remote))
        resolved = dict(zip(names, await asyncio.gather(*(resolve_listener(r) for r in names))))
        failure: list[str] = []
        row = await self._call(lambda c: self._update_tx(c, uid, role, remote, resolved, wan_secret, who,
                                                         failure), "write")
        s = _session(row)
        if failure:
            self._events("failed", s, failure[0])
            raise DataServerError(f"data server failed to start on node {row['node']}: {failure[0]}")
        self._events("update", s, f"targets={len(remote)} wan={s.wan_security} node={row['node']}")
        return s

    async def _update_tx(self, conn: Any, uid: str, role: str, remote: list[str], resolved: dict,
                         wan_secret: bytes, who: Identity, failure: list[str]) -> Any:
        async with conn.transaction():
            rows = await db.live(conn, uid=uid, role=role)
            if not rows:
                raise NotFound(f"no active session {uid} in this facility; check the uid, or it was "
                               "released or expired")
            if len(rows) > 1:
                raise InvalidArgument(f"uid {uid} is active as both PROD and CONS here; give the role")
            row = rows[0]
            check_owner(self.config, uid, row["owner_id"], who, "update")
            if row["state"] == "requested":
                raise FailedPrecondition(f"session {uid} has had no hello yet; start the application "
                                         "controller, then update")
            secret = choose_wan_secret(self.config, row["uid"], row["role"],
                                       bytes(row["wan_secret"]) if row["wan_secret"] is not None else None,
                                       wan_secret)
            targets = [resolved[remote[i % len(remote)]] for i in range(row["num_conn"])]
            node = await db.node(conn, row["node"])
            if node is None or node["state"] != "up":
                raise FailedPrecondition(f"session {uid}'s node {row['node']} is "
                                         f"{'gone' if node is None else node['state']}; release it and ask again")
            enforced = rate_enforced(self.config, uid, row["role"], int(row["rate"]), wan_secret)
            host = node["address"]
            cfg = {"uid": uid, "role": row["role"], "listen_host": host, "ports": list(row["ports"]),
                   "targets": targets, "rate_kbps": int(row["rate"]) if enforced else 0,
                   "tls": secret is not None, "keepalive": list(self.config.keepalive or KEEPALIVE),
                   "max_conns": self.config.max_session_conns, "wan_congestion": self.config.wan_congestion}
            # an update again (new targets) is a retarget on the node: the session keeps its UDP
            udp = row["udp"] if row["state"] == "connected" and row["udp"] else udp_carriage(self.config, secret)
            if udp != "off":     # a UDP socket beside each listener; sealed with a key the node derives
                cfg.update(udp=True, udp_max_flows=self.config.udp_max_flows, udp_idle=self.config.udp_idle)
            if secret is not None:
                cfg["wan_secret"] = secret.hex()
                # the leaf ends with the lease plus a margin; a facility does not issue it again
                # yet, so a session without a lease gets the longest leaf the profile allows
                lease_end = float(row["lease_expires"] or 0)
                until = wankeys.leaf_until(lease_end) if lease_end else \
                    datetime.datetime.now(datetime.timezone.utc) + wankeys.FACILITY_LIFETIME
                cfg["cert_until"] = until.timestamp()
            try:
                await self.links.call(node, {"op": "add", "sid": f"{uid}/{row['role']}", "cfg": cfg})
            except ServiceError as exc:
                failure.append(str(exc))
                return await self._end(conn, row, S.FAILED, f"data server failed to start: {exc}")
            return await db.set_connected(conn, row, targets, secret, "tls" if secret is not None else "plain",
                                          enforced, time.time(), udp)

    # -- release ------------------------------------------------------------------------
    async def release(self, uid: str, who: Identity) -> list[Session]:
        check_uid(uid)
        ended = await self._call(lambda c: self._release_tx(c, uid, who), "write")
        out = [_session(r) for r in ended]
        for s in out:
            self._events("release", s, "")
        return out

    async def _release_tx(self, conn: Any, uid: str, who: Identity) -> list[Any]:
        async with conn.transaction():
            rows = await db.live(conn, uid=uid)
            if not rows:
                raise NotFound(f"no active session {uid} in this facility; it may be released already")
            for r in rows:
                check_owner(self.config, uid, r["owner_id"], who, "release")
            out = []
            for r in rows:
                stats = (await self._remove_from_node(await db.node(conn, r["node"]), uid, r["role"])
                         if r["state"] == "connected" else None)
                new = await self._end(conn, r, S.RELEASED, "", stats)
                if new is not None:
                    out.append(new)
            return out

    # -- status -------------------------------------------------------------------------
    async def snapshot(self, uid: str, who: Identity, admin: bool, *, ended: bool = True) -> list[Session]:
        """What ``status`` shows: live sessions first, then the most recently ended ones."""
        rows = await self._call(lambda c: db.sessions(c, uid, None if admin else who.id,
                                                      self.config.history if ended else None), "read")
        sessions = [_session(r) for r in rows]
        await self._fresh_stats([s for s in sessions if s.state is S.CONNECTED])
        return sessions

    async def _fresh_stats(self, sessions: list[Session]) -> None:
        by_node: dict[str, list[Session]] = {}
        for s in sessions:
            by_node.setdefault(s.node, []).append(s)
        if not by_node:
            return
        nodes = {r["name"]: r for r in await self._call(lambda c: db.nodes_named(c, list(by_node)), "read")}

        async def one(name: str, group: list[Session]) -> None:
            node = nodes.get(name)
            if node is None or node["state"] != "up":
                return
            try:
                stats = (await self.links.call(node, {"op": "stats"}, 3.0)).get("stats") or {}
            except ServiceError:
                return
            for s in group:
                r = stats.get(f"{s.uid}/{s.role}")
                if r:
                    s.last_stats = _stats(r, s.udp)
            await asyncio.gather(*(legs(node, s) for s in group if s.last_stats.connections))

        sem = asyncio.Semaphore(16)

        async def legs(node: Any, s: Session) -> None:
            """The session's per-hop telemetry: its connections' TCP samples on the node."""
            async with sem:
                with contextlib.suppress(ServiceError, KeyError, TypeError):
                    r = await self.links.call(node, {"op": "conns", "sid": f"{s.uid}/{s.role}"}, 3.0)
                    s.legs = summarize(r.get("connections") or [])

        await asyncio.gather(*(one(n, g) for n, g in by_node.items()))

    async def refresh_view(self) -> None:
        """Read the facility's sessions (live ones with fresh counters, the latest ended ones)
        and nodes into ``active``, ``ended`` and ``nodes_view``: what the web view shows."""
        sessions = await self.snapshot("", Identity("web"), True)
        self.nodes_view = (await list_nodes(self.store, self.node_timeout))["nodes"]
        self.active = {(s.uid, s.role): s for s in sessions if s.state not in TERMINAL}
        self.ended = collections.OrderedDict(
            ((s.uid, s.role, s.created), s) for s in reversed([s for s in sessions if s.state in TERMINAL]))

    async def facility_view(self) -> tuple[list[Session], list[dict]]:
        """Every live session of the facility (counters fresh from the nodes) and every node
        with its load: what the metrics endpoint exports."""
        live = await self.snapshot("", Identity("metrics"), True, ended=False)
        return live, (await list_nodes(self.store, self.node_timeout))["nodes"]

    async def stats(self, session: Session) -> Stats:
        return session.total_stats()

    # -- timers and nodes ----------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while not self._closed:
            try:
                wait = await self.run_timers()
            except ScistreamError as exc:
                log.warning("timers: %s", exc)
                wait = 1.0
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("timers failed")
                wait = 1.0
            await asyncio.sleep(max(0.05, min(wait, 1.0)))

    async def run_timers(self) -> float:
        """Act on every due timer and lost node (each exactly once across instances);
        seconds until the next due time."""
        now = time.time()
        removals: list[tuple[Any, Any]] = []
        events: list[tuple[str, Session, str]] = []

        async def tx(c: Any) -> float:
            async with c.transaction():
                await db.beat_instance(c, self.instance)
                lost = await db.mark_lost(c, self.node_timeout,
                                          f"no heartbeat for {self.node_timeout:g} s (--node-timeout)")
                for node in lost:
                    log.error("node %s lost: no heartbeat for %g s; failing its sessions", node["name"],
                              self.node_timeout)
                    for r in await db.live(c, node=node["name"]):
                        why = f"node {node['name']} lost: no heartbeat for {self.node_timeout:g} s"
                        new = await self._end(c, r, S.FAILED, why)
                        if new is not None:
                            events.append(("failed", _session(new), why))
                for r in await db.due(c, now):
                    if r["lease_expires"] and r["lease_expires"] <= now:
                        why = f"lease of {r['lease_expires'] - r['created']:g} s ended"
                    elif r["state"] == "requested":   # the timeouts of the instance that set them
                        why = f"no hello within {r['hello_due'] - r['created']:g} s"
                    else:
                        why = (f"no update within {r['update_due'] - r['ready_at']:g} s of the hello "
                               "(--update-timeout); every port is free again")
                    new = await self._end(c, r, S.EXPIRED, why)
                    if new is not None:
                        events.append(("expired", _session(new), why))
                        if r["state"] == "connected":
                            removals.append((r, await db.node(c, r["node"])))
                nxt = await db.next_due(c)
                return (nxt - time.time()) if nxt is not None else 1.0
        wait = await self._call(tx, "run the timers in")
        for r, node in removals:
            await self._remove_from_node(node, r["uid"], r["role"])
        for event, s, why in events:
            self._events(event, s, why)
        return wait

    def _node_event(self, node: str, msg: dict) -> None:
        """A node reports a session it can no longer carry (e.g. its worker could not be restarted)."""
        uid, _, role = str(msg.get("sid") or "").partition("/")
        if msg.get("event") != "failed" or not uid or not role:
            return
        reason = f"data server died on node {node}: {msg.get('reason')}"

        async def fail() -> None:   # ends the row only if it is still as read (exactly once)
            with contextlib.suppress(ScistreamError):
                rows = await self._call(lambda c: db.live(c, uid=uid, role=role, node=node, lock=False),
                                        "read")
                if rows:
                    await self._give_up(rows[0], S.FAILED, reason)
        self._tasks.append(asyncio.get_running_loop().create_task(fail()))


# -- the operator's view (s2cs nodes) ---------------------------------------------------
async def list_nodes(store: Any, node_timeout: float = 15.0) -> dict[str, list[dict]]:
    """Every node with its load, and every control instance (``s2cs nodes list``)."""
    nodes, inst = await store._call(db.overview, "read")
    return {
        "nodes": [{"name": n["name"], "address": n["address"], "control": n["control"],
                   "state": ("drained" if n["drained"] and n["state"] == "up" else n["state"])
                   if not (n["state"] == "up" and float(n["age"]) > node_timeout) else "late",
                   "drained": n["drained"], "reason": n["reason"],
                   "heartbeat_age_s": round(float(n["age"]), 1), "sessions": int(n["sessions"]),
                   "ports": f"{n['port_lo']}-{n['port_hi']}", "ports_used": int(n["ports_used"]),
                   "ports_total": n["port_hi"] - n["port_lo"] + 1,
                   "max_rate_kbps": int(n["max_rate"]), "bandwidth_used_kbps": int(n["bandwidth_used"]),
                   "max_sessions": int(n["max_sessions"])} for n in nodes],
        "instances": [{"name": i["name"], "address": i["address"], "pid": i["pid"],
                       "heartbeat_age_s": round(float(i["age"]), 1)} for i in inst],
    }


async def set_drained(store: Any, name: str, drained: bool) -> None:
    if not await store._call(lambda c: db.set_drained(c, name, drained), "write"):
        raise NotFound(f"no node named {name!r} in this facility (s2cs nodes list shows them)")
