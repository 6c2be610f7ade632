"""Session bookkeeping for the control server.

A *session* is one uid on one role at this gateway: the ports reserved for it, the
bandwidth it was admitted with, its lease, and the data server forwarding its bytes.
This module owns the session table and the state machine; no grpc here (the servicer
translates), so tests can drive it directly.

Every change of state is written to the session store (``scistream.control.store``)
before the call that caused it returns, so a restarted control server re-adopts what
was running (``scistream.control.recovery``). Observers (audit log, metrics) learn of
each event through ``events``.

    registry = SessionRegistry(config, ports, bandwidth, store=store)
    s = await registry.request(uid, "PROD", num_conn=4, rate=0, owner=alice)  # waits for hello
    await registry.hello(uid, "PROD", ["10.0.0.5:7000"], alice)            # from the app side
    await registry.update(uid, "PROD", ["10.0.0.5:7000"], secret, alice)
    await registry.release(uid, alice)
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import enum
import hmac
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..addr import check_role, check_uid, format_listener, parse_listener, resolve_listener
from ..auth.base import Identity
from ..data import wankeys
from ..data.base import DataServer
from ..data.spec import KEEPALIVE, UDP_IDLE, UDP_MAX_FLOWS, DataSpec, Stats
from ..errors import (AlreadyExists, DataServerError, DeadlineExceeded, FailedPrecondition,
                      InvalidArgument, InvalidTransition, NotFound, PermissionDenied,
                      ScistreamError)
from .ports import BandwidthPool, PortPool
from .store import SessionRecord, SessionStore

log = logging.getLogger(__name__)

MAX_TARGETS = 4096
RENEW_RETRY = 60   # seconds: a WAN certificate that could not be issued again is tried again after

Observer = Callable[[str, "Session", str], None]


class SessionState(enum.Enum):
    REQUESTED = "requested"  # ports reserved, waiting for the app's hello
    READY = "ready"          # hello seen, listeners known
    CONNECTED = "connected"  # targets set, data server forwarding
    RELEASED = "released"    # terminal: everything freed on request
    EXPIRED = "expired"      # terminal: hello timeout or lease end, everything freed
    FAILED = "failed"        # terminal: a data server failed or died, everything freed


S = SessionState
_ALLOWED = {
    S.REQUESTED: {S.READY, S.RELEASED, S.EXPIRED, S.FAILED},
    S.READY: {S.CONNECTED, S.RELEASED, S.EXPIRED, S.FAILED},
    S.CONNECTED: {S.CONNECTED, S.RELEASED, S.EXPIRED, S.FAILED},  # update may re-target
    S.RELEASED: set(), S.EXPIRED: set(), S.FAILED: set(),
}
TERMINAL = {S.RELEASED, S.EXPIRED, S.FAILED}


def when(t: float) -> str:
    """A unix time as ISO 8601 UTC, to the second."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_stats(a: Stats, b: Stats) -> Stats:
    return Stats(a.bytes_in + b.bytes_in, a.bytes_out + b.bytes_out, a.connections + b.connections,
                 a.total_connections + b.total_connections, a.refused_connections + b.refused_connections,
                 a.cut_streams + b.cut_streams, b.failure or a.failure,
                 {k: a.udp.get(k, 0) + b.udp.get(k, 0) for k in {**a.udp, **b.udp}})


@dataclasses.dataclass
class Session:
    uid: str
    role: str
    owner: Identity
    num_conn: int
    rate: int
    ports: list[int]
    listeners: list[str]
    workdir: Path
    listen_host: str = ""
    server_type: str = ""
    wan_secret: bytes | None = None        # PROD: drawn at req; CONS: learned at update
    wan_security: str = ""                 # "tls" or "plain" once connected
    udp: str = ""                          # how its data server carries UDP (DataServer.udp_carriage)
    rate_enforced: bool = True             # False: a legacy client's rate, not enforced (update)
    prod_listeners: list[str] = dataclasses.field(default_factory=list)
    targets: list[str] = dataclasses.field(default_factory=list)
    state: SessionState = S.REQUESTED
    created: float = dataclasses.field(default_factory=time.time)
    connected_at: float = 0.0              # first CONNECTED (setup latency = connected_at - created)
    ready_at: float = 0.0                  # the hello (READY): the update is due within update_timeout
    ended: float = 0.0
    lease_expires: float = 0.0
    last_error: str = ""
    bandwidth: int = 0
    server: DataServer | None = None
    handle: dict[str, Any] = dataclasses.field(default_factory=dict)  # to re-adopt the server
    stats_base: Stats = dataclasses.field(default_factory=Stats)      # from data servers replaced
    last_stats: Stats = dataclasses.field(default_factory=Stats)      # current server, last seen
    final_stats: Stats | None = None
    legs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # telemetry, last seen
    hello_seen: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    freed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # _finish is through
    watcher: asyncio.Task | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    node: str = ""                         # a facility: the node carrying it (control/facility.py)
    instance: str = ""                     # a facility: the control instance that took its req

    @property
    def key(self) -> tuple[str, str]:
        return self.uid, self.role

    def advance(self, new: SessionState, reason: str = "") -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(self.uid, self.state, new)
        if new is not self.state:
            log.info("session %s/%s: %s -> %s%s", self.uid, self.role, self.state.value, new.value,
                     f" ({reason})" if reason else "")
        self.state = new
        if reason:
            self.last_error = reason
        if new in TERMINAL:
            self.ended = time.time()
        self.changed.set()

    def restarted_server(self) -> None:
        """A new data server replaces the old one: keep what the old one carried."""
        self.stats_base = add_stats(self.stats_base, self.last_stats)
        self.stats_base.connections = 0
        self.stats_base.udp.pop("flows", None)
        self.last_stats = Stats()

    def total_stats(self) -> Stats:
        """Bytes over the session's life: final, or what replaced servers carried + the current one."""
        if self.final_stats is not None:
            return self.final_stats
        return add_stats(self.stats_base, self.last_stats)

    def error(self, stats: Stats) -> str:
        """What went wrong last, for status: the session's own last error and the data
        server's last failed connection (a target that refuses, a peer without the key)."""
        data = f"data server: {stats.failure}" if stats.failure else ""
        return "; ".join(e for e in (self.last_error, data) if e)

    # -- persistence -------------------------------------------------------------------
    def to_record(self) -> SessionRecord:
        return SessionRecord(
            uid=self.uid, role=self.role, created=self.created, state=self.state.value,
            owner_id=self.owner.id, owner_name=self.owner.name, ended=self.ended,
            wan_secret=self.wan_secret, data={
                **{name: getattr(self, name) for name in _RECORDED}, "workdir": str(self.workdir),
                "stats": dataclasses.asdict(self.total_stats()),
                "stats_base": dataclasses.asdict(self.stats_base)})

    @classmethod
    def from_record(cls, rec: SessionRecord) -> "Session":
        d = rec.data
        s = cls(uid=rec.uid, role=rec.role, owner=Identity(rec.owner_id, rec.owner_name), created=rec.created,
                state=SessionState(rec.state), ended=rec.ended, wan_secret=rec.wan_secret,
                workdir=Path(d.get("workdir", ".")),
                **{"num_conn": 0, "rate": 0, "ports": [], "listeners": [],
                   **{name: d[name] for name in _RECORDED if name in d}})
        st = Stats(**d["stats"]) if d.get("stats") else Stats()
        if rec.terminal:
            s.final_stats = st
        else:
            # base: what replaced data servers carried; the current one's counters go on
            # from last_stats (re-adopted), or restart at zero (``restarted_server``)
            s.stats_base = Stats(**d["stats_base"]) if d.get("stats_base") else Stats()
            s.last_stats = Stats(st.bytes_in - s.stats_base.bytes_in, st.bytes_out - s.stats_base.bytes_out,
                                 0, st.total_connections - s.stats_base.total_connections,
                                 st.refused_connections - s.stats_base.refused_connections,
                                 st.cut_streams - s.stats_base.cut_streams)
        if s.state is not S.REQUESTED:
            s.hello_seen.set()
        return s


#: What a session's record keeps in its ``data`` as it is (JSON), beside the workdir and the counters.
_RECORDED = ("num_conn", "rate", "bandwidth", "ports", "listeners", "listen_host", "server_type",
             "wan_security", "udp", "rate_enforced", "prod_listeners", "targets", "connected_at", "ready_at",
             "lease_expires", "last_error", "handle")


@dataclasses.dataclass
class RegistryConfig:
    listener_ip: str
    state_dir: Path
    server_type: str
    backend: type[DataServer]
    hello_timeout: float = 180.0
    hello_grace: float = 5.0         # how long a hello may wait for its req
    max_conn: int = 64
    max_lease: float = 0.0           # longest lease in seconds; also the default; 0 = unlimited
    update_timeout: float = 3600.0   # a session READY this long without an update expires; 0 = never
    keepalive: tuple[int, int, int] = KEEPALIVE   # data servers' TCP keepalive (base.KEEPALIVE)
    wan_congestion: str = ""         # WAN-leg congestion control (data.hosttcp); "" = the kernel's choice
    wan_plaintext: bool = False      # operator asked for a plaintext WAN leg
    allow_legacy_plaintext: bool = False  # clients without wan_secret get plaintext on any type
    enforce_legacy_rate: bool = False     # enforce the rate of clients without wan_secret too
    admins: frozenset[str] = frozenset()
    history: int = 1000              # terminal sessions kept for status
    max_session_conns: int = 0       # open connections per session (data servers refuse more); 0 = no cap
    data_service: str = ""           # Builtin: the node service's control socket
    udp: bool = True                 # UDP on every session port beside TCP, where the type can (--no-udp)
    udp_plaintext: bool = False      # Nginx: UDP in the clear beside an encrypted TCP leg (--udp-plaintext)
    udp_max_flows: int = UDP_MAX_FLOWS   # UDP flows per session (--udp-max-flows; 0: no cap)
    udp_idle: float = UDP_IDLE       # seconds a UDP flow lasts without a datagram (--udp-idle)


def check_owner(config: RegistryConfig, uid: str, owner_id: str, who: Identity, action: str) -> None:
    """Only a session's owner may act on it; an admin (``--admin``) may release it too."""
    if who.id == owner_id:
        return
    if action == "release" and who.id in config.admins:
        log.info("admin %s releases session %s owned by %s", who.id, uid, owner_id)
        return
    raise PermissionDenied(f"session {uid} belongs to another identity; only its owner may {action} it")


def check_request(config: RegistryConfig, uid: str, role: str, num_conn: int, rate: int, lease: int) -> float:
    """A req's arguments checked against the server's limits; the lease in seconds (0: none)."""
    check_uid(uid)
    check_role(role)
    if num_conn <= 0 or num_conn > config.max_conn:
        raise InvalidArgument(f"num_conn must be 1-{config.max_conn} on this server, got {num_conn}")
    if rate < 0:
        raise InvalidArgument(f"rate must be >= 0 kbit/s (0 = no cap), got {rate}")
    top = config.max_lease
    if lease < 0:
        raise InvalidArgument(f"lease must be >= 0 seconds (0 = the server's default), got {lease}")
    if top and lease > top:
        raise InvalidArgument(f"lease {lease} s is longer than this server allows (--max-lease "
                              f"{top:g} s); ask for {top:g} s or less, or 0 for the longest")
    return float(lease) or top


def _addresses(items: Iterable[str], what: str) -> list[str]:
    """At most MAX_TARGETS host:port addresses, each checked; as a list."""
    out = list(items)
    if len(out) > MAX_TARGETS:
        raise InvalidArgument(f"{len(out)} {what}; at most {MAX_TARGETS}")
    for a in out:
        parse_listener(a)
    return out


def check_hello(uid: str, prod_listeners: Iterable[str]) -> list[str]:
    """A hello's arguments checked; the application's endpoints as a list."""
    check_uid(uid)
    return _addresses(prod_listeners, "endpoints in one hello")


def check_update(uid: str, role: str, remote_listeners: Iterable[str]) -> list[str]:
    """An update's arguments checked; its remote listeners as a list."""
    check_uid(uid)
    if role:
        check_role(role)
    remote = _addresses(remote_listeners, "remote listeners")
    if not remote:
        raise InvalidArgument("update needs at least one remote listener (host:port)")
    return remote


def rate_enforced(config: RegistryConfig, uid: str, role: str, rate: int, given: bytes) -> bool:
    """Whether to enforce a session's rate. A client of the original tooling (its update
    carries no wan_secret although this server draws them) sends rate=10000 kbit/s by
    default, a value that tooling never enforced: its rate is not enforced unless the
    operator asks for it (--enforce-legacy-rate). Under --wan-plaintext nobody carries a
    secret, so nobody can be told apart: every rate is enforced there."""
    if given or not rate or config.wan_plaintext or config.enforce_legacy_rate:
        return True
    log.warning("session %s/%s: rate %d kbit/s NOT enforced: a client of the original tooling "
                "(no WAN secret), which never enforced it; s2cs --enforce-legacy-rate enforces it",
                uid, role, rate)
    return False


def choose_wan_secret(config: RegistryConfig, uid: str, role: str, have: bytes | None,
                      given: bytes) -> bytes | None:
    """The WAN secret a session's data server uses: the one the update carries (checked
    against the one the session has), or None for a plaintext WAN leg where that is allowed."""
    if config.wan_plaintext:
        return None
    if given:
        if len(given) != wankeys.SECRET_BYTES:
            raise InvalidArgument(f"wan_secret must be {wankeys.SECRET_BYTES} bytes, got {len(given)}")
        # a PROD session drew its secret at the req; a CONS one learns it at its first update
        if (role == "PROD" or have is not None) and not hmac.compare_digest(given, have or b""):
            raise PermissionDenied(f"wrong WAN secret for session {uid}")
        return given
    # A client of the original tooling: it knows no wan_secret.
    if config.backend.legacy_plaintext or config.allow_legacy_plaintext:
        log.warning("session %s/%s: client sent no WAN secret (original tooling); "
                    "the WAN leg is PLAINTEXT", uid, role)
        return None
    raise FailedPrecondition(
        "this server encrypts the WAN leg and the update carries no wan_secret (a client of "
        "the original tooling?); upgrade the client, or the operator may allow plaintext "
        "with --allow-legacy-plaintext")


class BaseRegistry:
    """What a gateway's registry and a facility's (control/facility.py) share: the live
    sessions and the latest ended ones, and the observers that hear of every event."""

    def __init__(self, config: RegistryConfig, events: Observer | Iterable[Observer] | None) -> None:
        self.config = config
        self.active: dict[tuple[str, str], Session] = {}
        self.ended: collections.OrderedDict[tuple[str, str, float], Session] = collections.OrderedDict()
        self.observers: list[Observer] = (
            [] if events is None else [events] if callable(events) else list(events))

    def _events(self, event: str, session: Session, detail: str) -> None:
        """Every observer hears of the event; one that fails is logged, never breaks a session."""
        for observe in self.observers:
            try:
                observe(event, session, detail)
            except Exception:  # an observer must never break a session
                log.exception("event observer failed on %s", event)

    def sessions(self) -> list[Session]:
        """The live sessions, then the ended ones, the latest first."""
        return list(self.active.values()) + list(reversed(self.ended.values()))


class SessionRegistry(BaseRegistry):
    def __init__(self, config: RegistryConfig, ports: PortPool, bandwidth: BandwidthPool,
                 events: Observer | Iterable[Observer] | None = None,
                 store: SessionStore | None = None) -> None:
        super().__init__(config, events)
        self.ports = ports
        self.bandwidth = bandwidth
        self.store = store
        self._arrivals = asyncio.Condition()
        self._since_prune = 0

    def spec_for(self, session: Session, targets: tuple[str, ...] | None = None) -> DataSpec:
        """What the session's data server is started with."""
        c, s = self.config, session
        return DataSpec(uid=s.uid, role=s.role, listen_host=s.listen_host, ports=tuple(s.ports),
                        targets=tuple(s.targets) if targets is None else targets,
                        rate_kbps=s.rate if s.rate_enforced else 0, wan_secret=s.wan_secret,
                        workdir=s.workdir, lease_end=s.lease_expires, keepalive=c.keepalive,
                        max_conns=c.max_session_conns, service=c.data_service,
                        wan_congestion=c.wan_congestion, udp=c.udp, udp_plaintext=c.udp_plaintext,
                        udp_max_flows=c.udp_max_flows, udp_idle=c.udp_idle)

    async def save(self, session: Session) -> None:
        """Write the session's record; durable when this returns."""
        if self.store is not None:
            await self.store.put(session.to_record())

    # -- lookup -------------------------------------------------------------------------
    def _find(self, uid: str, role: str | None = None) -> Session:
        if role and (uid, role) in self.active:
            return self.active[(uid, role)]
        found = self._of_uid(uid)
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFound(f"no active session {uid} on this server; check the uid, or it was "
                           "released or expired")
        raise InvalidArgument(f"uid {uid} is active as both PROD and CONS here; give the role")

    def _of_uid(self, uid: str) -> list[Session]:
        """The live sessions of a uid: at most one per role (no scan of the table)."""
        return [s for role in ("PROD", "CONS") if (s := self.active.get((uid, role))) is not None]

    async def stats(self, session: Session) -> Stats:
        """Byte counters over the session's life, asking its data server if it has one."""
        server = session.server
        if server is not None and session.final_stats is None:
            with contextlib.suppress(Exception):
                fresh = await asyncio.wait_for(server.stats(), 3.0)
                if session.server is server:
                    session.last_stats = fresh
            legs: dict[str, dict[str, Any]] = {}
            if session.state is S.CONNECTED:
                with contextlib.suppress(Exception):
                    legs = await asyncio.wait_for(server.telemetry(), 3.0) or {}
            if session.server is server:
                session.legs = legs
        elif session.legs and session.final_stats is not None:
            session.legs = {}
        return session.total_stats()

    async def refresh_stats(self, timeout: float, concurrency: int = 32) -> None:
        """Ask every live data server for its counters, in parallel (bounded) and within ``timeout``."""
        sem = asyncio.Semaphore(concurrency)

        async def one(s: Session) -> None:
            async with sem:
                await self.stats(s)

        live = [s for s in self.active.values() if s.server is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(s) for s in live), return_exceptions=True), timeout)

    # -- req ----------------------------------------------------------------------------
    async def request(self, uid: str, role: str, num_conn: int, rate: int, owner: Identity,
                      lease: int = 0) -> Session:
        """Reserve ports and bandwidth, then wait for the application's hello."""
        lease_s = check_request(self.config, uid, role, num_conn, rate, lease)
        if (uid, role) in self.active:
            raise AlreadyExists(f"session {uid} is already active as {role} here; "
                                "use a new uid, or release this one first")
        bandwidth = self.bandwidth.take(rate)
        try:
            ports = self.ports.take(num_conn)
        except BaseException:
            self.bandwidth.free(bandwidth)
            raise
        session = Session(
            uid=uid, role=role, owner=owner, num_conn=num_conn, rate=rate, ports=ports,
            listeners=[format_listener(self.config.listener_ip, p) for p in ports],
            workdir=self.config.state_dir / "sessions" / f"{uid}-{role}", bandwidth=bandwidth,
            listen_host=self.config.listener_ip, server_type=self.config.server_type)
        if lease_s:
            session.lease_expires = session.created + lease_s
        if role == "PROD" and not self.config.wan_plaintext:
            session.wan_secret = wankeys.new_secret()
        self.active[session.key] = session
        try:
            await self.save(session)
        except BaseException:  # the store is unavailable: nothing of this req stays reserved
            del self.active[session.key]
            self.ports.free(ports)
            self.bandwidth.free(bandwidth)
            raise
        try:
            self._events("req", session, f"num_conn={num_conn} rate={rate} lease={lease_s:g}")
            async with self._arrivals:
                self._arrivals.notify_all()
            await asyncio.wait_for(self._wait_hello(session), self.config.hello_timeout)
        except asyncio.TimeoutError:
            await self._finish(session, S.EXPIRED, f"no hello within {self.config.hello_timeout:g} s")
            raise DeadlineExceeded(
                f"no hello for session {uid} within {self.config.hello_timeout:g} s; every port "
                "reserved for it was freed. Start the application controller with this uid "
                "sooner, or raise the server's --hello-timeout") from None
        except asyncio.CancelledError:
            if session.state is S.REQUESTED:
                await self._finish(session, S.RELEASED, "client went away before the hello")
            raise
        except BaseException as exc:
            await self._finish(session, S.FAILED, f"req failed: {exc}")
            raise
        return session

    async def _wait_hello(self, session: Session) -> None:
        while True:
            if session.hello_seen.is_set():
                return
            if session.state in TERMINAL:
                await session.freed.wait()  # answer once everything it held is free
                raise FailedPrecondition(
                    f"session {session.uid} was {session.state.value} while waiting for its hello"
                    + (f": {session.last_error}" if session.last_error else ""))
            session.changed.clear()
            await session.changed.wait()

    # -- hello --------------------------------------------------------------------------
    async def hello(self, uid: str, role: str, prod_listeners: Iterable[str], who: Identity) -> Session:
        """The application's endpoints. Waits a bounded time for a req that has not come yet."""
        endpoints = check_hello(uid, prod_listeners)
        session = await self._await_session(uid, role)
        check_owner(self.config, session.uid, session.owner.id, who, "hello")
        async with session.lock:
            if session.state is not S.REQUESTED:
                raise FailedPrecondition(f"session {uid} already had its hello (it is {session.state.value})")
            if session.role == "PROD":
                if not endpoints:
                    raise InvalidArgument("a PROD hello must name the producer's endpoints (host:port)")
                session.prod_listeners = endpoints
            session.advance(S.READY)
            session.ready_at = time.time()
            try:
                await self.save(session)   # before the req (and this hello) are answered
            except BaseException as exc:
                await self._finish(session, S.FAILED, f"cannot record the hello: {exc}", locked=True)
                raise
            session.hello_seen.set()
            session.changed.set()
        self._events("hello", session, f"{len(endpoints)} endpoints")
        return session

    async def _await_session(self, uid: str, role: str) -> Session:
        deadline = asyncio.get_running_loop().time() + self.config.hello_grace
        async with self._arrivals:
            while True:
                candidates = [s for s in self._of_uid(uid) if s.state is S.REQUESTED]
                if len(candidates) == 2:  # both roles on one server: trust the hello's role
                    candidates = [s for s in candidates if s.role == role]
                    if not candidates:
                        raise InvalidArgument(f"uid {uid} waits for a hello as PROD and CONS here; "
                                              "the hello must give its role")
                if candidates:
                    return candidates[0]
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrivals.wait(), left)
        if self._of_uid(uid):
            raise FailedPrecondition(f"session {uid} already had its hello")
        raise NotFound(f"no request for session {uid} arrived within {self.config.hello_grace:g} s "
                       "of this hello; run s2uc prod-req/cons-req first, then the app controller")

    # -- update -------------------------------------------------------------------------
    async def update(self, uid: str, role: str, remote_listeners: Iterable[str],
                     wan_secret: bytes, who: Identity) -> Session:
        remote = check_update(uid, role, remote_listeners)
        session = self._find(uid, role or None)
        check_owner(self.config, session.uid, session.owner.id, who, "update")
        # A name that does not resolve is the caller's mistake: refuse it before anything
        # changes (the session keeps its data server and targets). Data servers get the
        # numeric addresses, so none of them ever waits on DNS.
        names = list(dict.fromkeys(remote))
        resolved = dict(zip(names, await asyncio.gather(*(resolve_listener(r) for r in names))))
        async with session.lock:
            if session.state is S.REQUESTED:
                raise FailedPrecondition(f"session {uid} has had no hello yet; start the application "
                                         "controller, then update")
            if session.state in TERMINAL:
                raise NotFound(f"session {uid} is {session.state.value}")
            secret = choose_wan_secret(self.config, session.uid, session.role, session.wan_secret, wan_secret)
            targets = tuple(resolved[remote[i % len(remote)]] for i in range(session.num_conn))
            first = session.server is None
            try:
                if first:
                    session.wan_secret = secret
                    session.rate_enforced = rate_enforced(self.config, uid, session.role, session.rate, wan_secret)
                    server = self.config.backend(self.spec_for(session, targets))
                    session.server = server
                    await server.start()
                    session.handle = server.handle()
                    session.wan_security = "tls" if secret is not None else "plain"
                    session.udp = server.udp_carriage(server.spec)
                    session.watcher = asyncio.create_task(self._watch(session, server))
                else:
                    await session.server.retarget(targets)  # type: ignore[union-attr]
                session.targets = list(targets)
                session.advance(S.CONNECTED)
                if not session.connected_at:
                    session.connected_at = time.time()
                await self.save(session)   # the data server is recorded before the answer
            except ScistreamError as exc:
                await self._finish(session, S.FAILED, str(exc), locked=True)
                raise
            except asyncio.CancelledError:
                if session.state is S.CONNECTED:
                    # The caller went away (its call was cancelled) after its data server
                    # took the update: the session runs, so it is recorded as it is, not
                    # failed; the caller's cleanup (or its lease) releases it.
                    await asyncio.shield(self.save(session))
                    raise
                await self._finish(session, S.FAILED, "update interrupted", locked=True)
                raise
            except BaseException as exc:
                await self._finish(session, S.FAILED, repr(exc), locked=True)
                if isinstance(exc, Exception):
                    raise DataServerError(f"data server failed to start: {exc}") from exc
                raise
        if first:
            self._events("connected", session, f"{session.connected_at - session.created:.3f}")
        self._events("update", session, f"targets={len(remote)} wan={session.wan_security}")
        return session

    async def _watch(self, session: Session, server: DataServer) -> None:
        reason = await server.wait_exit()
        if session.state not in TERMINAL and session.server is server:
            log.error("session %s/%s: data server died: %s", session.uid, session.role, reason)
            await self._finish(session, S.FAILED, f"data server died: {reason}")

    # -- release ------------------------------------------------------------------------
    async def release(self, uid: str, who: Identity) -> list[Session]:
        check_uid(uid)
        found = self._of_uid(uid)
        if not found:
            raise NotFound(f"no active session {uid} on this server; it may be released already")
        for s in found:
            check_owner(self.config, s.uid, s.owner.id, who, "release")
        for s in found:
            await self._finish(s, S.RELEASED, "")
            self._events("release", s, "")
        return found

    async def _finish(self, session: Session, state: SessionState, reason: str, *, locked: bool = False) -> None:
        """Move to a terminal state and free everything: data server, ports, bandwidth.

        The terminal state is recorded first: a crash after that leaves no live record, and
        the restarted server stops any data server still running for it."""
        if session.state in TERMINAL:
            return
        if not locked:
            async with session.lock:
                return await self._finish(session, state, reason, locked=True)
        session.advance(state, reason)
        if self.active.get(session.key) is session:
            del self.active[session.key]
        self.remember(session)  # status sees it at every moment: live, or ended
        server = session.server
        if server is not None:
            await self.stats(session)
        session.final_stats = session.total_stats()
        session.final_stats.connections = 0
        session.server, session.handle = None, {}
        try:
            await self.save(session)
        except Exception as exc:  # freeing goes on; the restart sweep catches what is left
            log.error("session %s/%s: cannot record its end: %s", session.uid, session.role, exc)
        try:
            if server is not None:
                await server.stop()
        finally:
            if session.watcher is not None and session.watcher is not asyncio.current_task():
                session.watcher.cancel()
            self.ports.free(session.ports)
            self.bandwidth.free(session.bandwidth)
            session.bandwidth = 0
            shutil.rmtree(session.workdir, ignore_errors=True)
            session.freed.set()
        if state is not S.RELEASED or reason:
            self._events(state.value, session, reason)

    def remember(self, session: Session) -> None:
        """Keep an ended session for status; prune the store now and then."""
        self.ended[(session.uid, session.role, session.created)] = session
        while len(self.ended) > self.config.history:
            self.ended.popitem(last=False)
        self._since_prune += 1
        if self.store is not None and self._since_prune >= max(100, self.config.history // 10):
            self._since_prune = 0
            task = asyncio.get_running_loop().create_task(self.store.prune(self.config.history))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def expire_leases(self) -> float:
        """End every session whose lease is over, or that had its hello but no update within
        ``update_timeout``; issue the WAN certificate of a session without a lease again
        when due (``DataServer.renew_at``); return seconds until the next one is due."""
        now = time.time()
        soonest = float("inf")
        wait_update = self.config.update_timeout
        for s in list(self.active.values()):
            if s.lease_expires:
                if s.lease_expires <= now:
                    lease = s.lease_expires - s.created
                    await self._finish(s, S.EXPIRED, f"lease of {lease:g} s ended at {when(s.lease_expires)}")
                    continue
                soonest = min(soonest, s.lease_expires - now)
            server = s.server
            if server is not None and server.renew_at:
                if server.renew_at <= now:
                    await self._renew(s, server)
                if server.renew_at:
                    soonest = min(soonest, max(server.renew_at - now, 0.0))
            if wait_update and s.state is S.READY and s.ready_at:
                due = s.ready_at + wait_update
                if due <= now:
                    await self._finish(s, S.EXPIRED, f"no update within {wait_update:g} s of the hello "
                                                     "(--update-timeout); every port is free again")
                else:
                    soonest = min(soonest, due - now)
        return soonest

    async def _renew(self, s: Session, server: Any) -> None:
        try:
            await server.renew_credentials()       # sets the next renew_at
            if server.renew_at and server.renew_at <= time.time():
                server.renew_at = time.time() + RENEW_RETRY    # it did nothing (not running)
        except Exception as exc:  # noqa: BLE001 - a data server's own error; tried again later
            server.renew_at = time.time() + RENEW_RETRY
            log.warning("session %s/%s: cannot issue its WAN certificate again (%s); again in %d s",
                        s.uid, s.role, exc, RENEW_RETRY)

    async def close(self, release: bool) -> None:
        """Shut down: release every session (``release``), or leave the connected ones running.

        Sessions still waiting for their hello are always released: their req call ends."""
        for s in list(self.active.values()):
            if release or s.state is S.REQUESTED:
                await self._finish(s, S.RELEASED, "control server shut down"
                                   + (" (--drain)" if release else " before the hello"))
                continue
            if s.watcher is not None:
                s.watcher.cancel()
            if s.server is not None:
                await self.stats(s)  # its byte counts so far survive even if it dies later
                s.server.detach()
            with contextlib.suppress(Exception):
                await self.save(s)
            self._events("kept", s, "left running at shutdown; a restarted server re-adopts it")
        self.active.clear()  # this registry is done; what it kept now belongs to the next one
