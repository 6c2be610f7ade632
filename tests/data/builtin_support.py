"""Helpers for the built-in data server tests: sessions in a node service started as
s2cs starts it (``NodeService.open``, managed), a chain of two (PROD + CONS), and a
pattern application that sends and checks numbered blocks.

A *pattern stream* is ``n`` bytes made of 1 MiB blocks, each one a fixed random body
whose first 8 bytes are the block's index: the receiver checks every byte, in order,
without hashing (a lost, duplicated or reordered block shows as a wrong index).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from scistream.data import wankeys
from scistream.data.node.backend import NodeDataServer, NodeService
from scistream.data.node.channel import Decoder, encode, send_frame, send_note
from scistream.data.spec import DataSpec

from conftest import async_wait_until, free_ports

BLOCK = 1 << 20


class Pattern:
    def __init__(self) -> None:
        self.body = os.urandom(BLOCK)

    def send(self, sock: socket.socket, n: int) -> None:
        buf = bytearray(self.body)
        view = memoryview(buf)
        i = 0
        while n > 0:
            buf[:8] = i.to_bytes(8, "big")
            k = min(n, BLOCK)
            sock.sendall(view[:k])
            n -= k
            i += 1

    def recv_check(self, sock: socket.socket, limit: int | None = None,
                   samples: list[tuple[float, int]] | None = None, quiet: bool = False) -> tuple[int, bool]:
        """Read until EOF (or ``limit`` bytes); return (bytes, every byte as expected).

        With ``samples``, append (monotonic time, bytes so far) after every read; with
        ``quiet``, a read error ends the stream (a timed reader is stopped that way)."""
        buf = bytearray(BLOCK)
        exp = bytearray(self.body)
        view = memoryview(buf)
        total, i, ok = 0, 0, True
        while limit is None or total < limit:
            fill = 0
            while fill < BLOCK:
                try:
                    n = sock.recv_into(view[fill:])
                except OSError:
                    if not quiet:
                        raise
                    n = 0
                if n == 0:
                    break
                fill += n
                if samples is not None:
                    samples.append((time.monotonic(), total + fill))
            if fill:
                exp[:8] = i.to_bytes(8, "big")
                same = buf == exp if fill == BLOCK else buf[:fill] == exp[:fill]
                ok = ok and same
                total += fill
                i += 1
            if fill < BLOCK:
                break
        return total, ok


@dataclass
class ConnResult:
    samples: list[tuple[float, int]] = field(default_factory=list)
    received: int = 0
    intact: bool = False
    error: str = ""
    done: bool = False      # both directions ended, every error above written


@dataclass
class PatternApp:
    """A producer application: on each connection it sends ``send_bytes`` of pattern and
    shuts its write side, while reading and checking what comes until EOF."""
    pattern: Pattern
    send_bytes: int = 0
    greeting: bytes = b""
    results: list[ConnResult] = field(default_factory=list)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
                res = ConnResult()
                self.results.append(res)
            t = threading.Thread(target=self._serve, args=(conn, res), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket, res: ConnResult) -> None:
        conn.settimeout(120)
        sender = threading.Thread(target=self._send, args=(conn, res), daemon=True)
        sender.start()
        try:
            res.received, res.intact = self.pattern.recv_check(conn, samples=res.samples)
        except OSError as exc:
            res.error += f"recv: {exc}; "
        sender.join(130)
        res.done = not sender.is_alive()

    def _send(self, conn: socket.socket, res: ConnResult) -> None:
        try:
            if self.greeting:
                conn.sendall(self.greeting)
            self.pattern.send(conn, self.send_bytes)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            res.error += f"send: {exc}; "

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        self.sock.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
        for t in self.threads:
            t.join(10)
        self.acceptor.join(10)


def pattern_exchange(host: str, port: int, pattern: Pattern, send: int, timeout: float = 120) -> tuple[int, bool]:
    """Client side: send ``send`` bytes then half-close, while reading and checking until EOF."""
    with socket.create_connection((host, port), 10) as s:
        s.settimeout(timeout)
        err: list[BaseException] = []

        def sender() -> None:
            try:
                pattern.send(s, send)
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                err.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        got = pattern.recv_check(s)
        t.join(timeout)
        if err:
            raise err[0]
        return got


class DataServers:
    """Sessions in one node service of their own, started the way s2cs starts it (a
    managed ``NodeService`` with ``workers`` worker processes, its environment: the
    caller's, so ``SCISTREAM_PUMPS`` set before ``open`` chooses the pumps); ``close``
    removes every session and stops the service."""

    def __init__(self, workdir: Path, workers: int = 2) -> None:
        self.workdir = workdir
        self.workers = workers
        self.node: NodeService | None = None
        self.started: list[NodeDataServer] = []

    async def open(self) -> "DataServers":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node = await NodeService.open(self.workdir / "node.sock", managed=True, workers=self.workers,
                                           log_path=self.workdir / "node.log")
        return self

    @property
    def log(self) -> str:
        """What the service and its workers logged so far."""
        assert self.node is not None
        return self.node.log_path.read_text()

    async def start(self, role: str, targets: list[str], *, listeners: int | None = None,
                    secret: bytes | None = None, rate_kbps: int = 0, uid: str | None = None,
                    host: str = "127.0.0.1", **extra) -> NodeDataServer:
        """``extra``: more DataSpec fields (udp=True, udp_max_flows, ...)."""
        assert self.node is not None
        n = listeners or len(targets)
        ports = free_ports(n, host)
        targets = [targets[i % len(targets)] for i in range(n)]
        uid = uid or str(uuid.uuid4())
        spec = DataSpec(uid=uid, role=role, listen_host=host, ports=ports, targets=tuple(targets),
                        rate_kbps=rate_kbps, wan_secret=secret, service=str(self.node.path),
                        workdir=self.workdir / f"{role.lower()}-{uid[:8]}-{len(self.started)}", **extra)
        server = NodeDataServer(spec)
        await server.start()
        self.started.append(server)
        return server

    async def chain(self, target: str, *, tls: bool, rate_kbps: int = 0, listeners: int = 1,
                    cons_secret: bytes | None = None, **extra) -> tuple[NodeDataServer, NodeDataServer]:
        """PROD (-> target) and CONS (-> PROD); ``cons_secret`` gives CONS another secret;
        ``extra``: more DataSpec fields of both."""
        secret = wankeys.new_secret() if tls else None
        uid = str(uuid.uuid4())
        prod = await self.start("PROD", [target], listeners=listeners, secret=secret,
                                rate_kbps=rate_kbps, uid=uid, **extra)
        cons = await self.start("CONS", [f"127.0.0.1:{p}" for p in prod.spec.ports],
                                secret=cons_secret or secret, rate_kbps=rate_kbps, uid=uid, **extra)
        return prod, cons

    async def status(self) -> dict:
        """The service's ``status``: its pid and each worker's (pid, memory trims, ...)."""
        assert self.node is not None
        return await self.node.call({"op": "status"})

    async def worker_pids(self) -> list[int]:
        return [w["pid"] for w in (await self.status())["workers"]]

    async def worker_of(self, server: NodeDataServer, listener: int = 0) -> int:
        """The pid of the worker that accepts on ``server``'s listener ``listener``."""
        index = (await server.config())["workers"][listener]
        return (await self.worker_pids())[index]

    async def sessions(self) -> dict:
        assert self.node is not None
        return (await self.node.call({"op": "list"}))["sessions"]

    async def close(self) -> None:
        for s in self.started:
            await s.stop()
        if self.node is not None:
            await self.node.close(keep_running=False)


async def stats(server: NodeDataServer) -> dict:
    """Every counter of a session (``failed_connections``, ``tls_resumed``, ...)."""
    return await server.details()


@contextlib.asynccontextmanager
async def data_servers(workdir: Path, workers: int = 2) -> AsyncIterator[DataServers]:
    ds = DataServers(workdir, workers)
    try:
        yield await ds.open()
    finally:
        await ds.close()


def entry(server: NodeDataServer, i: int = 0) -> tuple[str, int]:
    return server.spec.listen_host, server.spec.ports[i]


class LoneWorker:
    """A node worker process on its own: its channel and inbox held here as the service
    holds them, its requests answered through ``call``; a connection to hand it comes from
    ``connection()`` (the client side, and the accepted side to send to its inbox)."""

    def __init__(self, env: dict | None = None) -> None:
        self.chan, chan_child = socket.socketpair()
        self.inbox, self.inbox_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.proc = subprocess.Popen([sys.executable, "-m", "scistream.data.node.worker", str(chan_child.fileno()),
                                      "0", f"--inbox={self.inbox_child.fileno()}"], env=env,
                                     pass_fds=(chan_child.fileno(), self.inbox_child.fileno()),
                                     stdin=subprocess.DEVNULL)
        chan_child.close()    # the inbox's reading end stays open here too, as in the service
        self.chan.setblocking(False)
        self.decoder = Decoder()
        self.ids = 0
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.clients: list[socket.socket] = []

    def connection(self) -> tuple[socket.socket, socket.socket]:
        client = socket.create_connection(self.lsock.getsockname())
        self.clients.append(client)
        accepted, _ = self.lsock.accept()
        return client, accepted

    def hand(self, sid: str, accepted: socket.socket) -> None:
        send_note(self.inbox, {"sid": sid, "listener": 0}, accepted.fileno())
        accepted.close()

    async def call(self, msg: dict) -> dict:
        self.ids += 1
        send_frame(self.chan, encode({**msg, "id": self.ids}))

        def reply():
            try:
                got = self.decoder.feed(self.chan)
            except BlockingIOError:
                return None
            return got[0][0] if got else None
        answer = await async_wait_until(reply, timeout=10, what=f"the worker to answer {msg['op']}")
        assert answer["ok"], answer
        return answer

    async def add_plain(self, sid: str, target: tuple[str, int]) -> None:
        cfg = {"uid": sid, "role": "PROD", "listen_host": "127.0.0.1", "ports": [], "tls": False,
               "targets": [f"{target[0]}:{target[1]}"]}
        await self.call({"op": "add", "sid": sid, "cfg": cfg, "listeners": [], "home": False, "nfds": 0})

    async def client(self, sid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection handed to the worker's session ``sid``: the client's streams."""
        client, accepted = self.connection()
        self.hand(sid, accepted)
        client.setblocking(False)
        return await asyncio.open_connection(sock=client)

    async def stream(self, sid: str, target: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain session ``sid`` to ``target`` on the worker, and a client connection
        handed to it: the client's streams."""
        await self.add_plain(sid, target)
        return await self.client(sid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for s in (self.chan, self.inbox, self.inbox_child, self.lsock, *self.clients):
            s.close()
