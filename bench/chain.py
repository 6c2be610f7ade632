"""Shared pieces of the benchmarks: a PROD+CONS chain of any backend, iperf3, an echo
server, CPU accounting of data-server processes.

Not a test module: the benchmarks under bench/ import it (they put bench/ on sys.path).

``UserChain`` builds the chain as a user does (two ``s2cs --type X`` and our client, see
gateway.py): what bench/throughput and bench/settings measure. ``Chain`` constructs the
two data servers directly from a ``DataSpec`` (no s2cs): bench/rate uses it to look at
the built-in data server's rate cap alone.

    async with UserChain("Builtin", tls=True, target=("127.0.0.1", 5201), workdir=tmp) as chain:
        host, port = chain.entry          # where the consumer connects (the CONS listener)
        cpu = chain.cpu_seconds()         # user+system seconds of every data-server process
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from scistream.data import wankeys  # noqa: E402
from scistream.data.base import DataServer, backend_names, get_backend  # noqa: E402
from scistream.data.spec import DataSpec  # noqa: E402
from scistream.data.supervise import stat_fields  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + v[4]                    # idle + iowait
    return (sum(v) - idle) / CLK_TCK, sum(v) / CLK_TCK


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process (threads included), zeros if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class Chain:
    """A PROD and a CONS data server of one backend, CONS -> PROD -> target."""

    def __init__(self, backend: str, *, tls: bool, target: tuple[str, int], workdir: Path,
                 rate_kbps: int = 0) -> None:
        self.backend = backend
        self.tls = tls
        self.target = target
        self.workdir = workdir
        self.rate_kbps = rate_kbps
        self.servers: list[DataServer] = []
        self.nodes: list[Any] = []      # Builtin: the node service of each gateway
        self.entry: tuple[str, int] = ("127.0.0.1", 0)

    async def __aenter__(self) -> "Chain":
        cls = get_backend(self.backend)
        cls.check_available()
        try:
            services = await self._node_services()
        except BaseException:
            await self.close()
            raise
        secret = wankeys.new_secret() if self.tls else None
        uid = str(uuid.uuid4())
        host = "127.0.0.1"
        tgt = f"{self.target[0]}:{self.target[1]}"
        prod_ports, cons_ports = (free_port(),), (free_port(),)
        prod = cls(DataSpec(uid=uid, role="PROD", listen_host=host, ports=prod_ports,
                            targets=(tgt,), rate_kbps=self.rate_kbps,
                            wan_secret=secret, workdir=self.workdir / "prod", service=services[0]))
        cons = cls(DataSpec(uid=uid, role="CONS", listen_host=host, ports=cons_ports,
                            targets=tuple(f"{host}:{p}" for p in prod_ports), rate_kbps=self.rate_kbps,
                            wan_secret=secret, workdir=self.workdir / "cons", service=services[1]))
        try:
            for s in (prod, cons):
                await s.start()
                self.servers.append(s)
        except BaseException:
            await self.close()
            raise
        self.entry = (host, cons_ports[0])
        return self

    async def _node_services(self) -> tuple[str, str]:
        """Builtin sessions live in a node service: one per gateway (PROD, CONS), started here
        as s2cs starts its own. Other backends: no service ("", "")."""
        if self.backend != "Builtin":
            return "", ""
        from scistream.data.node.backend import NodeService
        for role in ("prod", "cons"):
            self.nodes.append(await NodeService.open(self.workdir / f"{role}-node.sock", managed=True))
        return str(self.nodes[0].path), str(self.nodes[1].path)

    async def close(self) -> None:
        for s in reversed(self.servers):
            with contextlib.suppress(Exception):
                await s.stop()
        self.servers.clear()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.close(keep_running=False)
        self.nodes.clear()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()



class UserChain:
    """A session through a PROD and a CONS ``s2cs --type backend`` of its own, made the way a
    user makes one (gateway.GatewayPair: our client, the applications' hellos), CONS -> PROD
    -> target. ``tls=False`` runs both s2cs with ``--wan-plaintext``. ``num_conn`` listeners
    per side, every one to ``target``; ``entry`` is the first CONS listener. The data-server
    processes are every process below the two s2cs (the node service and its workers, or
    the per-session data servers)."""

    def __init__(self, backend: str, *, tls: bool, target: tuple[str, int], workdir: Path,
                 rate_kbps: int = 0, listeners: int = 1, env: dict[str, str] | None = None) -> None:
        self.backend, self.tls, self.target, self.workdir = backend, tls, target, workdir
        self.rate_kbps, self.listeners, self.env = rate_kbps, listeners, env
        self.entry: tuple[str, int] = ("127.0.0.1", 0)
        self.pair = None
        self.session = None

    async def __aenter__(self) -> "UserChain":
        from gateway import GatewayPair
        self.workdir.mkdir(parents=True, exist_ok=True)
        extra = [] if self.tls else ["--wan-plaintext"]
        pair = GatewayPair(self.workdir, self.backend, ports=self.listeners + 4, extra=extra, env=self.env)
        await pair.__aenter__()
        self.pair = pair
        try:
            self.session = await pair.session([f"{self.target[0]}:{self.target[1]}"], num_conn=self.listeners,
                                              rate=self.rate_kbps)
        except BaseException:
            await self.close()
            raise
        want = "tls" if self.tls else "plain"
        if want not in self.session.wan_security.lower():
            wan = self.session.wan_security
            await self.close()
            raise RuntimeError(f"{self.backend}: the WAN leg is {wan!r}, wanted {want}")
        self.entry = self.session.entry
        return self

    async def close(self) -> None:
        pair, self.pair = self.pair, None
        if pair is not None:
            if self.session is not None:
                with contextlib.suppress(Exception):
                    await pair.release(self.session, quiet=True)
            await pair.close()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def pids(self) -> list[int]:
        from gateway import all_data_pids
        if self.pair is None:
            return []
        return all_data_pids(self.pair.prod.pid) + all_data_pids(self.pair.cons.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of every data-server process."""
        parts = [proc_cpu_split(p) for p in self.pids()]
        return sum(u for u, _ in parts), sum(s for _, s in parts)


class Iperf3Server:
    """``iperf3 -s`` on a free loopback port, owned by a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Iperf3Server":
        if not shutil.which("iperf3"):
            raise SystemExit("iperf3 is not installed (apt-get install iperf3)")
        self.proc = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                break
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def iperf3_json(host: str, port: int, *, seconds: float, streams: int, reverse: bool,
                      attempts: int = 20) -> dict:
    """Run one iperf3 client (-J); retry while the server still finishes the previous test."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J",
            "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    data: dict = {}
    for _ in range(attempts):
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
        except asyncio.TimeoutError:
            out = b"{}"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        try:
            data = json.loads(out)
        except ValueError:
            data = {"error": "no output"}
        if "busy" not in str(data.get("error", "")):
            return data
        await asyncio.sleep(0.25)
    return data


async def iperf3(host: str, port: int, *, seconds: float, streams: int, reverse: bool) -> float:
    """Run one iperf3 client; return the received rate in Gbit/s (0.0 if it failed)."""
    return (await iperf3_run(host, port, seconds=seconds, streams=streams, reverse=reverse))[0]


async def iperf3_run(host: str, port: int, *, seconds: float, streams: int,
                     reverse: bool) -> tuple[float, float | None]:
    """Run one iperf3 client; return (received Gbit/s, CPU cores the two iperf3 ends used
    meanwhile, from iperf3's own accounting; None if it reported none). (0.0, None) if it failed."""
    data = await iperf3_json(host, port, seconds=seconds, streams=streams, reverse=reverse)
    try:
        gbit = data["end"]["sum_received"]["bits_per_second"] / 1e9
    except KeyError:
        print(f"    iperf3 failed: {data.get('error', 'no result')}", file=sys.stderr, flush=True)
        return 0.0, None
    cpu = data["end"].get("cpu_utilization_percent") or {}
    cores = (cpu["host_total"] + cpu["remote_total"]) / 100 if "host_total" in cpu and "remote_total" in cpu else None
    return gbit, cores


ECHO_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(4096); ls.setblocking(False)
print(ls.getsockname()[1], flush=True)
sel.register(ls, selectors.EVENT_READ, None)
while True:
    for key, _ in sel.select():
        if key.data is None:
            try:
                c, _ = ls.accept()
            except BlockingIOError:
                continue
            c.setblocking(False)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(c, selectors.EVENT_READ, 1)
        else:
            c = key.fileobj
            try:
                d = c.recv(65536)
            except (BlockingIOError, ConnectionError):
                d = None if isinstance(sys.exc_info()[1], BlockingIOError) else b""
            if d is None:
                continue
            if d:
                try:
                    c.sendall(d)
                except OSError:
                    pass
            else:
                sel.unregister(c); c.close()
"""


class EchoServer:
    """A small echo server process (the same one for the direct and the chained runs)."""

    def __enter__(self) -> "EchoServer":
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)   # Ctrl-C reaches the bench, which stops it
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def connect_echo_close(host: str, port: int, count: int, timeout: float = 60.0) -> tuple[float, int]:
    """Open, echo 1 byte, close, ``count`` times; return (seconds, failures)."""
    failures = 0
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    for _ in range(count):
        if time.monotonic() > deadline:
            failures += 1
            continue
        try:
            with socket.create_connection((host, port), 5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    failures += 1
        except OSError:
            failures += 1
    return time.perf_counter() - start, failures


def all_backends() -> list[tuple[str, str, bool]]:
    """(label, backend name, tls) for every registered backend, plain and TLS where meaningful."""
    out, seen = [], set()
    for alias in backend_names():
        cls = get_backend(alias)
        if cls in seen:
            continue
        seen.add(cls)
        name = cls.kind
        if name == "Builtin" or getattr(cls, "legacy_plaintext", False):
            out += [(f"{name} plain", name, False), (f"{name} TLS", name, True)]
        else:
            out.append((f"{name} TLS", name, True))
    out.sort(key=lambda c: c[1] != "Builtin")   # Builtin first, the others as registered
    return out


def tmpdir() -> Path:
    """A scratch directory for this run's data servers, removed when the benchmark exits."""
    path = Path(tempfile.mkdtemp(prefix="scistream-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
