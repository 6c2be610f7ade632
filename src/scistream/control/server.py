"""Running a control server: configuration, TLS, the gRPC server, shutdown.

    config = ServerConfig(listener_ip="127.0.0.1", port=5000, auth="none", insecure=True)
    asyncio.run(serve(config))

``serve`` owns everything it starts: the gRPC server, the session registry and, through
it, every data server, the session store (``sessions.db``), the audit log (``audit.log``)
and the metrics endpoint. At start it re-adopts the sessions a previous run left (see
``recovery``). SIGTERM or Ctrl-C stops the server; connected sessions keep running and are
re-adopted at the next start, unless the config says ``drain`` (``s2cs --drain``), which
releases them. An in-process ``ControlServer`` drains by default: it owns its sessions.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import ssl
from pathlib import Path

import grpc

from ..auth.base import Authenticator, NoAuth, make_authenticator
from ..data.hosttcp import HostTcp, congestion_line
from ..data.base import BackendUnavailable, DataServer, get_backend
from ..data.node.backend import NodeService
from ..data.spec import KEEPALIVE, UDP_IDLE, UDP_MAX_FLOWS
from ..data.supervise import bind_error
from ..data.wankeys import write_private
from ..errors import DataServerError
from ..addr import format_listener
from . import tlscert
from .ports import BandwidthPool, PortPool, parse_port_range
from .audit import AuditLog
from .metrics import Metrics
from .recovery import recover
from .servicer import ControlServicer, generic_handler
from .sessions import RegistryConfig, SessionRegistry
from .pgstore import PostgresStore, is_postgres_url, redact
from .store import SessionStore, SqliteStore, StoreError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # 1 MiB: no legitimate control message comes close
MAX_PENDING_CALLS = 20000  # calls accepted but not yet handled (bursts); past 3x: refused


@dataclasses.dataclass
class ServerConfig:
    listener_ip: str = "127.0.0.1"
    port: int = 5000
    control_ip: str | None = None
    server_type: str = "Builtin"
    port_range: str = "5100-5200"
    hello_timeout: float = 180.0
    hello_grace: float = 5.0
    max_conn: int = 64
    max_rate: int = 0
    server_cert: Path | None = None
    server_key: Path | None = None
    insecure: bool = False
    state_dir: Path | None = None
    auth: str | None = None
    auth_options: dict = dataclasses.field(default_factory=dict)
    admins: tuple[str, ...] = ()
    wan_plaintext: bool = False
    allow_legacy_plaintext: bool = False
    enforce_legacy_rate: bool = False  # enforce the rate of clients without wan_secret (original tooling)
    ready_file: Path | None = None
    drain: bool = True               # release every session on stop (the s2cs CLI: --drain)
    max_lease: float = 0.0           # seconds; the longest and default lease; 0 = unlimited
    update_timeout: float = 3600.0   # seconds a session may wait between its hello and its update; 0 = no limit
    tcp_keepalive: tuple[int, int, int] = KEEPALIVE   # data servers' sockets; (0, 0, 0) = the system's
    wan_congestion: str = "auto"     # WAN-leg congestion control (data.hosttcp): auto, system or a kernel name
    max_rtt: float = 0.1             # seconds: the round trip the start line's host check assumes
    metrics_port: int | None = None  # Prometheus endpoint (0: any free port); None = off
    metrics_ip: str | None = None    # default: the control ip
    workers: int = 0                 # Builtin: worker processes of the node service s2cs starts; 0 = one per core
    data_service: Path | None = None  # Builtin: an operator-run node service's socket; None = s2cs runs its own
    max_session_conns: int = 0       # open connections per session; 0 = no cap
    udp: bool = True                 # UDP on every session port beside TCP, where the type can (--no-udp)
    udp_plaintext: bool = False      # Nginx: UDP in the clear beside an encrypted TCP leg (--udp-plaintext)
    udp_max_flows: int = UDP_MAX_FLOWS   # UDP flows per session; 0 = no cap
    udp_idle: float = UDP_IDLE       # seconds a UDP flow lasts without a datagram
    plain_relay: str = "auto"        # Builtin: copy or splice plain legs (auto: copy on loopback legs)
    web_port: int | None = None      # web view (control/web.py; 0: any free port); None = off
    web_ip: str | None = None        # default: the control ip
    store: str | None = None         # postgresql://... (control/pgstore.py); None = SQLite in the state dir
    facility: bool = False           # sessions go to the facility's registered nodes (control/facility.py)
    node_token_file: Path | None = None  # --facility: the token the facility's nodes obey
    node_timeout: float = 15.0       # --facility: a node silent this long is lost, its sessions failed
    node_token: str = dataclasses.field(default="", repr=False)   # read from node_token_file by check()
    wan_cc: str = ""                 # wan_congestion resolved by check(): a kernel name, "" = the kernel's choice

    @property
    def backend(self) -> type[DataServer]:
        """The data-server type of ``server_type`` (ValueError if there is none)."""
        return get_backend(self.server_type)


def udp_notice(config: ServerConfig) -> None:
    """Say at start what this server does with UDP; loudly when it may cross in the clear."""
    backend = config.backend
    if not config.udp:
        log.info("UDP: off (--no-udp); sessions carry TCP only")
    elif not backend.udp_support:
        log.info("UDP: the %s type carries none (Nginx and Builtin do); sessions carry TCP only", backend.kind)
    elif config.udp_plaintext and backend.udp_support != "sealed":
        log.warning("!!! --udp-plaintext: the %s type carries UDP IN THE CLEAR across the WAN, "
                    "unauthenticated, even beside an encrypted TCP leg. Anyone on the path reads and "
                    "forges the datagrams. !!!", backend.kind)
    elif backend.udp_support != "sealed":
        log.info("UDP: the %s type carries it only on sessions whose WAN leg is plain (it cannot "
                 "encrypt datagrams; --udp-plaintext carries it in the clear beside encrypted TCP)", backend.kind)


class ConfigError(Exception):
    """The configuration cannot work; the message says what to change."""


def check(config: ServerConfig) -> None:
    if config.auth is None:
        raise ConfigError("choose an authenticator with --auth (globus, jwt, static); "
                          "--auth none disables authentication for development only")
    try:
        config.backend.check_available()
    except (ValueError, BackendUnavailable) as exc:
        raise ConfigError(str(exc)) from None
    try:
        parse_port_range(config.port_range)
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    for bad, message in [
            ((config.server_cert is None) != (config.server_key is None),
             "give both --server-cert and --server-key, or neither"),
            (config.hello_timeout <= 0 or config.hello_grace < 0, "--hello-timeout must be > 0"),
            (config.max_conn <= 0, "--max-conn must be > 0"),
            (config.max_lease < 0, "--max-lease must be >= 0 seconds (0: unlimited)"),
            (config.update_timeout < 0, "--update-timeout must be >= 0 seconds (0: no limit)"),
            (config.plain_relay not in ("auto", "splice", "copy"),
             "--plain-relay must be auto, splice or copy"),
            (config.workers < 0, "--workers must be >= 0 (0: one per core)"),
            (config.max_session_conns < 0, "--max-session-conns must be >= 0 (0: no cap)"),
            (config.udp_max_flows < 0, "--udp-max-flows must be >= 0 (0: no cap)"),
            (not config.udp_idle > 0, "--udp-idle must be > 0 seconds"),
            (not 0 <= config.port <= 65535, f"--port {config.port}: a port is 0-65535 (0: any free port)"),
            (not 0 <= (config.metrics_port or 0) <= 65535, "--metrics-port must be 0-65535"),
            (not 0 <= (config.web_port or 0) <= 65535, "--web-port must be 0-65535")]:
        if bad:
            raise ConfigError(message)
    if config.store is not None and not is_postgres_url(config.store):
        raise ConfigError(f"--store {redact(config.store)}: give a postgresql://USER@HOST[:PORT]/DATABASE "
                          "URL (leave --store out for SQLite in the state directory)")
    from ..data.hosttcp import CongestionError, resolve_congestion
    try:
        config.wan_cc = resolve_congestion(config.wan_congestion)
    except CongestionError as exc:
        raise ConfigError(str(exc)) from None
    if config.facility:
        if config.store is None:
            raise ConfigError("--facility needs --store postgresql://...: the facility's shared database")
        if config.node_token_file is None:
            raise ConfigError("--facility needs --node-token-file: the token the facility's nodes obey")
        from ..data.node.facility import read_token
        try:
            config.node_token = read_token(Path(config.node_token_file)).decode()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--node-token-file: {exc}") from None
        if config.node_timeout <= 0:
            raise ConfigError("--node-timeout must be > 0 seconds")
        if config.backend.kind != "Builtin":
            raise ConfigError(f"--facility places sessions on node services (the Builtin type); "
                              f"--type {config.server_type} is for a single gateway")
        if config.data_service is not None:
            raise ConfigError("--data-service is for a single gateway; a facility's nodes register "
                              "themselves (s2ds serve --store ...)")


def _bind_problem(host: str, port: int, option: str) -> str:
    """Why ``host:port`` cannot be listened on, said for the operator, or "" if it can."""
    exc = bind_error(host, port)
    if exc is None:
        return ""
    if isinstance(exc, socket.gaierror):
        return f"{option} {host}: {exc.strerror}; give an IP address of this host"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{option} {host}: {exc.strerror}: it is not an address of this host; give one "
                "of its addresses (ip -brief address)")
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host}: {exc.strerror}: another program (another s2cs?) listens "
                "there; choose another --port (0: any free port)")
    if exc.errno == errno.EACCES:
        return f"port {port} on {host}: {exc.strerror}: ports below 1024 need root"
    return f"{format_listener(host, port)}: {exc.strerror}"


class StateDirLock:
    """``STATE_DIR/s2cs.lock``, held (flock) while an s2cs runs on the directory: a second
    s2cs on it would share its node service, session database and configs. The kernel
    drops the lock when its holder dies, even by kill -9."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "s2cs.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"--state-dir {self.path.parent} is in use by another s2cs (pid {holder}); "
                              "give each s2cs its own --state-dir (or stop that one first)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _tls_credentials(config: ServerConfig, state_dir: Path) -> tuple[grpc.ServerCredentials,
                                                                     tlscert.LiveCertificate]:
    """The control port's TLS, and the certificate as it lives: gRPC asks it again on new
    connections (the web view every ``CHECK_EVERY`` seconds), so a leaf of ours issued
    again, or a certificate of yours replaced on disk, is served without a restart."""
    hosts: list[str] | None = None
    if config.server_cert is not None:
        cert, key = Path(config.server_cert), Path(config.server_key)  # type: ignore[arg-type]
        try:
            cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the server certificate or key: {exc}") from None
        log.info("control channel: TLS with %s", cert)
    else:
        cert, key = state_dir / "server.crt", state_dir / "server.key"
        hosts = [h for h in (config.listener_ip, config.control_ip) if h]
        if tlscert.ensure_self_signed(cert, key, hosts):
            log.info("control channel: issued a new leaf certificate %s", cert)
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        ca_pem = tlscert.ca_path(cert)[0].read_bytes()
        msg = (f"control channel: TLS with a self-signed certificate {cert} (its CA's SHA256 "
               f"{tlscert.fingerprint(ca_pem)}); hand this file to clients (--server-cert)")
        log.warning(msg)
    try:
        warning = tlscert.expiry_warning(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert} is not a PEM certificate: {exc}") from None
    if warning:
        log.warning("control channel: %s", warning)
    live = tlscert.LiveCertificate(cert, key, hosts, warned=bool(warning))
    seen = [0]

    def fetch() -> grpc.ServerCertificateConfiguration | None:   # gRPC's thread, every new connection
        live.refresh()
        version, key_now, cert_now = live.current()
        if version == seen[0]:
            return None
        seen[0] = version
        return grpc.ssl_server_certificate_configuration([(key_now, cert_now)])
    creds = grpc.dynamic_ssl_server_credentials(grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)]),
                                                fetch)
    return creds, live


class ControlServer:
    """One running control server: the gRPC server, the registry, the lease loop.

        server = ControlServer(config)
        await server.start()     # listening; server.port is the bound port
        ...
        await server.stop()      # stops the gRPC server, then every session's data server
    """

    def __init__(self, config: ServerConfig, *, authenticator: Authenticator | None = None,
                 store: SessionStore | None = None) -> None:
        check(config)
        self.config = config
        state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        self.state_dir = Path(config.state_dir or state_home / "scistream" / f"s2cs-{config.port}").absolute()
        self.auth = authenticator
        self.store = store
        self.port = 0
        self.metrics_port = 0
        self.web_port = 0
        self.certificate: tlscert.LiveCertificate | None = None   # the control port's, as it changes
        self.web = None  # control.web.WebView when --web-port is given
        self.registry: SessionRegistry | None = None
        self.metrics: Metrics | None = None
        self.audit: AuditLog | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self.node: NodeService | None = None
        self._lock = StateDirLock(self.state_dir)

    async def start(self) -> None:
        """Open the store, re-adopt what a previous run left, then serve. On failure,
        whatever was started is stopped again (re-adopted sessions keep running)."""
        try:
            await self._start()
        except BaseException:
            await self.stop(release=False)
            raise

    async def _start(self) -> None:
        config = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.state_dir.stat().st_mode & 0o077:
            log.warning("state directory %s was open to other users; making it 0700", self.state_dir)
            self.state_dir.chmod(0o700)
        self._lock.acquire()
        # the data servers listen on --listener-ip here (a facility's listen on its nodes)
        problem = "" if config.facility else _bind_problem(config.listener_ip, 0, "--listener-ip")
        if problem:
            raise ConfigError(problem)
        if self.auth is None:
            if config.auth == "none":
                log.warning("!!! --auth none: AUTHENTICATION IS DISABLED. Anyone who reaches the "
                            "control port can create and release sessions. For development only. !!!")
            self.auth = make_authenticator(config.auth, **config.auth_options)  # type: ignore[arg-type]
        udp_notice(config)
        ports = PortPool(parse_port_range(config.port_range), host=config.listener_ip,
                         udp=config.udp and bool(config.backend.udp_support) and not config.facility)
        if self.store is None and config.store:
            # a node's name in a shared store: this host and this state directory (two
            # s2cs on one host are two nodes; a restart on the same state dir is the same)
            # a facility's instance runs every call as a transaction of its own: a bigger pool
            self.store = PostgresStore(config.store, node=f"{socket.gethostname()}:{self.state_dir}",
                                       pool_size=16 if config.facility else 4)
        elif self.store is None:
            self.store = SqliteStore(self.state_dir / "sessions.db")
        try:
            await self.store.open()
        except StoreError as exc:
            raise ConfigError(str(exc)) from None
        self.audit = AuditLog(self.state_dir / "audit.log")
        if config.backend.kind == "Builtin" and not config.facility:
            self.node = await self._open_node_service()
        # the registry's settings of the same name, then those it takes in another form
        same = {f.name for f in dataclasses.fields(RegistryConfig)} & set(vars(config))
        settings = RegistryConfig(**{
            **{name: getattr(config, name) for name in same}, "state_dir": self.state_dir,
            "server_type": config.backend.kind, "backend": config.backend, "wan_congestion": config.wan_cc,
            "keepalive": tuple(config.tcp_keepalive), "admins": frozenset(config.admins),
            "data_service": str(self.node.path) if self.node else ""})
        if config.facility:
            from .facility import FacilityRegistry
            self.registry = FacilityRegistry(settings, self.store, token=config.node_token,  # type: ignore
                                             node_timeout=config.node_timeout, events=[self.audit.event])
        else:
            self.registry = SessionRegistry(settings, ports, BandwidthPool(config.max_rate),
                                            events=[self.audit.event], store=self.store)
        if config.metrics_port is not None:
            self.metrics = Metrics(self.registry)
            self.registry.observers.append(self.metrics.event)
        if not config.facility:
            report = await recover(self.registry)
            log.info("session store %s: %s", self.store.path if hasattr(self.store, "path") else "", report)
        if self.node is not None:
            await self.node.reconcile({f"{uid}/{role}" for uid, role in self.registry.active})
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            # grpc core cancels calls the event loop has not picked up yet once more than
            # 1000 wait (a burst of 1000 sessions is 4000 calls): let bursts queue instead
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 3 * MAX_PENDING_CALLS),
            # clients that know several instances ping a quiet call (a req waiting for its
            # hello) to find an instance that vanished without a reset: allow a ping a second
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ])
        server.add_generic_rpc_handlers([generic_handler(
            ControlServicer(self.registry, self.auth, metrics=self.metrics, audit=self.audit))])
        bind_host = config.control_ip or config.listener_ip
        address = format_listener(bind_host, config.port)
        try:
            if config.insecure:
                log.warning("control channel: PLAINTEXT (--insecure); tokens cross the network unprotected")
                self.port = server.add_insecure_port(address)
            else:
                creds, self.certificate = _tls_credentials(config, self.state_dir)
                self.port = server.add_secure_port(address, creds)
        except RuntimeError as exc:
            why = _bind_problem(bind_host, config.port, "--control-ip" if config.control_ip else "--listener-ip")
            raise ConfigError(f"cannot listen on {address}: {why or exc}") from None
        self.address = format_listener(bind_host, self.port)
        if config.facility:
            self.registry.instance = f"{socket.gethostname()}:{self.port}"  # type: ignore[union-attr]
            await self.registry.start(self.address)  # type: ignore[union-attr]
        await server.start()
        self._grpc = server
        log.info("S2CS serving on %s (type %s, data ports %s, listener ip %s)", self.address,
                 config.backend.kind, config.port_range, config.listener_ip)
        host = HostTcp.read()
        log.info("%s", congestion_line(config.wan_cc, host, config.backend.kind))
        log.info("%s", host.start_line(config.max_rtt))
        if not config.facility:
            self._tasks.append(asyncio.create_task(_lease_loop(self.registry)))
        if self.metrics is not None:
            metrics_ip = config.metrics_ip or bind_host
            try:
                self.metrics_port = await self.metrics.serve(metrics_ip, config.metrics_port or 0)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {metrics_ip}:{config.metrics_port}: "
                                  f"{exc.strerror}") from None
            log.info("metrics on http://%s/metrics", format_listener(metrics_ip, self.metrics_port))
        if config.web_port is not None:
            await self._start_web(bind_host)
        if config.ready_file:   # replaced whole: a reader polling for the file never reads it half-written
            write_private(Path(config.ready_file), json.dumps({
                "port": self.port, "pid": os.getpid(), "state_dir": str(self.state_dir),
                "metrics_port": self.metrics_port, "web_port": self.web_port}))

    async def _start_web(self, bind_host: str) -> None:
        from .web import WebView  # aiohttp is imported only when asked for
        config = self.config
        ctx = None
        live = self.certificate   # the control port's certificate, as it changes (not --insecure)
        if live is not None:
            ctx = tlscert.server_context(live.cert, live.key)   # Mozilla's "intermediate" profile
            self._tasks.append(asyncio.create_task(_follow_certificate(live, ctx)))
        self.web = WebView(self.registry, self.auth,  # type: ignore[arg-type]
                           auth_none=isinstance(self.auth, NoAuth))
        web_ip = config.web_ip or bind_host
        try:
            self.web_port = await self.web.serve(web_ip, config.web_port or 0, ctx)
        except OSError as exc:
            raise ConfigError(f"cannot serve the web view on {web_ip}:{config.web_port}: "
                              f"{exc.strerror}") from None
        log.info("web view on %s://%s/", "http" if ctx is None else "https",
                 format_listener(web_ip, self.web_port))

    async def _open_node_service(self) -> NodeService:
        config = self.config
        managed = config.data_service is None
        path = Path(config.data_service) if not managed else self.state_dir / "node.sock"
        try:
            return await NodeService.open(path, managed=managed, workers=config.workers,
                                          log_path=self.state_dir / "node.log", plain_relay=config.plain_relay)
        except DataServerError as exc:
            raise ConfigError(str(exc)) from None

    async def stop(self, *, release: bool | None = None) -> None:
        """Stop serving. ``release`` (default: ``config.drain``) releases every session;
        otherwise connected and ready ones keep running for the next start to re-adopt."""
        if self._stopped:
            return
        self._stopped = True
        release = self.config.drain if release is None else release
        log.info("S2CS shutting down (%s)", "releasing every session" if release
                 else "connected sessions keep running")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.web is not None:
            await self.web.close()
        if self.registry is not None and hasattr(self.registry, "begin_shutdown"):
            self.registry.begin_shutdown()   # a facility: waiting reqs go to another instance
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        keep_node = False
        if self.registry is not None:
            keep_node = not release and any(s.server is not None for s in self.registry.active.values())
            await self.registry.close(release=release)
        if self.node is not None:
            await self.node.close(keep_running=keep_node)
            self.node = None
        if self.metrics is not None:
            await self.metrics.close()
        if self.store is not None:
            await self.store.close()
        if self.audit is not None:
            self.audit.close()
        if self.auth is not None:
            await self.auth.close()
        self._lock.release()

    async def __aenter__(self) -> "ControlServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def serve(config: ServerConfig, *, authenticator: Authenticator | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run a control server until ``stop`` is set, SIGTERM or Ctrl-C."""
    server = ControlServer(config, authenticator=authenticator)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def reopen_logs() -> None:
        # SIGHUP: after a log rotation (deploy/logrotate.conf); it never stops the server
        if server.audit is not None:
            try:
                server.audit.reopen()
            except OSError as exc:
                log.error("cannot reopen the audit log: %s", exc)
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: reopen_logs}
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()
        for sig in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _follow_certificate(live: tlscert.LiveCertificate, ctx: ssl.SSLContext) -> None:
    """The web view's TLS context takes the control certificate's changes (new connections)."""
    seen = live.current()[0]
    while True:
        await asyncio.sleep(tlscert.CHECK_EVERY or 0.05)
        try:
            await asyncio.to_thread(live.refresh)
            version = live.current()[0]
            if version != seen:
                live.load_into(ctx)
                seen = version
                log.info("web view: now serving the new control certificate")
        except (OSError, ssl.SSLError) as exc:
            log.warning("web view: keeps its certificate: %s", exc)


async def _lease_loop(registry: SessionRegistry) -> None:
    """End sessions whose lease is over, on time (to the next lease end, at most 1 s apart)."""
    wait = 0.0
    while True:
        await asyncio.sleep(wait)
        try:
            soonest = await registry.expire_leases()
        except Exception:
            log.exception("lease check failed")
            soonest = 1.0
        wait = min(1.0, max(0.01, soonest))
