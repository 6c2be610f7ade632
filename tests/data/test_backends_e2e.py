"""HAProxy, nginx and stunnel backends behind real (in-process) control servers: the whole
PROTOCOL.md exchange, bytes verified both ways, release frees everything; legacy clients
without a WAN secret; a restarted control server re-adopts the running proxies."""
from __future__ import annotations

import asyncio
import os

import pytest

from conftest import async_wait_until, connect_session, new_uid, parse_listener, still_listening
from scistream.data.supervise import pid_alive
from scistream.errors import FailedPrecondition
from test_backends_support import EXTERNAL, App, roundtrip, sha


async def check_bytes(listeners, size: int = 2 << 20) -> None:
    payloads = [os.urandom(size) for _ in listeners]
    got = await asyncio.gather(*(roundtrip(parse_listener(l)[1], p) for l, p in zip(listeners, payloads)))
    for sent, back in zip(payloads, got):
        assert sha(back) == sha(sent)


def server_pids(srv) -> list[int]:
    return [pid for s in srv.registry.active.values() if s.server for pid in s.server.pids]


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_full_session_through_control_servers(kind, servers, client_for):
    async with App() as app:
        prod_srv = await servers(server_type=kind)
        cons_srv = await servers(server_type=kind)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 3)
        assert cons.wan_security == "tls"
        await check_bytes(cons.listeners)
        await check_bytes(cons.listeners[:1] * 3, 1 << 20)  # several connections on one listener
        assert app.accepted == 6
        pids = server_pids(prod_srv) + server_pids(cons_srv)
        assert pids
        for srv in (prod_srv, cons_srv):
            (session,) = srv.registry.active.values()
            assert type(session.server).kind == kind and session.server.child.running
        await pc.release(uid)
        await cc.release(uid)
        assert prod_srv.registry.ports.used == set() and cons_srv.registry.ports.used == set()
        await async_wait_until(lambda: not any(pid_alive(p) for p in pids), what="proxies gone")
        assert not await still_listening(list(prod.listeners) + list(cons.listeners))


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy", "Nginx")])
async def test_original_client_without_secret_gets_plaintext(kind, servers, client_for):
    """HAProxy and nginx were plaintext in the original: a client that sends no WAN secret
    still gets a working session (plain WAN leg)."""
    async with App() as app:
        prod_srv, cons_srv = await servers(server_type=kind), await servers(server_type=kind)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 2, legacy=True)
        assert cons.wan_security == "plain"
        await check_bytes(cons.listeners)
        await pc.release(uid)
        await cc.release(uid)


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Stunnel"])
async def test_stunnel_legacy_client_needs_operator_consent(kind, servers, client_for):
    async with App() as app:
        strict = await servers(server_type=kind)
        c = client_for(strict)
        uid = new_uid()
        req = asyncio.create_task(c.req(uid, "PROD", 1))
        await c.hello(uid, "PROD", [app.endpoint])
        prod = await req
        with pytest.raises(FailedPrecondition, match="allow-legacy-plaintext"):
            await c.update(uid, "PROD", prod.prod_listeners, b"")
        prod_srv = await servers(server_type=kind, allow_legacy_plaintext=True)
        cons_srv = await servers(server_type=kind, allow_legacy_plaintext=True)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid2, prod, cons = await connect_session(pc, cc, app.endpoint, 2, legacy=True)
        assert cons.wan_security == "plain"  # the original's uid-derived PSK: not confidential
        await check_bytes(cons.listeners)
        await pc.release(uid2)
        await cc.release(uid2)


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_restarted_control_server_readopts_the_proxies(kind, servers, client_for):
    async with App() as app:
        prod_srv, cons_srv = await servers(server_type=kind), await servers(server_type=kind)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 2)
        await check_bytes(cons.listeners)
        pids = server_pids(prod_srv)
        await prod_srv.stop(release=False)
        assert all(pid_alive(p) for p in pids)
        await check_bytes(cons.listeners)  # the data path does not need the control server
        again = await servers(server_type=kind, state_dir=prod_srv.state_dir,
                              port_range=prod_srv.config.port_range)
        session = again.registry.active[(uid, "PROD")]
        assert session.state.value == "connected"
        assert set(session.server.pids) == set(pids)
        await check_bytes(cons.listeners)
        await client_for(again).release(uid)
        await cc.release(uid)
        await async_wait_until(lambda: not any(pid_alive(p) for p in pids), what="proxies gone")
        assert not await still_listening(list(prod.listeners) + list(cons.listeners))
        assert again.registry.ports.used == set()
