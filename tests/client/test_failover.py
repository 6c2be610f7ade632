"""A facility of several control server instances, from the client's side: ``--s2cs a,b``
and ``AsyncClient([a, b])`` move to the next instance when one is unreachable (refused,
reset mid-call, killed mid-req), stay on the one that answered, and refuse bad lists.

The dead instances are real loopback sockets: a port bound but not listening (every
connection refused), or a listener that accepts, reads the call and resets it mid-call.
The live ones are real ``s2cs`` processes or in-process servers, with real bytes through
the session."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from conftest import BIN, async_wait_until, new_uid, roundtrip_ok, wait_until
from scistream.client import AsyncClient, Client, Gateway, connect, release, status
from scistream.client.instances import (BadInstances, Unreachable, may_have_arrived, parse_instances,
                                        release_is_done)
from scistream.control.tlscert import make_self_signed
from scistream.data.node.client import call_once
from scistream.errors import InvalidArgument, NotFound, ScistreamError


# -- dead instances ----------------------------------------------------------------------
@pytest.fixture
def dead():
    """Loopback addresses where nothing listens: bound (so nobody else takes the port) but
    not listening, so every connection is refused."""
    socks: list[socket.socket] = []

    def make() -> str:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        return f"127.0.0.1:{s.getsockname()[1]}"
    yield make
    for s in socks:
        s.close()


@pytest.fixture
def silent():
    """A loopback address that never answers a connection attempt, like a node that is off:
    a listening socket whose accept queue is full (nobody accepts), so the kernel drops
    every new SYN."""
    made: list[socket.socket] = []

    def make() -> str:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        made.append(srv)
        for _ in range(3):   # fill the accept queue
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(srv.getsockname())
            made.append(c)
        return f"127.0.0.1:{srv.getsockname()[1]}"
    yield make
    for s in made:
        s.close()


class Resetter:
    """An instance that dies mid-call: it accepts the connection, speaks enough HTTP/2 for
    the call to go out (an empty SETTINGS frame), reads until the call's HEADERS frame has
    arrived, then resets the connection. ``calls`` counts the calls it cut."""

    def __init__(self) -> None:
        self.calls = 0
        self.srv: asyncio.base_events.Server | None = None
        self.target = ""

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")   # SETTINGS, no parameters
            await w.drain()
            await r.readexactly(24)                             # the client's preface
            while True:
                head = await r.readexactly(9)
                length, kind = int.from_bytes(head[:3], "big"), head[3]
                await r.readexactly(length)
                if kind == 0x1:                                 # HEADERS: the call is here
                    break
            self.calls += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sock = w.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()

    async def __aenter__(self) -> "Resetter":
        self.srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.target = f"127.0.0.1:{self.srv.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.srv is not None
        self.srv.close()
        await self.srv.wait_closed()


def audit(state_dir: Path, uid: str = "") -> list[dict]:
    """The audit log of a control server: the RPCs it served (of ``uid``)."""
    lines = [json.loads(l) for l in (state_dir / "audit.log").read_text().splitlines() if l.strip()]
    return [e for e in lines if not uid or e.get("uid") == uid]


def served(state_dir: Path, uid: str) -> list[tuple[str, str]]:
    return [(e["what"], e["result"]) for e in audit(state_dir, uid) if e.get("who") != "s2cs"]


# -- CLI helpers -------------------------------------------------------------------------

def run(*args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Bg:
    def __init__(self, *args, env) -> None:
        self.proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.err = ""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout=60) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        self.err = self.proc.stderr.read()  # type: ignore[union-attr]
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._t.join(5)
        self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def bg():
    started: list[Bg] = []

    def start(*args, env) -> Bg:
        b = Bg(*args, env=env)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()


def _echo_endpoint():
    """A threaded echo application (for the processes' sessions); (address, stop)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                with contextlib.suppress(OSError):
                    while data := conn.recv(1 << 16):
                        conn.sendall(data)
    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(5)
        srv.close()
    return f"127.0.0.1:{srv.getsockname()[1]}", close


# -- 1. the CLIs over DEAD,LIVE ----------------------------------------------------------
def test_cli_session_over_a_dead_and_a_live_instance(s2cs_process, dead, cli_env, bg, tmp_path):
    """prod-req, appctrl's hello, inbound-request, status and release with --s2cs DEAD,LIVE:
    every call lands on LIVE (its audit log says so) and the user sees no error. The
    certificate is a bundle (another facility's certificate and LIVE's)."""
    live = s2cs_process(insecure=False)
    make_self_signed(tmp_path / "other.crt", tmp_path / "other.key", ["gw-other.example.org"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "other.crt").read_bytes() + (live.state_dir / "server.crt").read_bytes())
    facility = f"{dead()},{live.target}"
    tls = ["--server-cert", str(bundle)]
    endpoint, close = _echo_endpoint()
    try:
        preq = bg("s2uc", "prod-req", "--s2cs", facility, "--num-conn", "2", *tls, env=cli_env)
        wait_until(lambda: len(preq.lines) >= 3, 30, "prod-req header")
        uid, s2cs, token, role = preq.lines[1].split()
        assert (s2cs, token, role) == (facility, "-", "PROD")
        hello = run("appctrl", "create-appctrl", uid, facility, "-", "PROD", "--app", "none",
                    "--endpoint", endpoint, *tls, env=cli_env)
        assert hello.returncode == 0, hello.stderr
        assert preq.wait(60) == 0, preq.err
        assert preq.lines[-1] == uid and len(re.findall(r'^listeners: "', "\n".join(preq.lines), re.M)) == 2
        # the session file keeps the whole list: status and release without --s2cs use it
        st = run("s2uc", "status", uid, "--json", *tls, env=cli_env)
        assert st.returncode == 0, st.stderr
        [doc] = json.loads(st.stdout)
        assert (doc["state"], doc["server"], doc["targets"]) == ("connected", facility, [endpoint] * 2)
        rel = run("s2uc", "release", uid, *tls, env=cli_env)
        assert (rel.returncode, rel.stdout.strip(), rel.stderr) == (0, "Release completed", "")
        calls = served(live.state_dir, uid)   # prod-req asks status until the req is taken
        assert sorted(c for c in calls if c[0] != "status") == [("hello", "OK"), ("release", "OK"), ("req", "OK"),
                                                                ("update", "OK")]
        assert ("status", "OK") in calls

        inb = run("s2uc", "inbound-request", "--s2cs", facility, "--num-conn", "1", "--remote-ip", "127.0.0.1",
                  "--receiver-ports", endpoint.rsplit(":", 1)[1], *tls, env=cli_env)
        assert inb.returncode == 0, inb.stderr
        uid2 = inb.stdout.strip().splitlines()[-1]
        rel = run("s2uc", "release", uid2, "--s2cs", f"{dead()},{live.target}", *tls, env=cli_env)
        assert rel.returncode == 0, rel.stderr
        assert sorted(served(live.state_dir, uid2)) == [("hello", "OK"), ("release", "OK"), ("req", "OK"),
                                                        ("update", "OK")]
        # every instance down: UNAVAILABLE naming both, exit 4
        down = run("s2uc", "status", uid2, "--s2cs", f"{dead()},{dead()}", "--insecure", "--timeout", "1",
                   env=cli_env)
        assert down.returncode == 4, down.stderr
        assert "cannot reach any instance" in down.stderr and len(down.stderr.strip().splitlines()) == 1
    finally:
        close()


def test_cli_connect_start_apps_over_dead_and_live_instances(s2cs_process, dead, cli_env, tmp_path):
    """s2uc connect --start-apps with DEAD,LIVE on both sides: the appctrl processes it starts
    get the lists too; 8 MiB streamed and verified; both sides released on LIVE. Then
    s2uc status with one --s2cs per facility, each a list."""
    cert, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    make_self_signed(cert, key, ["gw.example.org"])
    tls = ("--server-cert", str(cert), "--server-key", str(key))
    prod, cons = s2cs_process(*tls, insecure=False), s2cs_process(*tls, insecure=False)
    pf, cf = f"{dead()},{prod.target}", f"{dead()},{cons.target}"
    p = run("s2uc", "connect", "--prod-s2cs", pf, "--cons-s2cs", cf, "--server-cert", str(cert),
            "--num-conn", "2", "--start-apps", "--size", "8M", "--json", env=cli_env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    uid = doc["uid"]
    assert (doc["prod_s2cs"], doc["cons_s2cs"]) == (pf, cf)
    assert doc["transfer"]["bytes"] == 8 << 20 and doc["transfer"]["released"]["prod"] is True
    for srv in (prod, cons):
        assert sorted(e for e in served(srv.state_dir, uid) if e[0] != "status") == \
            [("hello", "OK"), ("release", "OK"), ("req", "OK"), ("update", "OK")]
    # status: each --s2cs is one facility (PROD, CONS); a comma lists its instances
    st = run("s2uc", "status", uid, "--s2cs", pf, "--s2cs", cf, "--json", "--server-cert", str(cert), env=cli_env)
    assert st.returncode == 0, st.stderr
    got = sorted((d["role"], d["server"], d["state"]) for d in json.loads(st.stdout))
    assert got == [("CONS", cf, "released"), ("PROD", pf, "released")]


# -- 2. the Python API: a whole session, real bytes --------------------------------------
async def _hello_when_requested(srv, uid: str, role: str, endpoints=()):
    await async_wait_until(lambda: (uid, role) in srv.registry.active, 20, f"{role} req")
    async with AsyncClient(srv.target, insecure=True) as c:
        return await c.hello(uid, role, list(endpoints))


async def test_connect_with_the_first_instance_dead_streams_real_bytes(servers, dead, echo_server):
    prod, cons = await servers(), await servers()
    pg = Gateway([dead(), prod.target], insecure=True)
    cg = Gateway(f"{dead()}, {cons.target}", insecure=True)
    assert pg.address == ",".join(pg.addresses) and pg.addresses[1] == prod.target
    assert cg.addresses[1] == cons.target
    uid = new_uid()
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    hellos = asyncio.gather(_hello_when_requested(prod, uid, "PROD", [endpoint]),
                            _hello_when_requested(cons, uid, "CONS"))
    conn = await connect(pg, cg, num_conn=2, uid=uid, hello_timeout=60)
    await hellos
    assert conn.prod_s2cs == pg.address and conn.cons_s2cs == cg.address
    for listener in conn.consumer_listeners:
        await roundtrip_ok(listener, 1 << 20)
    [st] = await status(pg, uid)
    assert st.state == "connected" and st.bytes_in >= 2 << 20
    released = await release(conn)
    assert (released.prod, released.cons) == (True, True)
    assert not prod.registry.active and not cons.registry.active
    served_prod = [(e["what"], e["result"]) for e in audit(prod.state_dir, uid) if e["who"] != "s2cs"]
    assert sorted(served_prod) == sorted([("req", "OK"), ("hello", "OK"), ("update", "OK"), ("status", "OK"),
                                          ("release", "OK")])


# -- 3. sticky, round-robin, bounded -----------------------------------------------------
async def test_sticky_to_the_instance_that_answered(servers, dead):
    live = await servers()
    first, last = dead(), dead()
    async with AsyncClient([first, live.target, last], insecure=True) as c:
        assert c.target == first and c.address == f"{first},{live.target},{last}"
        await c.status()
        assert c.target == live.target
        assert [a.address for a in c.last_unreachable] == [first]
        assert not c.last_unreachable[0].may_have_arrived      # refused: never reached a server
        for _ in range(3):
            await c.status()
            assert c.last_unreachable == [] and c.target == live.target  # the dead one not tried first
        await async_wait_until(lambda: [e["what"] for e in audit(live.state_dir)].count("status") == 4, 10,
                               "LIVE's audit log: 4 status calls")
        # LIVE goes away: round-robin from it (last, first, LIVE, ...) until the deadline
        await live.stop()
        with pytest.raises(ScistreamError) as info:
            await c.status(timeout=1.0)
        assert info.value.status.name == "UNAVAILABLE"
        assert "cannot reach any instance" in str(info.value) and first in str(info.value)
        order = [a.address for a in c.last_unreachable]
        assert order[:3] == [live.target, last, first] and len(order) > 3
        assert order == [[live.target, last, first][i % 3] for i in range(len(order))]


async def test_an_instance_that_never_answers_is_left_after_the_connect_timeout(servers, silent):
    """A node that is off answers no connection attempt: after ``connect_timeout`` the call
    moves on (without it, gRPC waits 20 s and the 8 s call would fail DEADLINE_EXCEEDED)."""
    live = await servers()
    off = silent()
    async with AsyncClient([off, live.target], insecure=True, connect_timeout=1.0) as c:
        resp = await c.status(timeout=8)
        assert list(resp.sessions) == [] and c.target == live.target
        [miss] = c.last_unreachable
        assert miss.address == off and not miss.may_have_arrived, miss


def test_blocking_client_fails_over_too(s2cs_process, dead):
    live = s2cs_process()
    first = dead()
    with Client([first, live.target], insecure=True) as c:
        assert list(c.status().sessions) == [] and c.target == live.target
        assert [a.address for a in c.last_unreachable] == [first]
        c.status()
        assert c.last_unreachable == []
    with pytest.raises(ScistreamError) as info:
        with Client([first, dead()], insecure=True) as c:
            c.status(timeout=0.5)
    assert info.value.status.name == "UNAVAILABLE" and first in str(info.value)


# -- 4. an instance killed mid-req --------------------------------------------------------
async def test_req_moves_to_the_next_instance_when_its_instance_is_killed(s2cs_process, tmp_path):
    """Both instances share one certificate, as docs/user-guide.md recommends for a facility."""
    cert, key = tmp_path / "facility.crt", tmp_path / "facility.key"
    make_self_signed(cert, key, ["gw.example.org"])
    tls = ("--server-cert", str(cert), "--server-key", str(key))
    a = s2cs_process(*tls, insecure=False)
    b = s2cs_process(*tls, insecure=False)
    uid = new_uid()
    async with AsyncClient(f"{a.target},{b.target}", server_cert=str(cert)) as c, \
            AsyncClient(a.target, server_cert=str(cert)) as on_a, \
            AsyncClient(b.target, server_cert=str(cert)) as on_b:
        req = asyncio.create_task(c.req(uid, "PROD", 1))
        await async_wait_until(lambda: _state(on_a, uid), 20, "the req waiting on A")
        a.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(a.proc.wait, 10)
        assert await async_wait_until(lambda: _state(on_b, uid), 20, "the req moved to B") == "requested"
        assert not req.done()
        await on_b.hello(uid, "PROD", ["127.0.0.1:5074"])
        resp = await asyncio.wait_for(req, 30)
        assert len(resp.listeners) == 1 and len(resp.wan_secret) == 32
        assert c.target == b.target
        [cut] = c.last_unreachable
        assert cut.address == a.target and cut.may_have_arrived, cut   # reset mid-call, not refused
        await c.release(uid)
    assert sorted(e for e in served(b.state_dir, uid) if e[0] != "status") == \
        [("hello", "OK"), ("release", "OK"), ("req", "OK")]
    assert ("req", "OK") not in served(a.state_dir, uid)   # A died with its req
    # A's node service outlives it, as it is meant to (for the next s2cs on its state)
    await call_once(a.state_dir / "node.sock", {"op": "shutdown"})


async def _state(client: AsyncClient, uid: str) -> str:
    try:
        resp = await client.status(uid, timeout=5)
    except NotFound:
        return ""
    return resp.sessions[0].state if resp.sessions else ""


# -- 5. bad lists ------------------------------------------------------------------------
@pytest.mark.parametrize("args,code,text", [
    (["s2uc", "prod-req", "--s2cs", "127.0.0.1:5000,,127.0.0.1:5001", "--insecure"], 2, "address 2 of 3 is empty"),
    (["s2uc", "prod-req", "--s2cs", ",", "--insecure"], 2, "address 1 of 2 is empty"),
    (["s2uc", "cons-req", "--s2cs", "127.0.0.1:5000,", "--insecure", "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11",
      "127.0.0.1:5100"], 2, "is empty"),
    (["s2uc", "release", "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11", "--s2cs", ",127.0.0.1:5000", "--insecure"], 2,
     "is empty"),
    (["s2uc", "release", "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11", "--insecure"], 2, "no record of session"),
    (["s2uc", "status", "--s2cs", "127.0.0.1:5000", "--s2cs", "127.0.0.1:5001,,", "--insecure"], 2, "is empty"),
    (["s2uc", "connect", "--prod-s2cs", "127.0.0.1:5000,,", "--cons-s2cs", "127.0.0.1:5001", "--insecure"], 2,
     "is empty"),
    (["appctrl", "mock", "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11", ",,", "-", "PROD", "--insecure"], 2, "is empty"),
    (["s2uc", "prod-req", "--s2cs", "127.0.0.1:5000,nonsense", "--insecure"], 2, "bad address 'nonsense'"),
    (["s2uc", "prod-req", "--s2cs", "[::1]:5000,::1:5001", "--insecure"], 2, "IPv6 hosts in brackets"),
])
def test_bad_lists_are_one_clear_line(cli_env, args, code, text):
    p = run(*args, env=cli_env)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert text in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_parse_instances():
    assert parse_instances("127.0.0.1:5000") == ("127.0.0.1:5000",)
    assert parse_instances("[::1]:5000") == ("[::1]:5000",)
    assert parse_instances("[::1]:5000,[2001:db8::2]:5000, gw.example.org:5000") == \
        ("[::1]:5000", "[2001:db8::2]:5000", "gw.example.org:5000")
    assert parse_instances(["a.example:1", "b.example:2", "a.example:1"]) == ("a.example:1", "b.example:2")
    for bad in ("a.example:1,,b.example:2", ",", "a.example:1,", [], ["a.example:1", ""]):
        with pytest.raises(BadInstances):
            parse_instances(bad)
    with pytest.raises(BadInstances, match="bad address 'b.example'"):
        parse_instances("a.example:1,b.example")   # an InvalidArgument found before sending anything
    with pytest.raises(BadInstances, match=r"e\.g\. 127\.0\.0\.1:5000"):
        parse_instances("127.0.0.1")
    with pytest.raises(InvalidArgument):
        parse_instances(5000)  # type: ignore[arg-type]
    with pytest.raises(BadInstances):
        AsyncClient("127.0.0.1:1,,127.0.0.1:2", insecure=True)
    with pytest.raises(BadInstances):
        Gateway(["127.0.0.1:1", " "], insecure=True)


# -- 6. a release retried after a mid-call failure ---------------------------------------
def test_release_decision():
    refused = Unreachable("a:1", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                                 "Failed to connect to remote host: Connection refused")
    reset = Unreachable("a:1", "Stream removed (recvmsg:Connection reset by peer (104))")
    store = Unreachable("a:1", "session store unavailable: cannot write sessions: connection lost")
    assert not refused.may_have_arrived and reset.may_have_arrived and store.may_have_arrived
    assert may_have_arrived("Socket closed")
    nf = grpc.StatusCode.NOT_FOUND
    assert release_is_done(nf, [reset]) and release_is_done(nf, [refused, store])
    assert not release_is_done(nf, []) and not release_is_done(nf, [refused, refused])
    assert not release_is_done(grpc.StatusCode.PERMISSION_DENIED, [reset])


async def test_release_cut_mid_call_then_not_found_is_done(servers, dead, cli_env):
    live = await servers()
    uid = new_uid()
    async with Resetter() as cut:
        async with AsyncClient([cut.target, live.target], insecure=True) as c:
            await c.release(uid)                      # NOT_FOUND on LIVE after the cut: done
            assert cut.calls == 1 and c.target == live.target
            assert "taken as released" in c.note and cut.target in c.note
            with pytest.raises(NotFound):             # LIVE first now: a plain NOT_FOUND
                await c.release(uid)
            assert c.note == ""
        async with AsyncClient([dead(), live.target], insecure=True) as c:
            with pytest.raises(NotFound):             # refused: the release never got anywhere
                await c.release(uid)
        # the same through s2uc: a note, exit 0
        p = await asyncio.to_thread(run, "s2uc", "release", uid, "--s2cs", f"{cut.target},{live.target}",
                                    "--insecure", env=cli_env)
        assert p.returncode == 0 and p.stdout.strip() == "Release completed", p.stderr
        assert "note" in p.stderr and "taken as released" in p.stderr
        p = await asyncio.to_thread(run, "s2uc", "release", uid, "--s2cs", f"{dead()},{live.target}",
                                    "--insecure", env=cli_env)
        assert p.returncode == 1 and "NOT_FOUND" in p.stderr
        assert cut.calls == 2
    # a live session released through the cut: released on LIVE, no note needed
    async with AsyncClient(live.target, insecure=True) as owner, Resetter() as cut:
        req = asyncio.create_task(owner.req(uid, "PROD", 1))
        await async_wait_until(lambda: (uid, "PROD") in live.registry.active, 10, "req")
        async with AsyncClient([cut.target, live.target], insecure=True) as c:
            await c.release(uid)
            assert c.note == "" and cut.calls == 1
        assert not live.registry.active
        with pytest.raises(ScistreamError):
            await req


# -- tokens: one login for the facility's instances ----------------------------------------
def test_token_of_a_facility_is_looked_up_by_each_instance(tmp_path, monkeypatch):
    """``resolve_token`` with several instances: the login of the whole value, else the first
    instance with a login of its own, else the default login. Logins are made with the real
    ``s2uc login`` flow and token store; only Globus Auth is canned."""
    responses = pytest.importorskip("responses")
    from click.testing import CliRunner
    from globus_sdk.testing import RegisteredResponse
    from scistream.auth import tokens
    from scistream.cli.common import resolve_token
    from scistream.cli.s2uc_auth import login

    monkeypatch.setenv("SCISTREAM_CONFIG_DIR", str(tmp_path / "cfg"))
    for var in ("SCISTREAM_TOKEN", "SCISTREAM_CLIENT_ID", "SCISTREAM_SCOPE", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tokens, "RETRIES", 0)
    native, rs = "2c8d0b4f-0000-4000-8000-6d26825f0002", "1b7c9a3e-0000-4000-8000-5c15714e0001"
    scope = f"https://auth.globus.org/scopes/{rs}/scistream"
    a, b, c = "127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002"

    def do_login(access: str, *args: str) -> None:
        with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
            RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST", json={
                "access_token": access, "scope": scope, "resource_server": rs, "expires_in": 172800,
                "token_type": "Bearer", "state": "_default", "other_tokens": [], "refresh_token": "rt"},
            ).add(requests_mock=rsps)
            result = CliRunner().invoke(login, ["--no-browser", "--client-id", native, "--scope", scope, *args],
                                        input="code-1\n")
        assert result.exit_code == 0, result.output

    assert resolve_token(None, f"{a},{b}") is None                 # no login at all
    do_login("at-b", "--s2cs", b)
    assert resolve_token(None, f"{a},{b}") == "at-b"               # the instance with a login
    assert resolve_token(None, f"{a},{c}") is None                 # neither has one, no default
    do_login("at-default")
    assert resolve_token(None, f"{a},{b}") == "at-b"               # its own login before the default
    assert resolve_token(None, f"{a},{c}") == "at-default"
    do_login("at-ab", "--s2cs", f"{a},{b}")
    assert resolve_token(None, f"{a},{b}") == "at-ab"              # the login of the whole value
    assert resolve_token("explicit", f"{a},{b}") == "explicit"
    assert resolve_token(None, b) == "at-b"                        # one address: as before
