"""UDP through Nginx sessions (the original's ``listen PORT udp; proxy_pass TARGET;``),
behind real control servers: numbered datagrams verified both ways on two flows at once,
replies to the right sender, one source per flow at the producer; the rule that nginx
never carries datagrams in the clear beside an encrypted TCP leg unless told; --no-udp;
release frees the UDP ports too."""
from __future__ import annotations

import asyncio

import pytest

from conftest import async_wait_until, connect_session, parse_listener
from scistream.data.base import get_backend
from scistream.data.base import BackendUnavailable
from test_backends_support import App
from udp_support import UdpEcho, flow_exchange, flow_more, udp_port_free

try:
    get_backend("Nginx").check_available()
    NGINX = ""
except BackendUnavailable as exc:   # pragma: no cover - the machine has nginx
    NGINX = str(exc)

pytestmark = pytest.mark.skipif(bool(NGINX), reason=NGINX)


async def status_of(client, uid):
    (info,) = (await client.status(uid)).sessions
    return info


async def test_udp_through_plain_nginx_session(servers, client_for):
    async with App() as app, UdpEcho(app.port) as udp_app:
        prod_srv, cons_srv = await servers(server_type="Nginx"), await servers(server_type="Nginx")
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 2, legacy=True)
        assert cons.wan_security == "plain"
        listeners = [parse_listener(x) for x in cons.listeners]
        # two flows at once on the first listener, one on the second: every datagram echoed
        # to its own sender
        socks = await asyncio.gather(flow_exchange(listeners[0], 1, 40), flow_exchange(listeners[0], 2, 40),
                                     flow_exchange(listeners[1], 3, 20, size=8000))
        try:
            # the producer saw one source per flow, and three different ones
            assert all(len(udp_app.sources[f]) == 1 for f in (1, 2, 3))
            assert len(set().union(*udp_app.sources.values())) == 3
            await flow_more(socks[0], 1, range(40, 50))     # the flow goes on from the same source
            assert len(udp_app.sources[1]) == 1
        finally:
            for s in socks:
                s.close()
        for c in (pc, cc):
            assert (await status_of(c, uid)).udp == "plain"
        ports = [parse_listener(x)[1] for x in list(cons.listeners) + list(prod.listeners)]
        assert not any(udp_port_free(p) for p in ports)
        await pc.release(uid)
        await cc.release(uid)
        await async_wait_until(lambda: all(udp_port_free(p) for p in ports), what="UDP ports freed")


async def test_nginx_withholds_udp_beside_encrypted_tcp(servers, client_for):
    async with App() as app, UdpEcho(app.port):
        prod_srv, cons_srv = await servers(server_type="Nginx"), await servers(server_type="Nginx")
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 1)
        assert cons.wan_security == "tls"
        assert (await status_of(cc, uid)).udp == "withheld"
        port = parse_listener(cons.listeners[0])[1]
        assert udp_port_free(port)      # nothing listens for UDP there
        conf = (cons_srv.registry.active[(uid, "CONS")].server.conf_path).read_text()
        assert " udp" not in conf
        await pc.release(uid)
        await cc.release(uid)


async def test_udp_plaintext_beside_encrypted_tcp_when_told(servers, client_for, caplog):
    async with App() as app, UdpEcho(app.port) as udp_app:
        prod_srv = await servers(server_type="Nginx", udp_plaintext=True)
        cons_srv = await servers(server_type="Nginx", udp_plaintext=True)
        assert "IN THE CLEAR" in caplog.text
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 1)
        assert cons.wan_security == "tls"
        sock = await flow_exchange(parse_listener(cons.listeners[0]), 7, 20)
        sock.close()
        assert len(udp_app.sources[7]) == 1
        for c in (pc, cc):
            assert (await status_of(c, uid)).udp == "plaintext"
        await pc.release(uid)
        await cc.release(uid)


async def test_no_udp(servers, client_for):
    async with App() as app:
        prod_srv, cons_srv = await servers(server_type="Nginx", udp=False), await servers(server_type="Nginx", udp=False)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, 1, legacy=True)
        assert (await status_of(cc, uid)).udp == "off"
        assert udp_port_free(parse_listener(cons.listeners[0])[1])
        await pc.release(uid)
        await cc.release(uid)


async def test_web_view_says_udp_crosses_in_the_clear(servers, client_for):
    import re
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "web"))
    from webhelpers import ahttp

    async with App() as app, UdpEcho(app.port):
        prod_srv = await servers(server_type="Nginx", udp_plaintext=True, web_port=0)
        cons_srv = await servers(server_type="Nginx", udp_plaintext=True)
        uid, _, cons = await connect_session(client_for(prod_srv), client_for(cons_srv), app.endpoint, 1)
        status, _, page = await ahttp(f"http://127.0.0.1:{prod_srv.web_port}/session/{uid}/PROD")
        assert status == 200
        shown = re.search(r'<span id="udp" class="udp-plaintext">([^<]*)</span>', page)
        assert shown and "IN THE CLEAR" in shown.group(1), page
        status, _, body = await ahttp(f"http://127.0.0.1:{prod_srv.web_port}/api/session/{uid}/PROD")
        assert status == 200 and '"udp": "plaintext"' in body.replace('":"', '": "'), body
        await client_for(prod_srv).release(uid)
        await client_for(cons_srv).release(uid)
