"""The status RPC and ``s2uc status`` / ``s2uc list`` over real servers: complete and true,
for live sessions, ended ones and sessions re-adopted after a restart."""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from conftest import BIN, connect_session, echo_roundtrip, free_port, new_uid, parse_listener
from scistream import errors
from scistream.client import AsyncClient


async def s2uc(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "s2uc"), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "250"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_status_is_complete_and_true(servers, client_for, echo_server):
    prod, cons = await servers(), await servers(max_lease=3600)
    pc, cc = client_for(prod), client_for(cons)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    before = time.time()
    uid, p, c = await connect_session(pc, cc, ep, num_conn=2, rate=500_000, lease=600)
    payload = os.urandom(3 << 20)
    r, w = await asyncio.open_connection(*parse_listener(c.listeners[0]))  # held open
    w.write(b"x" * 1000)
    await w.drain()
    assert await r.readexactly(1000) == b"x" * 1000
    got = await echo_roundtrip(*parse_listener(c.listeners[1]), payload)
    assert got == payload

    resp = await pc.status(uid)
    assert abs(resp.server_time - time.time()) < 5 and resp.omitted == 0
    (ps,) = resp.sessions
    assert (ps.uid, ps.role, ps.state, ps.owner) == (uid, "PROD", "connected", "anonymous")
    assert list(ps.listeners) == list(p.listeners)
    assert list(ps.targets) == [ep, ep]
    assert ps.bytes_in == ps.bytes_out == len(payload) + 1000
    assert ps.connections == 1 and ps.total_connections == 2
    assert (ps.num_conn, ps.rate, ps.wan_security, ps.server_type) == (2, 500_000, "tls", "Builtin")
    assert before <= ps.created <= ps.connected <= resp.server_time
    assert ps.lease_expires == pytest.approx(ps.created + 600, abs=0.01)
    assert ps.ended == 0 and ps.last_error == ""
    (cs,) = (await cc.status(uid)).sessions
    assert cs.state == "connected" and list(cs.targets) == list(p.listeners)
    assert list(cs.listeners) == list(c.listeners)
    assert cs.bytes_in == cs.bytes_out == len(payload) + 1000

    w.close()
    await pc.release(uid)
    await cc.release(uid)
    (ps,) = (await pc.status(uid)).sessions
    assert ps.state == "released" and ps.ended >= ps.connected
    assert ps.bytes_in == len(payload) + 1000 and ps.connections == 0  # kept in history


async def test_status_only_shows_your_sessions(servers, tmp_path, echo_server):
    from scistream.auth.static import add_token
    tokens = tmp_path / "tokens"
    alice, bob, admin = (add_token(tokens, who) for who in ("alice", "bob", "root@site"))
    srv = await servers(auth="static", auth_options={"token_file": tokens}, admins=("root@site",))
    ep = f"{echo_server[0]}:{echo_server[1]}"
    clients = {n: AsyncClient(srv.target, insecure=True, token=t)
               for n, t in (("alice", alice), ("bob", bob), ("admin", admin))}
    try:
        uids = {}
        for name in ("alice", "bob"):
            uid = new_uid()
            req = asyncio.create_task(clients[name].req(uid, "PROD", 1))
            await clients[name].hello(uid, "PROD", [ep])
            await req
            uids[name] = uid
        mine = (await clients["alice"].status()).sessions
        assert [s.uid for s in mine] == [uids["alice"]] and mine[0].owner == "alice"
        with pytest.raises(errors.NotFound):
            await clients["bob"].status(uids["alice"])
        assert {s.uid for s in (await clients["admin"].status()).sessions} == set(uids.values())
        with pytest.raises(errors.Unauthenticated):
            await AsyncClient(srv.target, insecure=True, token="wrong").status()
        for name, uid in uids.items():
            await clients[name].release(uid)
    finally:
        for c in clients.values():
            await c.close()


async def test_history_survives_a_restart(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [ep])
    await req
    await c.release(uid)
    await srv.stop()
    srv2 = await servers(state_dir=srv.state_dir, port_range=srv.config.port_range)
    (st,) = (await client_for(srv2).status(uid)).sessions
    assert st.state == "released" and st.ended > st.created


async def test_s2uc_status_and_list(servers, client_for, echo_server):
    prod, cons = await servers(), await servers()
    pc, cc = client_for(prod), client_for(cons)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid, p, c = await connect_session(pc, cc, ep, num_conn=1)
    payload = os.urandom(1 << 20)
    assert await echo_roundtrip(*parse_listener(c.listeners[0]), payload) == payload
    both = ["--s2cs", prod.target, "--s2cs", cons.target, "--insecure"]

    rc, out, err = await s2uc("status", uid, *both, "--json")
    assert rc == 0, err
    rows = {d["role"]: d for d in json.loads(out)}
    assert set(rows) == {"PROD", "CONS"}
    assert rows["PROD"]["server"] == prod.target and rows["CONS"]["server"] == cons.target
    assert rows["CONS"]["state"] == "connected"
    assert rows["CONS"]["bytes_to_producer"] == rows["CONS"]["bytes_to_consumer"] == len(payload)
    assert rows["PROD"]["targets"] == [ep] and rows["PROD"]["lease_left_s"] is None
    assert 0 <= rows["PROD"]["setup_s"] < 60 and rows["PROD"]["age_s"] >= rows["PROD"]["setup_s"]

    rc, out, err = await s2uc("status", uid, *both)
    assert rc == 0, err
    assert uid in out and "connected" in out and "1.0 MiB" in out and p.listeners[0] in out

    other, _, _ = await connect_session(pc, cc, ep, num_conn=1)
    await pc.release(other)
    await cc.release(other)
    rc, out, err = await s2uc("list", *both, "--json")
    assert rc == 0, err
    states = {(d["uid"], d["role"]): d["state"] for d in json.loads(out)}
    assert states == {(uid, "PROD"): "connected", (uid, "CONS"): "connected",
                      (other, "PROD"): "released", (other, "CONS"): "released"}
    rc, out, err = await s2uc("list", *both, "--active", "--json")
    assert {d["uid"] for d in json.loads(out)} == {uid}
    rc, out, err = await s2uc("list", *both)
    assert rc == 0 and out.count(uid) == 2 and out.count(other) == 2

    rc, out, err = await s2uc("status", new_uid(), "--s2cs", prod.target, "--insecure")
    assert rc == 1 and "NOT_FOUND" in err
    rc, out, err = await s2uc("status", "not-a-uid", "--s2cs", prod.target, "--insecure")
    assert rc == 2 and "(local mistake)" in err and "not a UUID" in err   # found here, nothing sent
    await pc.release(uid)
    await cc.release(uid)
    nobody = f"127.0.0.1:{free_port()}"
    rc, out, err = await s2uc("list", "--s2cs", prod.target, "--s2cs", nobody, "--insecure", "--json")
    assert rc == 4 and nobody in err  # one server unreachable: say so, show the rest
    assert {d["state"] for d in json.loads(out)} == {"released"}
