"""Our clients against a server of the original tooling (scistream-proto 1.2.1).

The original is not installable, so ``original_server.OriginalStandIn`` stands in for it:
it keeps the original's rules as docs/protocol.md states them (a hello before its req is
registered fails UNKNOWN "entry not found", an update without targets fails UNKNOWN, no
wan_secret in its answers, update answered before the proxies listen) in front of real
control and data servers of ours, so bytes really flow. Our CLIs run as separate
processes: prod-req and cons-req with appctrl, inbound-request / outbound-request,
release, connect; the bytes are checked end to end."""
from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import os
import re

import pytest

from conftest import BIN, async_wait_until, echo_roundtrip, new_uid, parse_listener, still_listening
from original_server import OriginalStandIn
from scistream.client import AsyncClient, Gateway, release, request_cons, request_prod
from scistream.client.order import ORIGINAL_SERVER, hello_after_req
from scistream.errors import ScistreamError

ORIGINAL_NOTE = "server of the original SciStream tooling"


class Cli:
    """One of our CLIs as its own process; stdout and stderr collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [asyncio.create_task(self._read(proc.stdout, self.out)),
                         asyncio.create_task(self._read(proc.stderr, self.err))]

    @staticmethod
    async def _read(stream, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))

    async def wait(self, timeout: float = 60) -> int:
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return rc

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def text(self) -> str:
        return f"rc={self.proc.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@pytest.fixture
async def cli(tmp_path):
    """``p = await cli("s2uc", "prod-req", ...)``: started now; stopped at the end if still running."""
    env = dict(os.environ, SCISTREAM_CONFIG_DIR=str(tmp_path / "client-config"))
    env.pop("SCISTREAM_TOKEN", None)
    started: list[Cli] = []

    async def start(*args: str) -> Cli:
        proc = await asyncio.create_subprocess_exec(str(BIN / args[0]), *args[1:], env=env,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        c = Cli(proc)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.returncode is None:
            c.proc.kill()
        with contextlib.suppress(Exception):
            await c.wait(10)


@pytest.fixture
async def originals(servers):
    """Two stand-ins for original servers (PROD, CONS), each in front of a server of ours."""
    fronts: list[OriginalStandIn] = []

    async def make() -> tuple[OriginalStandIn, OriginalStandIn]:
        for _ in range(2):
            backend = await servers(allow_legacy_plaintext=True)
            front = await OriginalStandIn.start(backend)
            front.backend_server = backend
            fronts.append(front)
        return fronts[-2], fronts[-1]

    yield make
    for f in fronts:
        await f.stop()


async def run(cli, *args: str, timeout: float = 60) -> Cli:
    c = await cli(*args)
    await c.wait(timeout)
    return c


async def _accepting(listeners) -> bool:
    return not set(listeners) - set(await still_listening(listeners))


async def assert_bytes_flow(cons_listeners, prod_listeners, size: int = 4 << 20) -> None:
    """The original's proxies listen some time after its update was answered: wait (with a
    deadline) until both sides accept, then send through every consumer listener and check
    what the producer's echo sent back."""
    await async_wait_until(lambda: _accepting([*prod_listeners, *cons_listeners]), 20,
                           "the data servers behind the original's update to listen")
    payload = os.urandom(size)
    got = await asyncio.gather(*(echo_roundtrip(*parse_listener(l), payload) for l in cons_listeners))
    for g in got:
        assert hashlib.sha256(g).digest() == hashlib.sha256(payload).digest(), f"{len(g)} of {size} bytes"


def assert_all_freed(*fronts: OriginalStandIn) -> None:
    for f in fronts:
        reg = f.backend_server.registry
        assert reg.active == {} and reg.ports.used == set(), "the original's session was not released"
        assert f.errors == [], f.errors
        assert f.secrets_seen == 0  # it gave none, so our client sends none


# -- the stand-in keeps the original's rules --------------------------------------------
async def test_standin_keeps_the_originals_rules(originals, echo_server):
    """What docs/protocol.md says of the original, checked on the stand-in with the
    low-level client: the order our old clients used (hello with the req) fails there."""
    prod, _ = await originals()
    ep = f"{echo_server[0]}:{echo_server[1]}"
    async with AsyncClient(prod.target, insecure=True) as c:
        with pytest.raises(ScistreamError) as info:
            await c.hello(new_uid(), "PROD", [ep])
        assert info.value.status.name == "UNKNOWN" and "entry not found" in str(info.value)
        uid = new_uid()
        req = asyncio.create_task(c.req(uid, "PROD", 1))
        with pytest.raises(ScistreamError) as info:  # hello sent at the same moment as the req
            await c.hello(uid, "PROD", [ep])
        assert "entry not found" in str(info.value)
        await async_wait_until(lambda: uid in prod.entries, 10, "the req to be registered")
        await c.hello(uid, "PROD", [ep])
        resp = await req
        assert resp.wan_secret == b"" and len(resp.listeners) == 1
        with pytest.raises(ScistreamError) as info:
            await c.update(uid, "PROD", [])
        assert info.value.status.name == "UNKNOWN"
        upd = await c.update(uid, "PROD", [ep])
        assert upd.wan_security == "" and upd.wan_secret == b""
        with pytest.raises(ScistreamError) as info:
            await c.status(uid)
        assert info.value.status.name == "UNIMPLEMENTED" and "original" in str(info.value)
        await c.release(uid)
    assert_all_freed(prod)


# -- every command ------------------------------------------------------------------------
async def test_prod_req_cons_req_appctrl_release(originals, echo_server, cli):
    """The tutorial's five commands, each its own process, against two original servers."""
    prod, cons = await originals()
    ep = f"{echo_server[0]}:{echo_server[1]}"
    preq = await cli("s2uc", "prod-req", "--s2cs", prod.target, "--insecure", "--num-conn", "2")
    await async_wait_until(lambda: len(preq.out) >= 2, 30, "prod-req to print the uid")
    uid = preq.out[1].split()[0]
    papp = await run(cli, "appctrl", "create-appctrl", uid, prod.target, "-", "PROD", "--app", "none",
                     "--endpoint", ep, "--insecure")
    assert papp.proc.returncode == 0, papp.text()
    assert await preq.wait() == 0, preq.text()
    wan = re.findall(r'^listeners: "(.+)"$', preq.stdout, re.M)
    assert len(wan) == 2 and preq.out[-1] == uid
    assert ORIGINAL_NOTE in preq.stderr and "PLAINTEXT" in preq.stderr

    creq = await cli("s2uc", "cons-req", "--s2cs", cons.target, "--insecure", uid, ",".join(wan))
    capp = await run(cli, "appctrl", "create-appctrl", uid, cons.target, "-", "CONS", "--app", "none",
                     "--insecure")
    assert capp.proc.returncode == 0, capp.text()
    assert await creq.wait() == 0, creq.text()
    listeners = ast.literal_eval(creq.out[-1].removeprefix("Listeners: "))
    assert len(listeners) == 2
    assert ORIGINAL_NOTE in creq.stderr and "PLAINTEXT" in creq.stderr
    await assert_bytes_flow(listeners, wan)

    for front in (prod, cons):
        rel = await run(cli, "s2uc", "release", uid, "--s2cs", front.target, "--insecure")
        assert rel.proc.returncode == 0 and rel.out == ["Release completed"], rel.text()
    assert_all_freed(prod, cons)
    assert not await still_listening([*wan, *listeners])


async def test_inbound_outbound_request_release(originals, echo_server, cli):
    """inbound-request / outbound-request send the hello themselves: it goes out at once, is
    refused while the original has not registered the req, and is sent again until it is."""
    prod, cons = await originals()
    inb = await run(cli, "s2uc", "inbound-request", "--s2cs", prod.target, "--insecure", "--num_conn", "2",
                    "--remote_ip", echo_server[0], "--receiver_ports", str(echo_server[1]))
    assert inb.proc.returncode == 0, inb.text()
    uid = inb.out[-1]
    wan = re.findall(r'^listeners: "(.+)"$', inb.stdout, re.M)
    assert len(wan) == 2
    outb = await run(cli, "s2uc", "outbound-request", "--s2cs", cons.target, "--insecure", "--num_conn", "2",
                     "--remote_ip", echo_server[0], "--receiver_ports", str(echo_server[1]), uid, *wan)
    assert outb.proc.returncode == 0, outb.text()
    listeners = ast.literal_eval(outb.out[-1].removeprefix("Listeners: "))
    for p in (inb, outb):
        assert ORIGINAL_NOTE in p.stderr and "PLAINTEXT" in p.stderr, p.text()
    # each side refused at least one early hello, and the client's retry got through
    for front in (prod, cons):
        assert front.refused["hello"] >= 1, front.calls
        hellos = [m for m, u in front.calls if m == "hello" and u == uid]
        assert len(hellos) == front.refused["hello"] + 1
    await assert_bytes_flow(listeners, wan)
    for front in (prod, cons):
        rel = await run(cli, "s2uc", "release", uid, "--s2cs", front.target, "--insecure")
        assert rel.proc.returncode == 0, rel.text()
    assert_all_freed(prod, cons)


@pytest.mark.parametrize("command,args", [
    ("outbound-request", ["{uid}", ""]),
    ("outbound-request", ["{uid}", ",, ,"]),
    ("outbound-request", ["{uid}", "127.0.0.1:5100,nonsense"]),
    ("cons-req", ["{uid}", ""]),
    ("cons-req", ["{uid}", "127.0.0.1:99999"]),
    ("inbound-request", ["--remote-ip", "127.0.0.1", "--receiver-ports", ""]),
    ("inbound-request", ["--remote-ip", "127.0.0.1", "--receiver-ports", "5074,x"]),
])
async def test_empty_or_malformed_listeners_refused_before_sending(originals, cli, command, args):
    """A script passing an empty PROD listener list (its previous step failed) would crash
    the original's update: our client refuses it itself, exit code 2, one line, and sends
    nothing at all."""
    prod, cons = await originals()
    front = prod if command == "inbound-request" else cons
    p = await run(cli, "s2uc", command, "--s2cs", front.target, "--insecure",
                  *[a.replace("{uid}", new_uid()) for a in args])
    assert p.proc.returncode == 2, p.text()
    assert len(p.err) == 1 and "nothing was sent" in p.stderr and "Traceback" not in p.stderr, p.text()
    assert front.calls == []


async def test_connect_and_appctrl_demo_against_original_servers(originals, cli):
    """s2uc connect --start-apps: both reqs at once, the demo apps' controllers say hello
    (retried until the original knows the req), both updates; the demo consumer verifies
    every byte; then both sides are released."""
    prod, cons = await originals()
    p = await run(cli, "s2uc", "connect", "--prod-s2cs", prod.target, "--cons-s2cs", cons.target,
                  "--insecure", "--num-conn", "2", "--start-apps", "--size", "4M", "--json", timeout=120)
    assert p.proc.returncode == 0, p.text()
    doc = json.loads(p.stdout)
    assert doc["wan_security"] == "plain (original server)"
    assert doc["transfer"]["bytes"] == 4 << 20 and doc["transfer"]["streams"] == 2
    assert doc["transfer"]["released"] == {"uid": doc["uid"], "prod": True, "cons": True}
    assert_all_freed(prod, cons)


async def test_python_api_against_original_servers(originals, echo_server):
    """scistream.client.request_prod / request_cons: the same order rules as the CLIs."""
    prod, cons = await originals()
    pg, cg = Gateway(prod.target, insecure=True), Gateway(cons.target, insecure=True)
    uid = new_uid()
    ep = f"{echo_server[0]}:{echo_server[1]}"
    async with pg.client() as pc, cg.client() as cc:
        ptask = asyncio.create_task(request_prod(pg, uid=uid, num_conn=2))
        await hello_after_req(pc, uid, "PROD", [ep])   # an application controller
        p = await ptask
        assert p.wan_security == ORIGINAL_SERVER and p.wan_secret == b""
        ctask = asyncio.create_task(request_cons(cg, uid, p.wan_listeners))
        await hello_after_req(cc, uid, "CONS")
        c = await ctask
        assert c.wan_security == ORIGINAL_SERVER
    await assert_bytes_flow(c.consumer_listeners, p.wan_listeners)
    done = await release(uid, pg, cg)
    assert done.prod and done.cons
    assert_all_freed(prod, cons)
