"""The ``BuiltinProcess`` backend: drives one ``scistream.data.s2ds`` process per session.

This was the ``Builtin`` type before the node service (``scistream.data.node``) took that
name: the same forwarder, one interpreter per session and role (``s2cs --type
BuiltinProcess``). It is kept for sites that want a process boundary around every
session, and as the baseline of ``bench/setup``.

The process is started in its own process group (it outlives a control server that is
restarted) and is reached through its control socket: ping, stats, conns, targets, stop.
A new control server takes it over with ``adopt`` from what ``handle()`` returned.

    server = BuiltinDataServer(spec)
    await server.start()              # the listeners accept once this returns
    print(await server.stats(), await server.connections())
    handle = server.handle()          # {"pid": .., "control": ".../abc.sock", "log": ...}
    again = await BuiltinDataServer.adopt(spec, handle)   # e.g. after a restart
    await again.stop()
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DataServerError
from . import wankeys
from .base import DataServer, DataSpec, Stats, register
from .supervise import ChildProcess, pid_alive

log = logging.getLogger(__name__)

_CALL_ERRORS = (OSError, ConnectionError, asyncio.TimeoutError, ValueError)


async def control_call(path: Path, msg: dict, timeout: float = 5.0) -> dict:
    """One request/response on an s2ds control socket."""
    async def call() -> dict:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=16 << 20)
        try:
            writer.write(json.dumps(msg).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise ConnectionError("control socket closed")
        return json.loads(line)
    return await asyncio.wait_for(call(), timeout)


def control_socket_path(workdir: Path) -> Path:
    """A short path for the data server's control socket (AF_UNIX paths max 107 bytes).

    It lives in a per-user directory of mode 0700, so only this user can reach it."""
    base = Path(tempfile.gettempdir()) / f"scistream-{os.geteuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.geteuid() or base.stat().st_mode & 0o077:
        raise DataServerError(f"{base} is not private to this user; remove it")
    name = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:20]
    return base / f"{name}.sock"


@register("BuiltinProcess")
class BuiltinDataServer(DataServer):
    aliases = ("BuiltinProcess",)

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self.child: ChildProcess | None = None
        self.control = control_socket_path(spec.workdir)

    def _config(self) -> dict[str, Any]:
        spec = self.spec
        cfg: dict[str, Any] = {
            "uid": spec.uid, "role": spec.role, "listen_host": spec.listen_host,
            "ports": list(spec.ports), "targets": list(spec.targets),
            "rate_kbps": spec.rate_kbps, "tls": spec.wan_tls, "control": str(self.control),
            "keepalive": list(spec.keepalive),
        }
        if spec.wan_secret is not None:
            files = wankeys.write_credentials(spec.wan_secret, spec.uid, spec.workdir,
                                              not_after=wankeys.leaf_until(spec.lease_end))
            cfg.update(cert=str(files.cert), key=str(files.key), ca=str(files.ca))
        return cfg

    async def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.spec.workdir / "s2ds.json"
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._config(), f, indent=1)
        self.child = await ChildProcess.spawn(
            [sys.executable, "-m", "scistream.data.s2ds", str(cfg_path)],
            log_path=self.spec.workdir / "s2ds.log", name="s2ds")
        await self.child.wait_ready(self._ping, timeout=15)

    async def _ping(self) -> bool:
        try:
            return bool((await control_call(self.control, {"op": "ping"}, 1.0)).get("ok"))
        except _CALL_ERRORS:
            return False

    async def retarget(self, targets: tuple[str, ...]) -> None:
        try:
            reply = await control_call(self.control, {"op": "targets", "targets": list(targets)})
        except _CALL_ERRORS as exc:
            raise DataServerError(f"data server does not answer: {exc}") from exc
        if not reply.get("ok"):
            raise DataServerError(f"data server refused new targets: {reply.get('error')}")
        self.spec = self.spec.with_targets(targets)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()

    async def wait_exit(self) -> str:
        if self.child is None:
            raise DataServerError("data server was never started")
        return await self.child.wait()

    async def stats(self) -> Stats:
        with contextlib.suppress(*_CALL_ERRORS, KeyError):
            r = await control_call(self.control, {"op": "stats"}, 2.0)
            if r.get("ok"):
                return Stats(r["bytes_in"], r["bytes_out"], r["connections"], r["total_connections"])
        return Stats()

    async def connections(self) -> list[dict[str, Any]]:
        """Per-connection counters of the open connections (see ``s2ds`` for the fields)."""
        try:
            r = await control_call(self.control, {"op": "conns"}, 5.0)
        except _CALL_ERRORS as exc:
            raise DataServerError(f"data server does not answer: {exc}") from exc
        return list(r.get("connections", []))

    def handle(self) -> dict[str, Any]:
        return {"pid": self.child.pid if self.child else None, "control": str(self.control),
                "log": str(self.spec.workdir / "s2ds.log")}

    @classmethod
    async def adopt(cls, spec: DataSpec, handle: dict[str, Any]) -> "BuiltinDataServer":
        """Take over a running s2ds: it must be alive and answer ping with its own pid."""
        pid, control = handle.get("pid"), handle.get("control")
        if not isinstance(pid, int) or pid <= 0 or not control:
            raise DataServerError(f"cannot re-adopt session {spec.uid}: no pid or control socket recorded")
        if not pid_alive(pid):
            raise DataServerError(f"data server of session {spec.uid} (pid {pid}) is gone")
        self = cls.__new__(cls)
        DataServer.__init__(self, spec)
        self.control = Path(control)
        try:
            reply = await control_call(self.control, {"op": "ping"}, 3.0)
        except _CALL_ERRORS as exc:
            raise DataServerError(
                f"data server of session {spec.uid} (pid {pid}) does not answer on {control}: {exc}") from exc
        if reply.get("pid") != pid or reply.get("uid", spec.uid) != spec.uid:
            raise DataServerError(
                f"{control} is served by pid {reply.get('pid')} (session {reply.get('uid')}), "
                f"not by pid {pid} of session {spec.uid}")
        log_path = Path(handle.get("log") or spec.workdir / "s2ds.log")
        self.child = ChildProcess.adopt(pid, "s2ds", log_path)
        log.info("re-adopted s2ds pid %d of session %s", pid, spec.uid)
        return self

    @property
    def pids(self) -> list[int]:
        return [self.child.pid] if self.child else []
