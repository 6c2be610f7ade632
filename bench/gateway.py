"""Shared pieces of the benchmarks that build sessions the way a user does: real ``s2cs``
processes (PROD and CONS, ``--auth none --insecure``, loopback, free port ranges), our
client (``scistream.client.AsyncClient``) for req/update/release and a second client for
the application's hello, as ``appctrl`` sends it. No data server is constructed here:
whatever ``s2cs --type`` starts is what is measured.

Not a test module: the benchmarks under bench/ import it (they put bench/ on sys.path).

    async with GatewayPair(work, "Builtin", ports=10) as gw:
        s = await gw.session(["127.0.0.1:7000"], num_conn=2)     # req+hello, update, both sides
        host, port = s.entry                                     # the first CONS listener
        print(data_plane_pids(gw.prod.pid), pss_kib(gw.prod.pid))
        await gw.release(s)
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from scistream.addr import parse_listener  # noqa: E402
from scistream.client import AsyncClient  # noqa: E402
from scistream.data.supervise import free_port_check, stat_fields  # noqa: E402

#: command-line markers of the node service (``python -m scistream.cli.s2ds serve``) and
#: its workers (``python -m scistream.data.node.worker``) under an s2cs
NODE_MODULES = ("scistream.cli.s2ds", "scistream.data.node")


class UnknownType(RuntimeError):
    """``s2cs --type X`` refused X: this checkout does not know that type."""


# -- processes under an s2cs ------------------------------------------------------------
def _ppids() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from one scan of /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = stat_fields(int(entry))
            if f and f[0] != "Z":
                out[int(entry)] = int(f[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    kids: dict[int, list[int]] = {}
    for p, pp in _ppids().items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cmdline_text(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def data_plane_pids(s2cs_pid: int) -> dict[str, list[int]]:
    """The data-plane processes an s2cs started, by kind: ``node`` (the node service and its
    workers), ``other`` (HAProxy, nginx, stunnel and anything else below the s2cs)."""
    out: dict[str, list[int]] = {"node": [], "other": []}
    for p in descendants(s2cs_pid):
        text = cmdline_text(p)
        if not text:
            continue
        out["node" if any(m in text for m in NODE_MODULES) else "other"].append(p)
    return out


def all_data_pids(s2cs_pid: int) -> list[int]:
    return [p for pids in data_plane_pids(s2cs_pid).values() for p in pids]


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the running task, as Ctrl-C does: its cleanup stops what it started
    (the s2cs run in sessions of their own, so only the benchmark gets the terminal's Ctrl-C)."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def free_range(count: int, *, lo: int = 15000, hi: int = 32000, avoid: Sequence[range] = (),
               attempts: int = 200) -> range:
    """``count`` consecutive ports, every one bindable on 127.0.0.1 now, outside ``avoid``
    (below the kernel's ephemeral range, so outgoing connections do not take them)."""
    for _ in range(attempts):
        base = random.randrange(lo, hi - count)
        r = range(base, base + count)
        if any(r.start < a.stop and a.start < r.stop for a in avoid):
            continue
        if all(free_port_check("127.0.0.1", p) for p in r):
            return r
    raise RuntimeError(f"no {count} consecutive free ports in {lo}-{hi}")


# -- one s2cs ----------------------------------------------------------------------------
class S2cs:
    """One ``s2cs`` process on loopback (``--auth none --insecure --drain``), stopped on exit."""

    def __init__(self, work: Path, name: str, server_type: str, ports: range, *,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.name, self.type, self.ports = name, server_type, ports
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ready = self.dir / "ready.json"
        self.log_path = self.dir / "s2cs.log"
        argv = [sys.executable, "-m", "scistream.cli.s2cs", "--port", "0", "--listener-ip", "127.0.0.1",
                "--type", server_type, "--port-range", f"{ports.start}-{ports.stop - 1}",
                "--state-dir", str(self.dir / "state"), "--auth", "none", "--insecure", "--drain",
                "--hello-timeout", "600", "--max-conn", "64", *extra, "--ready-file", str(self.ready)]
        self.logf = open(self.log_path, "wb")
        raise_nofile()   # the s2cs and its data servers inherit the raised open-file limit
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)   # Ctrl-C reaches the bench, which stops it
        self.pid = self.proc.pid
        self.port = 0
        self.target = ""

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.ready.exists():
                with contextlib.suppress(ValueError):
                    info = json.loads(self.ready.read_text())
                    self.port, self.pid = info["port"], info["pid"]
                    self.target = f"127.0.0.1:{self.port}"
                    return
            if self.proc.poll() is not None:
                text = self.log_path.read_text(errors="replace")
                if "--type" in text and ("Invalid value" in text or "not one of" in text):
                    raise UnknownType(f"s2cs does not know --type {self.type}")
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {text[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s: "
                                   f"{self.log_path.read_text(errors='replace')[-1500:]}")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (with --drain: every session released), then SIGKILL of what is left."""
        left = all_data_pids(self.proc.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in left:   # a data server that outlived its s2cs (it should not)
            with contextlib.suppress(OSError):
                if stat_fields(p) is not None:
                    os.kill(p, signal.SIGKILL)
        self.logf.close()


@dataclass
class Session:
    uid: str
    prod_listeners: tuple[str, ...] = ()
    cons_listeners: tuple[str, ...] = ()
    wan_security: str = ""
    times: dict[str, float] = field(default_factory=dict)

    @property
    def entry(self) -> tuple[str, int]:
        return parse_listener(self.cons_listeners[0])


class GatewayPair:
    """A PROD and a CONS ``s2cs`` of one type, with the user's and the applications' clients."""

    def __init__(self, work: Path, server_type: str, *, ports: int = 20, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.work, self.type, self.nports, self.extra, self.env = work, server_type, ports, extra, env
        self.prod: S2cs | None = None
        self.cons: S2cs | None = None
        self.clients: list[AsyncClient] = []

    async def __aenter__(self) -> "GatewayPair":
        tag = f"{self.type}-{uuid.uuid4().hex[:6]}"
        try:
            pr = free_range(self.nports)
            self.prod = S2cs(self.work, f"prod-{tag}", self.type, pr, extra=self.extra, env=self.env)
            cr = free_range(self.nports, avoid=[pr])
            self.cons = S2cs(self.work, f"cons-{tag}", self.type, cr, extra=self.extra, env=self.env)
            await self.prod.wait_ready()
            await self.cons.wait_ready()
            # the user's client and, on its own channel, the application controllers' (appctrl)
            self.pc = self._client(self.prod.target)
            self.cc = self._client(self.cons.target)
            self.pa = self._client(self.prod.target)
            self.ca = self._client(self.cons.target)
        except BaseException:
            await self.close()
            raise
        return self

    def _client(self, target: str) -> AsyncClient:
        c = AsyncClient(target, insecure=True)
        self.clients.append(c)
        return c

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
        self.clients.clear()
        for s in (self.cons, self.prod):
            if s is not None:
                await asyncio.to_thread(s.stop)

    async def session(self, endpoints: Sequence[str], *, num_conn: int = 1, rate: int = 0,
                      timeout: float = 120) -> Session:
        """A whole session the way a user and two application controllers make one: req PROD
        + the producer's hello, update PROD, req CONS + the consumer's hello, update CONS.
        ``times`` holds perf_counter() at each step's end ("start" first). On failure both
        sides are released before the error propagates."""
        s = Session(str(uuid.uuid4()))
        s.times["start"] = time.perf_counter()
        try:
            req = asyncio.ensure_future(self.pc.req(s.uid, "PROD", num_conn, rate, timeout=timeout))
            try:
                await self.pa.hello(s.uid, "PROD", list(endpoints), timeout=timeout)
                p = await req
            finally:
                if not req.done():
                    req.cancel()
            s.prod_listeners = tuple(p.listeners)
            s.times["prod_hello"] = time.perf_counter()
            upd = await self.pc.update(s.uid, "PROD", list(p.prod_listeners), p.wan_secret, timeout=timeout)
            s.wan_security = upd.wan_security
            s.times["prod_update"] = time.perf_counter()
            creq = asyncio.ensure_future(self.cc.req(s.uid, "CONS", num_conn, rate, timeout=timeout))
            try:
                hello = await self.ca.hello(s.uid, "CONS", timeout=timeout)
                await creq
            finally:
                if not creq.done():
                    creq.cancel()
            s.cons_listeners = tuple(hello.listeners)
            s.times["cons_hello"] = time.perf_counter()
            await self.cc.update(s.uid, "CONS", list(p.listeners), p.wan_secret, timeout=timeout)
            s.times["cons_update"] = time.perf_counter()
        except BaseException:
            await asyncio.shield(self.release(s, quiet=True))
            raise
        return s

    async def release(self, s: Session, *, quiet: bool = False) -> tuple[float, float]:
        """Release both sides; (PROD seconds, CONS seconds) of the two release calls."""
        out = []
        for c in (self.pc, self.cc):
            t0 = time.perf_counter()
            try:
                await c.release(s.uid, timeout=60)
            except Exception:
                if not quiet:
                    raise
            out.append(time.perf_counter() - t0)
        return out[0], out[1]
