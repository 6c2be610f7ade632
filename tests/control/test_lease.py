"""Leases: every session has one (unlimited, or the operator's --max-lease; a req may ask for
less); when it ends the session is released, its state says expired, with the time."""
from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from conftest import async_wait_until, echo_roundtrip, new_uid, parse_listener, prod_session
from scistream import errors


async def test_connected_session_expires_at_its_lease(servers, client_for, echo_server):
    srv = await servers(wan_plaintext=True)  # the PROD listener is then plain TCP to the echo app
    c = client_for(srv)
    uid, resp = await prod_session(c, c, f"{echo_server[0]}:{echo_server[1]}", lease=2)
    payload = os.urandom(1 << 20)
    got = await echo_roundtrip(*parse_listener(resp.listeners[0]), payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    (st,) = (await c.status(uid)).sessions
    assert st.state == "connected" and st.lease_expires == pytest.approx(st.created + 2, abs=0.01)
    pids = srv.registry.active[(uid, "PROD")].server.pids

    await async_wait_until(lambda: not srv.registry.active and not srv.registry.ports.used,
                           timeout=10, what="lease end")
    (st,) = (await c.status(uid)).sessions
    assert st.state == "expired"
    assert st.ended >= st.lease_expires and st.ended - st.lease_expires < 2.0
    assert "lease of 2 s ended at" in st.last_error
    assert st.bytes_in == len(payload) and st.bytes_out == len(payload)  # kept after the end
    assert srv.registry.ports.used == set()
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection(*parse_listener(resp.listeners[0]))
        w.close()
    from scistream.data.supervise import pid_alive
    assert not any(pid_alive(p) for p in pids)
    with pytest.raises(errors.NotFound):
        await c.release(uid)


async def test_max_lease_is_the_default_and_the_ceiling(servers, client_for, echo_server):
    srv = await servers(max_lease=600)
    c = client_for(srv)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    with pytest.raises(errors.InvalidArgument, match="--max-lease 600"):
        await c.req(new_uid(), "PROD", 1, lease=601)
    with pytest.raises(errors.InvalidArgument, match="lease must be >= 0"):
        await c.req(new_uid(), "PROD", 1, lease=-5)
    assert srv.registry.ports.used == set() and srv.registry.active == {}
    uid, _ = await prod_session(c, c, ep)  # lease 0: the server's maximum
    shorter, _ = await prod_session(c, c, ep, lease=30)
    st = {s.uid: s for s in (await c.status()).sessions}
    assert st[uid].lease_expires == pytest.approx(st[uid].created + 600, abs=0.01)
    assert st[shorter].lease_expires == pytest.approx(st[shorter].created + 30, abs=0.01)
    await c.release(uid)
    await c.release(shorter)


async def test_unlimited_by_default(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid, _ = await prod_session(c, c, f"{echo_server[0]}:{echo_server[1]}")
    (st,) = (await c.status(uid)).sessions
    assert st.lease_expires == 0
    await c.release(uid)


async def test_lease_survives_a_restart_and_ends_on_time(servers, client_for, echo_server):
    srv = await servers(wan_plaintext=True)
    c = client_for(srv)
    uid, resp = await prod_session(c, c, f"{echo_server[0]}:{echo_server[1]}", lease=3)
    expires = srv.registry.active[(uid, "PROD")].lease_expires
    await srv.stop(release=False)
    srv2 = await servers(wan_plaintext=True, state_dir=srv.state_dir, port_range=srv.config.port_range)
    c2 = client_for(srv2)
    (st,) = (await c2.status(uid)).sessions
    assert st.state == "connected" and st.lease_expires == expires
    await async_wait_until(lambda: not srv2.registry.active and not srv2.registry.ports.used,
                           timeout=10, what="lease end after restart")
    assert time.time() >= expires
    (st,) = (await c2.status(uid)).sessions
    assert st.state == "expired" and "lease of 3 s" in st.last_error
    assert srv2.registry.ports.used == set()


async def test_lease_ends_a_session_still_waiting_for_its_hello(servers, client_for):
    srv = await servers(hello_timeout=60)
    c = client_for(srv)
    uid = new_uid()
    with pytest.raises(errors.ScistreamError) as info:
        await c.req(uid, "PROD", 2, lease=1)
    assert info.value.status.name == "FAILED_PRECONDITION"
    assert "expired" in str(info.value) and "lease of 1 s" in str(info.value)
    assert srv.registry.ports.used == set()


async def test_session_without_update_expires_after_update_timeout(servers, client_for, echo_server):
    srv = await servers(update_timeout=1.0, max_rate=1_000_000)
    c = client_for(srv)
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    # one session gets its update in time, the other never does
    late, kept = new_uid(), new_uid()
    for uid in (late, kept):
        req = asyncio.create_task(c.req(uid, "PROD", 2, rate=100_000))
        await c.hello(uid, "PROD", [endpoint])
        resp = await req
    await c.update(kept, "PROD", resp.prod_listeners, resp.wan_secret)
    hello_at = time.time()
    assert srv.registry.bandwidth.used == 200_000 and len(srv.registry.ports.used) == 4

    await async_wait_until(lambda: (late, "PROD") not in srv.registry.active, timeout=10,
                           what="the session without an update to expire")
    (st,) = (await c.status(late)).sessions
    assert st.state == "expired"
    assert "no update within 1 s of the hello" in st.last_error
    assert st.ended - hello_at < 3.0
    # everything it held is free; the connected one is untouched
    assert srv.registry.bandwidth.used == 100_000 and len(srv.registry.ports.used) == 2
    code_err = None
    try:
        await c.update(late, "PROD", [endpoint], b"")
    except errors.ScistreamError as exc:
        code_err = exc
    assert code_err is not None and code_err.status.name == "NOT_FOUND"
    (st,) = (await c.status(kept)).sessions
    assert st.state == "connected"
    await c.release(kept)
    assert srv.registry.ports.used == set() and srv.registry.bandwidth.used == 0


async def test_update_timeout_zero_means_no_limit(servers, client_for, echo_server):
    srv = await servers(update_timeout=0)
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await req
    assert await srv.registry.expire_leases() == float("inf")   # nothing is ever due
    assert srv.registry.active[(uid, "PROD")].state.value == "ready"
    await c.release(uid)
