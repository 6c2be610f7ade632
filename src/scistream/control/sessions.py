"""Session bookkeeping for the control server.

A *session* is one uid on one role at this gateway: the ports reserved for it, the
bandwidth it was admitted with, and the data server forwarding its bytes. This module
owns the session table and the state machine; no grpc here (the servicer translates),
so tests can drive it directly.

    registry = SessionRegistry(config, ports, bandwidth)
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
import enum
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

from ..addr import check_role, check_uid, format_listener, parse_listener
from ..auth.base import Identity
from ..data import wankeys
from ..data.base import DataServer, DataSpec, Stats
from ..errors import (AlreadyExists, DataServerError, DeadlineExceeded, FailedPrecondition,
                      InvalidArgument, InvalidTransition, NotFound, PermissionDenied,
                      ScistreamError)
from .ports import BandwidthPool, PortPool

log = logging.getLogger(__name__)

MAX_TARGETS = 4096


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
    wan_secret: bytes | None = None        # PROD: drawn at req; CONS: learned at update
    wan_security: str = ""                 # "tls" or "plain" once connected
    prod_listeners: list[str] = dataclasses.field(default_factory=list)
    targets: list[str] = dataclasses.field(default_factory=list)
    state: SessionState = S.REQUESTED
    created: float = dataclasses.field(default_factory=time.time)
    ended: float = 0.0
    lease_expires: float = 0.0
    last_error: str = ""
    bandwidth: int = 0
    server: DataServer | None = None
    final_stats: Stats | None = None
    hello_seen: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    watcher: asyncio.Task | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

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


@dataclasses.dataclass
class RegistryConfig:
    listener_ip: str
    state_dir: Path
    server_type: str
    backend: type[DataServer]
    hello_timeout: float = 180.0
    hello_grace: float = 5.0         # how long a hello may wait for its req
    max_conn: int = 64
    wan_plaintext: bool = False      # operator asked for a plaintext WAN leg
    allow_legacy_plaintext: bool = False  # clients without wan_secret get plaintext on any type
    admins: frozenset[str] = frozenset()
    history: int = 1000              # terminal sessions kept for status


class SessionRegistry:
    def __init__(self, config: RegistryConfig, ports: PortPool, bandwidth: BandwidthPool,
                 events: Callable[[str, Session, str], None] | None = None) -> None:
        self.config = config
        self.ports = ports
        self.bandwidth = bandwidth
        self.active: dict[tuple[str, str], Session] = {}
        self.ended: collections.OrderedDict[tuple[str, str, float], Session] = collections.OrderedDict()
        self._arrivals = asyncio.Condition()
        self._events = events or (lambda event, session, detail: None)

    # -- lookup -------------------------------------------------------------------------
    def _find(self, uid: str, role: str | None = None) -> Session:
        if role and (uid, role) in self.active:
            return self.active[(uid, role)]
        found = [s for (u, _), s in self.active.items() if u == uid]
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFound(f"no active session {uid} on this server; check the uid, or it was "
                           "released or expired")
        raise InvalidArgument(f"uid {uid} is active as both PROD and CONS here; give the role")

    def _check_owner(self, session: Session, who: Identity, action: str) -> None:
        if who.id == session.owner.id:
            return
        if action == "release" and who.id in self.config.admins:
            log.info("admin %s releases session %s owned by %s", who.id, session.uid, session.owner.id)
            return
        raise PermissionDenied(f"session {session.uid} belongs to another identity; "
                               f"only its owner may {action} it")

    def sessions(self) -> list[Session]:
        return list(self.active.values()) + list(reversed(self.ended.values()))

    # -- req ----------------------------------------------------------------------------
    async def request(self, uid: str, role: str, num_conn: int, rate: int, owner: Identity,
                      lease: int = 0) -> Session:
        """Reserve ports and bandwidth, then wait for the application's hello."""
        check_uid(uid)
        check_role(role)
        if num_conn <= 0 or num_conn > self.config.max_conn:
            raise InvalidArgument(f"num_conn must be 1-{self.config.max_conn} on this server, got {num_conn}")
        if rate < 0:
            raise InvalidArgument(f"rate must be >= 0 kbit/s (0 = no cap), got {rate}")
        if lease < 0:
            raise InvalidArgument(f"lease must be >= 0 seconds, got {lease}")
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
            workdir=self.config.state_dir / "sessions" / f"{uid}-{role}", bandwidth=bandwidth)
        if lease:
            session.lease_expires = session.created + lease
        if role == "PROD" and not self.config.wan_plaintext:
            session.wan_secret = wankeys.new_secret()
        self.active[session.key] = session
        self._events("req", session, f"num_conn={num_conn} rate={rate}")
        async with self._arrivals:
            self._arrivals.notify_all()
        try:
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
        return session

    async def _wait_hello(self, session: Session) -> None:
        while True:
            if session.hello_seen.is_set():
                return
            if session.state in TERMINAL:
                raise FailedPrecondition(
                    f"session {session.uid} was {session.state.value} while waiting for its hello"
                    + (f": {session.last_error}" if session.last_error else ""))
            session.changed.clear()
            await session.changed.wait()

    # -- hello --------------------------------------------------------------------------
    async def hello(self, uid: str, role: str, prod_listeners: Iterable[str], who: Identity) -> Session:
        """The application's endpoints. Waits a bounded time for a req that has not come yet."""
        check_uid(uid)
        endpoints = list(prod_listeners)
        if len(endpoints) > MAX_TARGETS:
            raise InvalidArgument(f"{len(endpoints)} endpoints in one hello; at most {MAX_TARGETS}")
        for e in endpoints:
            parse_listener(e)
        session = await self._await_session(uid, role)
        self._check_owner(session, who, "hello")
        async with session.lock:
            if session.state is not S.REQUESTED:
                raise FailedPrecondition(f"session {uid} already had its hello (it is {session.state.value})")
            if session.role == "PROD":
                if not endpoints:
                    raise InvalidArgument("a PROD hello must name the producer's endpoints (host:port)")
                session.prod_listeners = endpoints
            session.advance(S.READY)
            session.hello_seen.set()
        self._events("hello", session, f"{len(endpoints)} endpoints")
        return session

    async def _await_session(self, uid: str, role: str) -> Session:
        deadline = asyncio.get_running_loop().time() + self.config.hello_grace
        async with self._arrivals:
            while True:
                candidates = [s for (u, _), s in self.active.items()
                              if u == uid and s.state is S.REQUESTED]
                if len(candidates) == 1:
                    return candidates[0]
                if len(candidates) == 2:  # both roles on one server: trust the hello's role
                    for s in candidates:
                        if s.role == role:
                            return s
                    raise InvalidArgument(f"uid {uid} waits for a hello as PROD and CONS here; "
                                          "the hello must give its role")
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrivals.wait(), left)
        if any(u == uid for (u, _) in self.active):
            raise FailedPrecondition(f"session {uid} already had its hello")
        raise NotFound(f"no request for session {uid} arrived within {self.config.hello_grace:g} s "
                       "of this hello; run s2uc prod-req/cons-req first, then the app controller")

    # -- update -------------------------------------------------------------------------
    async def update(self, uid: str, role: str, remote_listeners: Iterable[str],
                     wan_secret: bytes, who: Identity) -> Session:
        check_uid(uid)
        if role:
            check_role(role)
        remote = list(remote_listeners)
        if not remote:
            raise InvalidArgument("update needs at least one remote listener (host:port)")
        if len(remote) > MAX_TARGETS:
            raise InvalidArgument(f"{len(remote)} remote listeners; at most {MAX_TARGETS}")
        for r in remote:
            parse_listener(r)
        session = self._find(uid, role or None)
        self._check_owner(session, who, "update")
        async with session.lock:
            if session.state is S.REQUESTED:
                raise FailedPrecondition(f"session {uid} has had no hello yet; start the application "
                                         "controller, then update")
            if session.state in TERMINAL:
                raise NotFound(f"session {uid} is {session.state.value}")
            secret = self._wan_secret_for(session, wan_secret)
            targets = tuple(remote[i % len(remote)] for i in range(session.num_conn))
            try:
                if session.server is None:
                    spec = DataSpec(uid=uid, role=session.role, listen_host=self.config.listener_ip,
                                    ports=tuple(session.ports), targets=targets,
                                    rate_kbps=session.rate, wan_secret=secret, workdir=session.workdir)
                    server = self.config.backend(spec)
                    session.server = server
                    await server.start()
                    session.wan_security = "tls" if secret is not None else "plain"
                    session.watcher = asyncio.create_task(self._watch(session, server))
                else:
                    await session.server.retarget(targets)
            except ScistreamError as exc:
                await self._finish(session, S.FAILED, str(exc), locked=True)
                raise
            except BaseException as exc:
                reason = "update interrupted" if isinstance(exc, asyncio.CancelledError) else repr(exc)
                await self._finish(session, S.FAILED, reason, locked=True)
                if isinstance(exc, Exception):
                    raise DataServerError(f"data server failed to start: {exc}") from exc
                raise
            session.targets = list(targets)
            session.advance(S.CONNECTED)
        self._events("update", session, f"targets={len(remote)} wan={session.wan_security}")
        return session

    def _wan_secret_for(self, session: Session, given: bytes) -> bytes | None:
        if self.config.wan_plaintext:
            return None
        if given:
            if len(given) != wankeys.SECRET_BYTES:
                raise InvalidArgument(f"wan_secret must be {wankeys.SECRET_BYTES} bytes, got {len(given)}")
            if session.role == "PROD" and not wankeys.secrets_equal(given, session.wan_secret or b""):
                raise PermissionDenied(f"wrong WAN secret for session {session.uid}")
            session.wan_secret = given
            return given
        # A client of the original tooling: it knows no wan_secret.
        if self.config.backend.legacy_plaintext or self.config.allow_legacy_plaintext:
            log.warning("session %s/%s: client sent no WAN secret (original tooling); "
                        "the WAN leg is PLAINTEXT", session.uid, session.role)
            return None
        raise FailedPrecondition(
            "this server encrypts the WAN leg and the update carries no wan_secret (a client of "
            "the original tooling?); upgrade the client, or the operator may allow plaintext "
            "with --allow-legacy-plaintext")

    async def _watch(self, session: Session, server: DataServer) -> None:
        reason = await server.wait_exit()
        if session.state not in TERMINAL and session.server is server:
            log.error("session %s/%s: data server died: %s", session.uid, session.role, reason)
            await self._finish(session, S.FAILED, f"data server died: {reason}")

    # -- release ------------------------------------------------------------------------
    async def release(self, uid: str, who: Identity) -> list[Session]:
        check_uid(uid)
        found = [s for (u, _), s in self.active.items() if u == uid]
        if not found:
            raise NotFound(f"no active session {uid} on this server; it may be released already")
        for s in found:
            self._check_owner(s, who, "release")
        for s in found:
            await self._finish(s, S.RELEASED, "")
            self._events("release", s, "")
        return found

    async def _finish(self, session: Session, state: SessionState, reason: str, *, locked: bool = False) -> None:
        """Move to a terminal state and free everything: data server, ports, bandwidth."""
        if session.state in TERMINAL:
            return
        session.advance(state, reason)
        if self.active.get(session.key) is session:
            del self.active[session.key]
        server, session.server = session.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                session.final_stats = await server.stats()
            await server.stop()
        if session.watcher is not None and session.watcher is not asyncio.current_task():
            session.watcher.cancel()
        self.ports.free(session.ports)
        self.bandwidth.free(session.bandwidth)
        session.bandwidth = 0
        shutil.rmtree(session.workdir, ignore_errors=True)
        self.ended[(session.uid, session.role, session.created)] = session
        while len(self.ended) > self.config.history:
            self.ended.popitem(last=False)
        if state is not S.RELEASED:
            self._events(state.value, session, reason)

    async def expire_leases(self) -> None:
        now = time.time()
        for s in list(self.active.values()):
            if s.lease_expires and s.lease_expires <= now:
                await self._finish(s, S.EXPIRED, "lease ended")

    async def close(self, release: bool) -> None:
        """Shut down: release every session (``release``), or leave data servers running."""
        for s in list(self.active.values()):
            if release or s.state is S.REQUESTED:
                await self._finish(s, S.RELEASED, "control server shut down")
