"""The high-level client (scistream.client.connect & co.) against real in-process servers:
real data servers, real bytes through the whole chain, and the release of everything on
failure and on cancellation."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from conftest import async_wait_until, echo_roundtrip, new_uid, parse_listener, still_listening
from scistream.client import (AsyncClient, Connection, Gateway, Step, connect, release, request_cons,
                              request_prod, status)
from scistream.errors import (AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound,
                              ResourceExhausted)


def gw(srv) -> Gateway:
    return Gateway(srv.target, insecure=True)


async def _hello_when_requested(srv, uid: str, role: str, endpoints=()):
    """What an application controller does: say hello once the req is there."""
    await async_wait_until(lambda: any(u == uid for u, _ in srv.registry.active), 20, f"{role} req")
    async with AsyncClient(srv.target, insecure=True) as c:
        return await c.hello(uid, role, list(endpoints))


async def _assert_roundtrip(listeners, size=1 << 20):
    payload = os.urandom(size)
    got = await asyncio.gather(*(echo_roundtrip(*parse_listener(l), payload) for l in listeners))
    for g in got:
        assert hashlib.sha256(g).digest() == hashlib.sha256(payload).digest()


async def test_connect_streams_then_release_frees_everything(servers, echo_server):
    prod, cons = await servers(), await servers()
    uid = new_uid()
    seen = []
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    hellos = asyncio.gather(_hello_when_requested(prod, uid, "PROD", [endpoint]),
                            _hello_when_requested(cons, uid, "CONS"))
    conn = await connect(gw(prod), gw(cons), num_conn=3, uid=uid, on_progress=seen.append, hello_timeout=60)
    await hellos
    assert isinstance(conn, Connection) and conn.uid == uid
    assert conn.producer_endpoints == (endpoint,)
    assert len(conn.wan_listeners) == 3 and len(conn.consumer_listeners) == 3
    assert conn.wan_security == "tls"
    steps = [p.step for p in seen]
    assert steps[0] is Step.REQUESTED and steps[-1] is Step.CONNECTED
    assert set(steps) == {Step.REQUESTED, Step.PROD_HELLO, Step.CONS_HELLO, Step.PROD_CONNECTED, Step.CONNECTED}
    assert steps.index(Step.PROD_HELLO) < steps.index(Step.PROD_CONNECTED) < steps.index(Step.CONNECTED)
    assert all(p.uid == uid for p in seen) and [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
    # the JSON form carries no secret and is complete
    doc = json.loads(json.dumps(conn.to_dict()))
    assert doc["consumer_listeners"] == list(conn.consumer_listeners)
    assert "secret" not in json.dumps(doc) and "token" not in json.dumps(doc)
    await _assert_roundtrip(conn.consumer_listeners)
    [st] = await status(gw(prod), uid)
    assert (st.role, st.state, st.active) == ("PROD", "connected", True)
    assert st.bytes_in >= 3 << 20
    released = await release(conn)
    assert (released.prod, released.cons) == (True, True)
    assert not prod.registry.active and not cons.registry.active
    assert prod.registry.ports.used == set() and cons.registry.ports.used == set()
    assert [s.state for s in await status(gw(cons), uid)] == ["released"]
    assert not await still_listening(conn.consumer_listeners + conn.wan_listeners)
    with pytest.raises(NotFound):
        await release(uid, gw(prod), gw(cons))


async def test_no_hello_times_out_and_releases_both_sides(servers):
    prod, cons = await servers(), await servers()
    seen = []
    with pytest.raises(DeadlineExceeded, match="PROD|CONS") as info:
        await connect(gw(prod), gw(cons), num_conn=2, hello_timeout=0.5, on_progress=seen.append)
    assert "application controller" in str(info.value)
    assert [p.step for p in seen][-2:] == [Step.RELEASING, Step.RELEASED]
    await async_wait_until(lambda: not prod.registry.active and not cons.registry.active
                           and not prod.registry.ports.used and not cons.registry.ports.used, 10,
                           "both sides released, every port free")


async def test_cancelled_connect_releases_both_sides(servers, echo_server):
    """Ctrl-C in `s2uc connect` is this: the task is cancelled while waiting for hellos."""
    prod, cons = await servers(), await servers()
    uid = new_uid()
    task = asyncio.create_task(connect(gw(prod), gw(cons), num_conn=2, uid=uid, hello_timeout=60))
    # the PROD side even completes its hello; the CONS side never does
    await _hello_when_requested(prod, uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await async_wait_until(lambda: (uid, "CONS") in cons.registry.active, 10, "CONS req")
    await async_wait_until(lambda: prod.registry.active.get((uid, "PROD")) is not None
                           and prod.registry.active[(uid, "PROD")].state.value == "connected", 10, "PROD update")
    listeners = list(prod.registry.active[(uid, "PROD")].listeners)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the server frees the ports right after it ends the session (the cancelled req's cleanup)
    await async_wait_until(lambda: not prod.registry.active and not cons.registry.active
                           and not prod.registry.ports.used and not cons.registry.ports.used, 10,
                           "both sides released, every port free")
    sts = await status(gw(prod), uid)
    assert {s.state for s in sts} == {"released"}, [(s.state, s.last_error) for s in sts]
    assert not await still_listening(listeners)


async def test_refusal_on_one_side_names_it_and_frees_the_other(servers):
    prod, cons = await servers(max_conn=2), await servers()
    with pytest.raises(InvalidArgument, match=r"^PROD side \(127\.0\.0\.1:\d+\): num_conn must be 1-2"):
        await connect(gw(prod), gw(cons), num_conn=3, hello_timeout=20)
    await async_wait_until(lambda: not cons.registry.active and not cons.registry.ports.used, 10,
                           "CONS released, its ports free")


async def test_existing_session_of_the_uid_is_not_released(servers, client_for):
    """ALREADY_EXISTS: the uid is somebody's live session there; connect must not release it."""
    prod, cons = await servers(), await servers(port_range="31990-31991")
    uid = new_uid()
    cc = client_for(cons)
    held = asyncio.create_task(cc.req(uid, "CONS", 1))
    await async_wait_until(lambda: (uid, "CONS") in cons.registry.active, 10, "first CONS req")
    with pytest.raises(AlreadyExists, match="CONS side"):
        await connect(gw(prod), gw(cons), uid=uid, hello_timeout=20)
    assert (uid, "CONS") in cons.registry.active, "the existing session was released"
    await async_wait_until(lambda: not prod.registry.active, 10, "PROD released")
    await cc.release(uid)
    with pytest.raises(Exception):
        await held


async def test_ports_exhausted_is_resource_exhausted(servers):
    prod, cons = await servers(port_range="31994-31995"), await servers()
    with pytest.raises(ResourceExhausted, match="PROD side"):
        await connect(gw(prod), gw(cons), num_conn=3, hello_timeout=20)
    await async_wait_until(lambda: not cons.registry.active, 10, "CONS released")


async def test_bad_arguments_are_refused_before_any_call(servers):
    prod = await servers()
    for kw in ({"num_conn": 0}, {"rate": -1}, {"lease": -5}, {"uid": "not-a-uuid"}):
        with pytest.raises(InvalidArgument):
            await connect(gw(prod), gw(prod), **kw)
    assert not prod.registry.active and not prod.registry.ended
    with pytest.raises(InvalidArgument, match="port must be"):
        Gateway("127.0.0.1:99999")


async def test_halves_separately(servers, echo_server):
    """request_prod then request_cons: what prod-req / cons-req do, as library calls."""
    prod, cons = await servers(), await servers()
    uid = new_uid()
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    hello = asyncio.create_task(_hello_when_requested(prod, uid, "PROD", [endpoint]))
    p = await request_prod(gw(prod), num_conn=2, uid=uid, hello_timeout=60)
    await hello
    assert "wan_secret" not in repr(p) and len(p.wan_secret) == 32
    hello = asyncio.create_task(_hello_when_requested(cons, uid, "CONS"))
    c = await request_cons(gw(cons), uid, p.wan_listeners, p.wan_secret)
    await hello
    assert c.targets == p.wan_listeners and c.wan_security == "tls"
    await _assert_roundtrip(c.consumer_listeners, 256 << 10)
    assert (await release(uid, gw(prod), None)).prod is True
    assert (await release(uid, None, gw(cons))).cons is True


async def test_wrong_secret_on_cons_side_fails_and_frees(servers, echo_server):
    prod, cons = await servers(), await servers()
    uid = new_uid()
    hello = asyncio.create_task(_hello_when_requested(prod, uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"]))
    p = await request_prod(gw(prod), uid=uid)
    await hello
    hello = asyncio.create_task(_hello_when_requested(cons, uid, "CONS"))
    c = await request_cons(gw(cons), uid, p.wan_listeners, os.urandom(32))
    await hello
    # the CONS data server starts, but its TLS handshake with PROD fails: no byte gets through
    host, port = parse_listener(c.consumer_listeners[0])
    r, w = await asyncio.open_connection(host, port)
    w.write(b"x" * 1000)
    await w.drain()
    try:
        assert await asyncio.wait_for(r.read(), 20) == b""
    except ConnectionResetError:
        pass
    w.close()
    await release(uid, gw(prod), gw(cons))
