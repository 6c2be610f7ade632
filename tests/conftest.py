"""Shared fixtures: real control servers (in-process or as `s2cs` processes), an echo
application, helpers that wait for a condition with a deadline, and a check that every
test leaves no child process behind."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import pytest

from scistream.client import AsyncClient
from scistream.control.server import ControlServer, ServerConfig
from scistream.data.supervise import children, cmdline, free_port_check, stat_fields

BIN = Path(sys.executable).parent


class Bg:
    """A CLI of ours running in the background, its output (stdout and stderr) collected
    line by line; ``stop()`` ends it (SIGTERM) and reaps it."""

    def __init__(self, *args: str, env: dict) -> None:
        self.proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        return rc

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.wait(timeout)


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Until ``cond()`` is true; returns its value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return value


async def async_wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Until ``cond()`` is true (awaited if it returns an awaitable); returns its value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


_range_lock = Path(os.environ.get("TMPDIR", "/tmp")) / "scistream-test-ports"


def port_block(size: int = 40) -> str:
    """A block of ports no other test of this run uses, from a per-run counter.

    Ports come from 10000-32000, below the kernel's ephemeral range (where outgoing
    connections take their ports), in blocks; a port another program holds is skipped by
    the server's own allocator, so the block is a soft reservation only."""
    global _next_block
    start = _next_block
    _next_block += size
    if _next_block > 32000:
        _next_block = 10000 + (os.getpid() % 50) * 200
    return f"{start}-{start + size - 1}"


_next_block = 10000 + (os.getpid() % 100) * 200


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``host`` right now (bound to port 0, then let go)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> tuple[int, ...]:
    """``n`` distinct ports free on ``host`` right now (held together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                 for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return tuple(s.getsockname()[1] for s in socks)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``port`` can be bound on ``host`` right now (a stopped server let it go)."""
    return free_port_check(host, port)



@pytest.fixture
def cli_env(tmp_path) -> dict:
    """The environment of a CLI run as a new user's: its own client config directory (session
    files, tokens) in the test's tmp dir, and none of the settings a developer's shell may
    carry (token, server certificate, addresses, gRPC's logging)."""
    env = dict(os.environ)
    env["SCISTREAM_CONFIG_DIR"] = str(tmp_path / "client-config")
    for k in ("SCISTREAM_TOKEN", "SCISTREAM_SERVER_CERT", "SCISTREAM_S2CS", "SCISTREAM_PROD_S2CS",
              "SCISTREAM_CONS_S2CS", "GRPC_VERBOSITY"):
        env.pop(k, None)
    return env

def new_uid() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def servers(tmp_path):
    """Start in-process control servers: ``srv = await servers(**ServerConfig fields)``.

    Each has ``.target`` ("127.0.0.1:PORT") and ``.registry``; all are stopped at the end."""
    made: list[ControlServer] = []

    async def make(**kw) -> ControlServer:
        kw.setdefault("port", 0)
        kw.setdefault("auth", "none")
        kw.setdefault("insecure", True)
        kw.setdefault("port_range", port_block())
        kw.setdefault("state_dir", tmp_path / f"s2cs-{len(made)}")
        authenticator = kw.pop("authenticator", None)
        srv = ControlServer(ServerConfig(**kw), authenticator=authenticator)
        await srv.start()
        srv.target = f"127.0.0.1:{srv.port}"
        made.append(srv)
        return srv

    yield make
    for srv in made:
        await srv.stop()


@pytest.fixture(scope="module")
def original_stubs(tmp_path_factory):
    """Client code generated, at test time, from the original tooling's .proto:
    (the directory to put on sys.path, tests/fixtures); scripts there import ``orig``."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path_factory.mktemp("original")
    src = Path(__file__).parent / "fixtures"
    (out / "orig").mkdir()
    (out / "orig" / "__init__.py").write_text("")
    (out / "orig" / "scistream.proto").write_text((src / "original_scistream.proto").read_text())
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(out / "orig" / "scistream.proto")]) == 0
    return out, src


@pytest.fixture
async def client_for():
    clients: list[AsyncClient] = []

    def make(srv, **kw) -> AsyncClient:
        kw.setdefault("insecure", True)
        c = AsyncClient(srv.target if hasattr(srv, "target") else srv, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """An application endpoint that echoes every byte back (both directions at once)."""
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while chunk := await r.read(1 << 16):
                w.write(chunk)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except ConnectionError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[:2]


async def echo_roundtrip(host: str, port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send payload while reading it back; half-close at the end; return what came back."""
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 18):
            w.write(view[i:i + (1 << 18)])
            await w.drain()
        w.write_eof()

    try:
        sender = asyncio.create_task(send())
        try:
            got = await asyncio.wait_for(r.read(-1), timeout)
        finally:
            # a sender that failed leaves its mark on what came back, which callers check
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
    finally:
        w.close()
    return got


async def roundtrip_ok(listener: str, size: int = 1 << 20) -> None:
    """``size`` random bytes through ``listener`` (host:port) to an echo application and back,
    checked."""
    payload = os.urandom(size)
    got = await echo_roundtrip(*parse_listener(listener), payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def prod_session(req_client: AsyncClient, hello_client: AsyncClient, endpoints: str | Iterable[str],
                       num_conn: int = 1, rate: int = 0, lease: int = 0, *, legacy: bool = False) -> tuple[str, Any]:
    """The PROD half of a session: req on ``req_client``; the producer's hello naming
    ``endpoints`` and the update on ``hello_client`` (the same client, or another instance
    of a facility, which the application controller reached). ``legacy``: the update
    carries no WAN secret, as the original tooling's client sends it. (uid, PROD's req
    response: listeners, prod_listeners, wan_secret)."""
    uid = new_uid()
    req = asyncio.create_task(req_client.req(uid, "PROD", num_conn, rate, lease=lease))
    try:
        await hello_client.hello(uid, "PROD", [endpoints] if isinstance(endpoints, str) else list(endpoints))
    except BaseException:
        req.cancel()
        await asyncio.gather(req, return_exceptions=True)
        raise
    prod = await req
    await hello_client.update(uid, "PROD", prod.prod_listeners, b"" if legacy else prod.wan_secret)
    return uid, prod


async def cons_session(cc: AsyncClient, uid: str, prod: Any, rate: int = 0, lease: int = 0, *,
                       legacy: bool = False) -> Any:
    """The CONS half of session ``uid`` whose PROD half answered ``prod``: req + the
    consumer's hello, update to PROD's listeners. CONS's update response: ``listeners``
    (where the consumer connects, as the hello answered) and ``wan_security``."""
    req = asyncio.create_task(cc.req(uid, "CONS", len(prod.listeners), rate, lease=lease))
    hello = await cc.hello(uid, "CONS")
    cons = await req
    update = await cc.update(uid, "CONS", prod.listeners, b"" if legacy else prod.wan_secret)
    assert list(hello.listeners) == list(cons.listeners) == list(update.listeners)
    return update


async def connect_session(pc: AsyncClient, cc: AsyncClient, endpoints: str | Iterable[str], num_conn: int = 2,
                          rate: int = 0, lease: int = 0, *, legacy: bool = False) -> tuple[str, Any, Any]:
    """A whole session through the clients of a PROD and a CONS server, as a user and two
    application controllers make it (``prod_session`` on ``pc``, then ``cons_session`` on
    ``cc``): (uid, PROD's req response, CONS's update response), both connected."""
    uid, prod = await prod_session(pc, pc, endpoints, num_conn, rate, lease, legacy=legacy)
    return uid, prod, await cons_session(cc, uid, prod, rate, lease, legacy=legacy)


async def still_listening(listeners: Iterable[str]) -> list[str]:
    """Those of ``listeners`` (host:port) that still accept a connection."""
    left = []
    for listener in listeners:
        try:
            _, w = await asyncio.open_connection(*parse_listener(listener))
        except OSError:
            continue
        w.close()
        left.append(listener)
    return left


def parse_listener(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class S2csProcess:
    """An ``s2cs`` process: started with --ready-file, stopped with SIGTERM at teardown."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.ready = tmp / f"ready-{uuid.uuid4().hex[:8]}.json"
        self.log_path = tmp / f"s2cs-{uuid.uuid4().hex[:8]}.log"
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(BIN / "s2cs"), *args, "--ready-file", str(self.ready)],
                                     stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 30, "s2cs to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"s2cs exited {self.proc.returncode}: {self.log()}")
        info = json.loads(self.ready.read_text())
        self.port = info["port"]
        self.state_dir = Path(info["state_dir"])
        self.target = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode


@pytest.fixture
def s2cs_process(tmp_path):
    """Start ``s2cs`` processes: ``p = s2cs_process("--type", "Builtin", ...)``."""
    procs: list[S2csProcess] = []

    def start(*args: str, auth: str | None = "none", insecure: bool = True) -> S2csProcess:
        full = ["--port", "0", "--listener-ip", "127.0.0.1", "--port-range", port_block(),
                "--state-dir", str(tmp_path / f"state-{len(procs)}")]
        if auth:
            full += ["--auth", auth]
        if insecure:
            full.append("--insecure")
        p = S2csProcess(full + list(args), tmp_path)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in sorted(children(todo.pop())):
            seen.append(c)
            todo.append(c)
    return seen


def processes_mentioning(text: str) -> dict[int, str]:
    """Processes whose command line names ``text`` (a data server's config under a test's
    tmp dir, say), whoever their parent is: data servers run in their own sessions and
    outlive a control server that was stopped without releasing them."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        cmd = " ".join(cmdline(int(entry)))
        state = stat_fields(int(entry))
        if state is None or state[0] == "Z":
            continue
        if text in cmd:
            found[int(entry)] = cmd
    return found


def _names_in_hosts_file() -> set[str]:
    names: set[str] = set()
    with contextlib.suppress(OSError), open("/etc/hosts") as f:
        for line in f:
            names.update(n.lower().rstrip(".") for n in line.split("#")[0].split()[1:])
    return names


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@pytest.fixture(autouse=True, scope="session")
def no_dns_queries():
    """Tests talk to loopback and to the namespaces they build, nothing else: a name that
    only a DNS server could answer is a bug in the test (or in the code under test), so a
    lookup of one fails here instead of leaving the machine. Names in /etc/hosts
    (localhost) and addresses are looked up as usual. This guards this process; the
    processes the tests start are given addresses, not names."""
    allowed = _names_in_hosts_file()
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name and not _is_address(name) and name.lower().rstrip(".") not in allowed:
            raise socket.gaierror(socket.EAI_NONAME,
                                  f"tests may not look up {name!r}: it is not in /etc/hosts, so it would query DNS")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    try:
        yield
    finally:
        socket.getaddrinfo = real


@pytest.fixture(autouse=True)
def no_leftover_processes(tmp_path):
    """Every test must leave no process behind: no child of pytest, and no process (data
    server, proxy) started from the test's own tmp dir, whoever its parent."""
    before = set(_descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 10
    while True:
        left = {pid: "" for pid in set(_descendants(os.getpid())) - before}
        left.update(processes_mentioning(str(tmp_path)))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        cmds = []
        for pid in left:
            with contextlib.suppress(OSError):
                cmds.append(f"{pid}: " + open(f"/proc/{pid}/cmdline").read().replace("\0", " "))
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        pytest.fail("test left processes behind: " + "; ".join(cmds))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """``@pytest.mark.compiled``: the test needs the compiled pumps (``_pump.c``), built,
    linked with the libssl Python's ssl runs, and chosen: skipped, saying why, where they
    are not (.ci/run checks that they were built, and runs the data-plane tests again
    with ``SCISTREAM_PUMPS=python``, where these are skipped)."""
    if item.get_closest_marker("compiled"):
        from scistream.data.engine import compiled
        if compiled.module is None:
            pytest.skip("needs the compiled module (_pump.c), which was not built")
        if compiled.ssl_ext is None:
            pytest.skip("the compiled module is linked with another libssl than Python's ssl")
        if compiled.pump is None:
            pytest.skip("SCISTREAM_PUMPS=python: the Python pumps are chosen")
