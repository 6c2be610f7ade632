"""The ``Builtin`` backend: sessions live in the node's data-plane service (``scistream.data.node``).

The control server opens the service once (``NodeService.open``): by default it starts
one itself (``STATE_DIR/node.sock``, in its own process group, so it outlives a restart
of the control server and is re-adopted by the next one), or it connects to one an
operator runs (``s2cs --data-service SOCKET``). Each session is then one ``add`` on the
service's control socket, and ``remove`` on release: no process starts or stops.

If the service goes away (it died, or it was restarted and handed over to a successor),
the connection drops; ``NodeService`` reconnects, and re-adds any session the service no
longer has, on the same ports. A service it started that died is started again. A
session that cannot be put back fails with the reason (``wait_exit``).

    node = await NodeService.open(state_dir / "node.sock", managed=True, workers=0, log_path=...)
    server = NodeDataServer(spec)            # spec.service == str(node.path)
    await server.start()
    ...
    await node.close(keep_running=False)
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from ...errors import DataServerError
from ..base import DataServer
from ..spec import DataSpec, Stats
from ..supervise import ChildProcess, pid_alive
from .client import ServiceConnection, ServiceError, call_once

log = logging.getLogger(__name__)


class NodeService:
    """The control server's handle on one node service."""

    by_path: ClassVar[dict[str, "NodeService"]] = {}

    def __init__(self, path: Path, *, managed: bool, workers: int = 0, log_path: Path | None = None,
                 plain_relay: str = "auto") -> None:
        self.path = Path(path).absolute()
        self.plain_relay = plain_relay
        self.managed = managed
        self.workers = workers
        self.log_path = log_path or self.path.with_suffix(".log")
        self.child: ChildProcess | None = None
        self.pid = 0
        self.servers: dict[str, "NodeDataServer"] = {}
        self.conn = ServiceConnection(self.path, on_event=self._event, on_lost=self._lost)
        self.recovering: asyncio.Task | None = None
        self.closed = False
        self.gone = ""          # why the service is lost for good (operator-run, not back)

    @classmethod
    async def open(cls, path: Path, *, managed: bool, workers: int = 0,
                   log_path: Path | None = None, plain_relay: str = "auto") -> "NodeService":
        self = cls(path, managed=managed, workers=workers, log_path=log_path, plain_relay=plain_relay)
        await self._ensure()
        cls.by_path[str(self.path)] = self
        return self

    @classmethod
    def for_spec(cls, spec: DataSpec) -> "NodeService":
        if not spec.service:
            if len(cls.by_path) != 1:
                raise DataServerError("the Builtin type needs the node service: give DataSpec.service")
            return next(iter(cls.by_path.values()))
        try:
            return cls.by_path[str(Path(spec.service).absolute())]
        except KeyError:
            raise DataServerError(f"no node service is open at {spec.service!r} in this control server") from None

    async def _ensure(self) -> None:
        """Connect to the service; start it first if it is ours and does not answer."""
        try:
            await self.conn.connect(timeout=2.0)
        except ServiceError as exc:
            if not self.managed:
                raise DataServerError(f"{exc}; start it (s2ds serve --socket {self.path}) or drop "
                                      "--data-service to let s2cs run its own") from None
            await self._spawn()
            await self.conn.connect(timeout=5.0)
        reply = await self.conn.call({"op": "ping"}, 5.0)
        self.pid = int(reply["pid"])
        if self.child is None or self.child.pid != self.pid:
            self.child = ChildProcess.adopt(self.pid, "s2ds node service", self.log_path)
        log.info("node service on %s: pid %d, %d workers, %d sessions", self.path, self.pid,
                 len(reply.get("workers") or []), reply.get("sessions", 0))

    async def _spawn(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [sys.executable, "-m", "scistream.cli.s2ds", "serve", "--socket", str(self.path),
                "--workers", str(self.workers), "--plain-relay", self.plain_relay, "--fresh"]
        self.child = await ChildProcess.spawn(argv, log_path=self.log_path, name="s2ds node service")

        async def ready() -> bool:
            if self.path.exists():
                with contextlib.suppress(ServiceError):
                    await call_once(self.path, {"op": "ping"}, 1.0)
                    return True
            return False
        await self.child.wait_ready(ready, timeout=20)

    async def call(self, msg: dict, timeout: float = 15.0) -> dict:
        rec = self.recovering
        if rec is not None and not rec.done() and rec is not asyncio.current_task():
            await asyncio.shield(rec)
        if self.gone and not self.conn.connected:
            try:        # an operator may have started it again meanwhile
                await self.conn.connect(timeout=1.0)
                self.gone = ""
            except ServiceError:
                raise ServiceError(f"the node service on {self.path} is gone: {self.gone}", "unreachable") from None
        return await self.conn.call(msg, timeout)

    # -- losing the service -------------------------------------------------
    def _event(self, msg: dict) -> None:
        if msg.get("event") == "failed":
            server = self.servers.get(str(msg.get("sid")))
            if server is not None:
                server.lost(f"node service: {msg.get('reason')}")

    async def _lost(self) -> None:
        if self.closed or (self.recovering is not None and not self.recovering.done()):
            return
        self.recovering = asyncio.current_task()
        try:
            await self._recover()
        except Exception as exc:  # noqa: BLE001 - every session learns why
            log.error("node service on %s is gone and cannot be brought back: %s", self.path, exc)
            self.gone = str(exc)
            for server in list(self.servers.values()):
                server.lost(f"the node service on {self.path} is gone: {exc}")

    async def _recover(self) -> None:
        """The connection dropped: a successor took over, or the service died."""
        log.warning("lost the connection to the node service on %s (pid %d); reconnecting", self.path, self.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        delay = 0.02
        spawned = False
        while True:
            try:
                await self.conn.connect(timeout=1.0)
                break
            except ServiceError:
                if self.closed:
                    return
                # a successor answers on the path as soon as its predecessor goes; a dead
                # service with no successor is started again at once (if it is ours)
                if loop.time() > deadline or (self.pid and not pid_alive(self.pid)):
                    if not self.managed:
                        raise
                    log.error("node service pid %d is gone; starting a new one", self.pid)
                    if self.child is not None:
                        await self.child.stop()
                    await self._spawn()
                    await self.conn.connect(timeout=5.0)
                    spawned = True
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        reply = await self.conn.call({"op": "ping"}, 5.0)
        old, self.pid = self.pid, int(reply["pid"])
        if self.pid != old and not spawned:
            if self.child is not None and self.child.proc is not None and self.child.running:
                # our child handed over and is on its way out: reap it, never kill the successor
                self.child.detach()
            self.child = ChildProcess.adopt(self.pid, "s2ds node service", self.log_path)
        listed = (await self.conn.call({"op": "list"}, 10.0)).get("sessions") or {}
        missing = [s for sid, s in self.servers.items() if sid not in listed]
        for server in missing:
            try:
                await server.add()
            except (ServiceError, DataServerError, OSError) as exc:
                server.lost(f"the node service was restarted and could not take the session back: {exc}")
        log.info("node service on %s is pid %d now; %d sessions it had, %d put back", self.path, self.pid,
                 len(self.servers) - len(missing), len(missing))

    async def reconcile(self, keep: set[str]) -> list[str]:
        """Remove sessions the service carries that this control server does not know."""
        listed = (await self.call({"op": "list"}, 10.0)).get("sessions") or {}
        stale = [sid for sid in listed if sid not in keep and sid not in self.servers]
        for sid in stale:
            log.warning("node service carried session %s that no control server knows; removing it", sid)
            with contextlib.suppress(ServiceError):
                await self.call({"op": "remove", "sid": sid}, 10.0)
        return stale

    async def close(self, *, keep_running: bool) -> None:
        """Disconnect; stop the service if it is ours and nothing is left on it."""
        self.closed = True
        NodeService.by_path.pop(str(self.path), None)
        if self.recovering is not None and self.recovering is not asyncio.current_task():
            self.recovering.cancel()
            with contextlib.suppress(BaseException):
                await self.recovering
        if self.managed and not keep_running:
            with contextlib.suppress(ServiceError):
                await self.conn.call({"op": "shutdown"}, 5.0, busy_retry=0)
        await self.conn.close()
        if self.child is not None:
            if self.managed and not keep_running:
                await self.child.exited(5.0)
                await self.child.stop()     # SIGKILL if it did not go; reaps
            else:
                self.child.detach()


class NodeDataServer(DataServer):
    """One session (uid and role) in the node service."""
    kind = "Builtin"
    caps_conns = True
    udp_support = "sealed"

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self.sid = f"{spec.uid}/{spec.role}"
        self.node = NodeService.for_spec(spec)
        self._lost: asyncio.Future | None = None

    def _config(self) -> dict[str, Any]:
        spec = self.spec
        cfg: dict[str, Any] = {
            "uid": spec.uid, "role": spec.role, "listen_host": spec.listen_host,
            "ports": list(spec.ports), "targets": list(spec.targets), "rate_kbps": spec.rate_kbps,
            "tls": spec.wan_tls, "keepalive": list(spec.keepalive),
            "max_conns": int(getattr(spec, "max_conns", 0) or 0),
            "wan_congestion": spec.wan_congestion,
        }
        if self.carries_udp:
            cfg.update(udp=True, udp_max_flows=spec.udp_max_flows, udp_idle=spec.udp_idle)
        if spec.wan_secret is not None:
            # the service derives the certificate and key and keeps them in memory: no file
            # (and no directory) is written for the session (1-2 ms of disk metadata an update)
            cfg["wan_secret"] = spec.wan_secret.hex()
            cfg["cert_until"] = self._leaf_until()
        return cfg

    def _future(self) -> asyncio.Future:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def lost(self, reason: str) -> None:
        fut = self._future()
        if not fut.done():
            fut.set_result(reason)

    async def add(self) -> None:
        await self.node.call({"op": "add", "sid": self.sid, "cfg": self._config()})

    async def start(self) -> None:
        self._future()
        self.node.servers[self.sid] = self
        try:
            await self.add()
        except ServiceError as exc:
            self.node.servers.pop(self.sid, None)
            raise DataServerError(f"data server failed to start: {exc}") from None
        except BaseException:
            self.node.servers.pop(self.sid, None)
            with contextlib.suppress(Exception):
                await self.node.call({"op": "remove", "sid": self.sid}, 5.0)
            raise

    def _leaf_until(self) -> float:
        """When the session's WAN leaf, issued now, ends (epoch s); sets ``renew_at``."""
        from .. import wankeys
        until = wankeys.leaf_until(self.spec.lease_end)
        self.renew_at = wankeys.renew_at(until, self.spec.lease_end)
        return until.timestamp()

    async def renew_credentials(self) -> None:
        if self.spec.wan_secret is None:
            return
        await self._ask("credentials", 15.0, "refused the new WAN certificate",
                        wan_secret=self.spec.wan_secret.hex(), cert_until=self._leaf_until())
        log.info("session %s: WAN certificate issued again", self.sid)

    async def retarget(self, targets: tuple[str, ...]) -> None:
        await self._ask("targets", 15.0, "refused new targets", targets=list(targets))
        self.spec = self.spec.with_targets(targets)

    async def stop(self) -> None:
        if self.node.servers.get(self.sid) is self:
            del self.node.servers[self.sid]
        fut = self._future()
        if not fut.done():
            fut.cancel()
        if self.node.closed:
            return
        try:
            await self.node.call({"op": "remove", "sid": self.sid}, 15.0)
        except ServiceError as exc:
            if exc.code != "unreachable":
                raise DataServerError(f"cannot remove session {self.sid} from the node service: {exc}") from None
            log.warning("session %s: node service unreachable at release (%s)", self.sid, exc)

    async def wait_exit(self) -> str:
        return await asyncio.shield(self._future())

    async def stats(self) -> Stats:
        with contextlib.suppress(ServiceError, KeyError, TypeError):
            r = (await self.node.call({"op": "stats", "sid": self.sid}, 3.0))["stats"]
            failure = ""
            if r.get("failure"):
                at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(r.get("failure_at") or 0)))
                failure = f"{at}: {r['failure']} ({r.get('failed_connections', 0)} connections failed so far)"
            udp = {k[4:]: int(v) for k, v in r.items() if k.startswith("udp_")} if self.carries_udp else {}
            return Stats(r["bytes_in"], r["bytes_out"], r["connections"], r["total_connections"],
                         int(r.get("refused_connections", 0)), failure=failure, udp=udp)
        return Stats()

    async def _ask(self, op: str, timeout: float, failing: str = "does not answer", **args: Any) -> dict:
        """The service's reply to ``op`` on this session; DataServerError ("data server
        {failing}: why") if it refuses or does not answer."""
        try:
            return await self.node.call({"op": op, "sid": self.sid, **args}, timeout)
        except ServiceError as exc:
            raise DataServerError(f"data server {failing}: {exc}") from None

    async def details(self) -> dict[str, Any]:
        """Every counter of the session (refused connections, TLS resumption, ...)."""
        return dict((await self._ask("stats", 3.0))["stats"])

    async def config(self) -> dict[str, Any]:
        """The configuration the service holds for this session (and ``workers``: the
        worker of each listener)."""
        r = await self._ask("config", 5.0)
        return {**r["cfg"], "workers": r["workers"], "also": r.get("also")}

    async def connections(self) -> list[dict[str, Any]]:
        return list((await self._ask("conns", 5.0)).get("connections", []))

    async def telemetry(self) -> dict[str, dict[str, Any]] | None:
        from ..telemetry import summarize
        return summarize(await self.connections())

    def handle(self) -> dict[str, Any]:
        return {"service": str(self.node.path), "sid": self.sid, "service_pid": self.node.pid}

    @classmethod
    async def adopt(cls, spec: DataSpec, handle: dict[str, Any]) -> "NodeDataServer":
        """Take the session over in the open service: it must still carry it."""
        self = cls(spec)
        try:
            await self.node.call({"op": "stats", "sid": self.sid}, 5.0)
        except ServiceError as exc:
            raise DataServerError(f"session {self.sid} is not in the node service: {exc}") from None
        self._future()
        self.node.servers[self.sid] = self
        if spec.wan_secret is not None and not spec.lease_end:
            self.renew_at = time.time()      # when its leaf ends is the service's: issue one now
        log.info("re-adopted session %s in the node service (pid %d)", self.sid, self.node.pid)
        return self

    def detach(self) -> None:
        """The session stays in the service for the next control server."""

    @property
    def pids(self) -> list[int]:
        return []
