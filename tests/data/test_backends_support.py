"""Helpers for the HAProxy / nginx / stunnel backend tests (no tests here).

``EXTERNAL`` parametrises a test over the three backends, each skipped with the reason
``check_available()`` gives when its binary is missing. ``Chain`` runs a PROD data server
(forwarding to an application) and a CONS data server (forwarding to the PROD
listeners), as two gateways would. ``App`` is a counting application endpoint: it may
greet first with a tag (so a test knows which target it reached), then echoes.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import echo_roundtrip, free_ports
from scistream.data.node.backend import NodeService
from scistream.data.base import BackendUnavailable, DataServer, get_backend
from scistream.data.spec import KEEPALIVE, DataSpec
from scistream.data.supervise import group_members

NAMES = ("Haproxy", "Nginx", "Stunnel")


def _param(name: str):
    try:
        get_backend(name).check_available()
    except BackendUnavailable as exc:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"{name} backend unavailable: {exc}"))
    return pytest.param(name)


EXTERNAL = [_param(n) for n in NAMES]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Served:
    """An application on 127.0.0.1 while in ``async with``: each connection goes to
    ``_serve``; ``endpoint`` is where to reach it."""
    server: asyncio.AbstractServer | None = None
    port = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class App(Served):
    """An application endpoint on 127.0.0.1: optional greeting ``tag``, then echo."""

    def __init__(self, tag: bytes = b"") -> None:
        self.tag = tag
        self.accepted = 0
        self.received = 0

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.tag:
                w.write(self.tag)
                await w.drain()
            while chunk := await r.read(1 << 16):
                self.received += len(chunk)
                w.write(chunk)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()


async def roundtrip(port: int, payload: bytes, *, host: str = "127.0.0.1", skip: int = 0,
                    timeout: float = 60.0) -> bytes:
    """Send ``payload`` while reading back; half-close; return what came back after ``skip``
    greeting bytes."""
    return (await echo_roundtrip(host, port, payload, timeout))[skip:]


async def try_through(port: int, payload: bytes = b"ping" * 256, timeout: float = 15.0) -> bytes:
    """Like ``roundtrip`` but a reset or refusal is simply 'nothing came back'."""
    try:
        return await roundtrip(port, payload, timeout=timeout)
    except (ConnectionError, OSError):
        return b""


@dataclass
class Chain:
    """PROD (WAN listeners -> app endpoints) and CONS (LAN listeners -> PROD listeners)."""

    kind: str
    workdir: Path
    targets: list[str]
    n: int = 2
    secret: bytes | None = None
    cons_secret: bytes | None = None   # defaults to ``secret``; a different one = an impostor
    rate_kbps: int = 0
    keepalive: tuple[int, int, int] = KEEPALIVE
    max_conns: int = 0
    host: str = "127.0.0.1"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    prod: DataServer | None = None
    cons: DataServer | None = None

    def __post_init__(self) -> None:
        if self.cons_secret is None:
            self.cons_secret = self.secret

    def prod_spec(self) -> DataSpec:
        return DataSpec(self.uid, "PROD", self.host, free_ports(self.n, self.host),
                        tuple(self.targets[i % len(self.targets)] for i in range(self.n)),
                        rate_kbps=self.rate_kbps, wan_secret=self.secret, workdir=self.workdir / "prod",
                        keepalive=self.keepalive, max_conns=self.max_conns)

    async def __aenter__(self) -> "Chain":
        cls = get_backend(self.kind)
        self.node = None
        if cls.kind == "Builtin" and not NodeService.by_path:
            # the Builtin type lives in the node service: run one for this chain
            self.node = await NodeService.open(self.workdir / "node.sock", managed=True, workers=2,
                                               log_path=self.workdir / "node.log")
        try:
            return await self._start(cls)
        except BaseException:
            if self.node is not None:
                await self.node.close(keep_running=False)
            raise

    async def _start(self, cls) -> "Chain":
        self.prod = cls(self.prod_spec())
        await self.prod.start()
        try:
            host = f"[{self.host}]" if ":" in self.host else self.host
            wan = tuple(f"{host}:{p}" for p in self.prod.spec.ports)
            self.cons = cls(DataSpec(self.uid, "CONS", self.host, free_ports(self.n, self.host), wan,
                                     rate_kbps=self.rate_kbps, wan_secret=self.cons_secret,
                                     workdir=self.workdir / "cons", keepalive=self.keepalive,
                                     max_conns=self.max_conns))
            await self.cons.start()
        except BaseException:
            await self.prod.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        for server in (self.cons, self.prod):
            if server is not None:
                await server.stop()
        if getattr(self, "node", None) is not None:
            await self.node.close(keep_running=False)
            self.node = None

    @property
    def entries(self) -> tuple[int, ...]:
        assert self.cons is not None
        return self.cons.spec.ports

    @property
    def all_ports(self) -> tuple[int, ...]:
        assert self.cons is not None and self.prod is not None
        return self.cons.spec.ports + self.prod.spec.ports


def leftover(server: DataServer) -> list[int]:
    """Processes still alive in the server's process group."""
    child = getattr(server, "child", None)
    return group_members(child.pid) if child is not None else []


def secret() -> bytes:
    return os.urandom(32)
