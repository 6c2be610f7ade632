"""The whole PROTOCOL.md exchange against in-process servers, bytes verified both ways."""
from __future__ import annotations

import asyncio
import hashlib
import os

from conftest import connect_session, echo_roundtrip, new_uid, parse_listener, still_listening


async def test_two_servers_chain_bytes_both_ways(servers, client_for, echo_server):
    prod_srv, cons_srv = await servers(), await servers()
    pc, cc = client_for(prod_srv), client_for(cons_srv)
    uid, prod, cons = await connect_session(pc, cc, f"{echo_server[0]}:{echo_server[1]}", 3)
    assert cons.wan_security == "tls"
    payload = os.urandom(4 << 20)
    results = await asyncio.gather(*(echo_roundtrip(*parse_listener(l), payload) for l in cons.listeners))
    for got in results:
        assert len(got) == len(payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    await pc.release(uid)
    await cc.release(uid)
    assert prod_srv.registry.ports.used == set()
    assert cons_srv.registry.ports.used == set()
    # nothing listens any more
    left = await still_listening(list(cons.listeners) + list(prod.listeners))
    assert not left, f"{left} still listening after release"


async def test_hello_before_req_is_matched(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    hello = asyncio.create_task(c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"]))
    await asyncio.sleep(0)  # the hello is on its way before the req
    resp = await c.req(uid, "PROD", 1)
    assert (await hello).listeners == resp.listeners
    await c.release(uid)
