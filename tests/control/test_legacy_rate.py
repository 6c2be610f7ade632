"""The rate of a client of the original tooling. Its clients send rate=10000 (kbit/s) by
default, a value that tooling never enforced: our server does not enforce the rate of a
session whose update carries no WAN secret, unless the operator asks for it
(--enforce-legacy-rate), and says so in its log and in status. Clients of ours (with the
session's secret) get the rate they ask for."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys

import pytest

from conftest import BIN, async_wait_until, echo_roundtrip, new_uid, parse_listener
from scistream.client import AsyncClient
from scistream.data.supervise import pid_alive

LEGACY_RATE = 10000


@pytest.mark.parametrize("enforce", [False, True], ids=["default", "enforce-legacy-rate"])
async def test_original_clients_rate(servers, echo_server, original_stubs, caplog, enforce):
    gen_dir, fixtures = original_stubs
    srv = await servers(allow_legacy_plaintext=True, enforce_legacy_rate=enforce, max_rate=1_000_000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(fixtures / "original_session.py"), str(gen_dir), srv.target,
        f"{echo_server[0]}:{echo_server[1]}", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("connected "), line + (await proc.stdout.read()).decode()
        _, uid, *listeners = line.split()
        session = srv.registry.active[(uid, "PROD")]
        # what the data server was told to enforce
        assert session.server.spec.rate_kbps == (LEGACY_RATE if enforce else 0)
        assert session.wan_security == "plain"
        # the status RPC: the rate asked, and whether it is enforced
        async with AsyncClient(srv.target, insecure=True) as c:
            info = (await c.status(uid)).sessions[0]
        assert info.rate == LEGACY_RATE and info.rate_not_enforced is (not enforce)
        # s2uc status, as its own process
        st = await asyncio.create_subprocess_exec(
            str(BIN / "s2uc"), "status", uid, "--s2cs", srv.target, "--insecure",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=dict(os.environ, COLUMNS="200"))
        out = (await asyncio.wait_for(st.communicate(), 60))[0].decode()
        assert st.returncode == 0, out
        assert f"{LEGACY_RATE} kbit/s" in out
        assert ("NOT ENFORCED" in out) is (not enforce), out
        # the server's log says it
        said = [r.getMessage() for r in caplog.records if "NOT enforced" in r.getMessage()]
        assert bool(said) is (not enforce) and all(uid in m and "--enforce-legacy-rate" in m for m in said)
        # the session carries bytes either way
        payload = os.urandom(1 << 20)
        got = await echo_roundtrip(*parse_listener(listeners[0]), payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        proc.stdin.write(b"release\n")
        await proc.stdin.drain()
        rest = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
        assert proc.returncode == 0 and f"released {uid}" in rest, rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert srv.registry.ports.used == set() and srv.registry.bandwidth.used == 0


async def test_our_clients_rate_is_enforced(servers, client_for, echo_server):
    """A client of ours sends the session's WAN secret: its rate is enforced as asked."""
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1, 5000))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await c.update(uid, "PROD", list(resp.prod_listeners), resp.wan_secret)
    assert srv.registry.active[(uid, "PROD")].server.spec.rate_kbps == 5000
    info = (await c.status(uid)).sessions[0]
    assert info.rate == 5000 and info.rate_not_enforced is False
    await c.release(uid)


async def test_decision_survives_a_restart(servers, client_for, echo_server):
    """The decision is part of the session's record: a restarted control server whose data
    server died meanwhile starts the new one without the cap, and status still says so."""
    srv = await servers(allow_legacy_plaintext=True)
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1, LEGACY_RATE))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await c.update(uid, "PROD", list(resp.prod_listeners))  # no wan_secret: as the original's clients
    old_pid = srv.registry.active[(uid, "PROD")].server.handle()["service_pid"]   # the node service
    sd, rng = srv.state_dir, srv.config.port_range
    await srv.stop(release=False)
    os.killpg(old_pid, signal.SIGKILL)
    await async_wait_until(lambda: not pid_alive(old_pid), what="the node service to be gone")
    srv2 = await servers(state_dir=sd, port_range=rng, allow_legacy_plaintext=True)
    session = srv2.registry.active[(uid, "PROD")]
    assert session.server.handle()["service_pid"] != old_pid and session.server.spec.rate_kbps == 0
    c2 = client_for(srv2)
    assert (await c2.status(uid)).sessions[0].rate_not_enforced is True
    payload = os.urandom(1 << 20)
    got = await echo_roundtrip(*parse_listener(resp.listeners[0]), payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    await c2.release(uid)
    assert srv2.registry.ports.used == set()
