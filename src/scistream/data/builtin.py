"""The built-in backend: drives one ``scistream.data.s2ds`` process per session."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import DataServerError
from . import wankeys
from .base import DataServer, DataSpec, Stats, register
from .supervise import ChildProcess

log = logging.getLogger(__name__)


async def control_call(path: Path, msg: dict, timeout: float = 5.0) -> dict:
    """One request/response on an s2ds control socket."""
    async def call() -> dict:
        reader, writer = await asyncio.open_unix_connection(str(path))
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


@register("Builtin")
class BuiltinDataServer(DataServer):
    aliases = ("Builtin",)

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
        }
        if spec.wan_secret is not None:
            files = wankeys.write_credentials(spec.wan_secret, spec.uid, spec.workdir)
            cfg.update(cert=str(files.cert), key=str(files.key))
        return cfg

    async def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.spec.workdir / "s2ds.json"
        cfg_path.write_text(json.dumps(self._config(), indent=1))
        cfg_path.chmod(0o600)
        self.child = await ChildProcess.spawn(
            [sys.executable, "-m", "scistream.data.s2ds", str(cfg_path)],
            log_path=self.spec.workdir / "s2ds.log", name="s2ds")
        await self.child.wait_ready(self._ping, timeout=15)

    async def _ping(self) -> bool:
        try:
            return bool((await control_call(self.control, {"op": "ping"}, 1.0)).get("ok"))
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
            return False

    async def retarget(self, targets: tuple[str, ...]) -> None:
        try:
            reply = await control_call(self.control, {"op": "targets", "targets": list(targets)})
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
            raise DataServerError(f"data server does not answer: {exc}") from exc
        if not reply.get("ok"):
            raise DataServerError(f"data server refused new targets: {reply.get('error')}")
        self.spec = self.spec.with_targets(targets)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()

    async def wait_exit(self) -> str:
        assert self.child is not None
        return await self.child.wait()

    async def stats(self) -> Stats:
        with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError, ValueError):
            r = await control_call(self.control, {"op": "stats"}, 2.0)
            if r.get("ok"):
                return Stats(r["bytes_in"], r["bytes_out"], r["connections"], r["total_connections"])
        return Stats()

    def handle(self) -> dict[str, Any]:
        return {"pid": self.child.pid if self.child else None, "control": str(self.control)}

    @property
    def pids(self) -> list[int]:
        return [self.child.pid] if self.child else []
