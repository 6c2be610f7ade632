"""UDP through a facility's sessions (``s2cs --facility``, nodes ``s2ds serve --store`` in a
real PostgreSQL): numbered datagrams verified both ways on two flows at once through a
PROD and a CONS half each carried by a node (sealed on the WAN leg between them), replies
to the right sender; how the session carries UDP and its counters in status, Prometheus
and the web view, read from the nodes; release closes every UDP socket; a plain leg;
--no-udp; a node restarted in place keeps its sessions' UDP; a node killed fails them."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from conftest import async_wait_until as wait_for, parse_listener, prod_session
from udp_support import UdpEcho, flow_exchange, flow_more, scrape, udp_port_free, val

pytest.importorskip("asyncpg")

from facilityhelpers import facility, pg, restarted_node, sql  # noqa: E402,F401  (fixtures too)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "web"))
from webhelpers import ahttp  # noqa: E402

LIVE = "('requested', 'ready', 'connected')"


class Shown:
    """A session's status answer: its state, how it carries UDP, its UDP counters."""

    def __init__(self, pb) -> None:
        self.state, self.udp, self.udp_counters = pb.state, pb.udp, dict(pb.udp_counters)

    def __repr__(self) -> str:
        return f"Shown({self.state}, {self.udp}, {self.udp_counters})"


async def status_of(client, uid: str, role: str) -> Shown:
    return next(Shown(s) for s in (await client.status(uid)).sessions if s.role == role)


async def cons_half(client, uid: str, prod, legacy: bool = False):
    """The CONS half of ``uid`` in the same facility as its PROD half: its req, and the
    consumer's hello (which waits for that req if it comes first)."""
    req = asyncio.create_task(client.req(uid, "CONS", len(prod.listeners), 0))
    try:
        await client.hello(uid, "CONS")
        await req
    except BaseException:
        req.cancel()
        await asyncio.gather(req, return_exceptions=True)
        raise
    return await client.update(uid, "CONS", prod.listeners, b"" if legacy else prod.wan_secret)


async def test_flows_through_facility_sessions_status_metrics_web_release(facility, client_for):
    """Both halves of a session on the facility's nodes (PROD's req on one instance, its
    hello and update on the other; the WAN leg between the nodes encrypted), two flows at
    once on two listeners, each datagram verified by its echo."""
    f = facility(nodes=2, instances=2, extra=("--metrics-port", "0", "--web-port", "0"))
    a, b = (client_for(p.target) for p in f.instances)
    async with UdpEcho() as app:
        uid, prod = await prod_session(a, b, f"127.0.0.1:{app.port}", num_conn=2)
        cons = await cons_half(b, uid, prod)
        assert cons.wan_security == "tls"
        rows = {r["role"]: r for r in await sql(f.url, "SELECT role, node, ports, udp FROM fsessions WHERE uid = $1",
                                                uid)}
        assert {r["udp"] for r in rows.values()} == {"encrypted"}
        hosts = {n.name: n.address for n in f.nodes}
        bound = [(hosts[r["node"]], p) for r in rows.values() for p in r["ports"]]
        assert not any(udp_port_free(p, h) for h, p in bound)           # the UDP sockets beside the listeners
        first, second = (parse_listener(x) for x in cons.listeners)
        socks = await asyncio.gather(flow_exchange(first, 1, 60), flow_exchange(second, 2, 60, size=8000))
        try:
            await asyncio.gather(flow_more(socks[0], 1, range(60, 80)),
                                 flow_more(socks[1], 2, range(60, 80), size=8000))
            # one source per flow at the producer, each its own (the PROD node's flow sockets)
            assert all(len(app.sources[n]) == 1 for n in (1, 2))
            assert app.sources[1] != app.sources[2]
            flow_socks = [x for srcs in app.sources.values() for x in srcs]

            # status on either instance: the carriage and the counters, read from the nodes
            for c in (a, b):
                for role in ("PROD", "CONS"):
                    s = await status_of(c, uid, role)
                    assert s.state == "connected" and s.udp == "encrypted", s
                    u = s.udp_counters
                    assert u["flows"] == 2 and u["total_flows"] == 2, u
                    assert u["datagrams_in"] >= 160 and u["datagrams_out"] >= 160, u
                    assert u["bytes_in"] >= 80 * 1200 + 80 * 8000, u
                    assert not any(v for k, v in u.items() if k.startswith("drops_")), u
            # Prometheus (summed over the facility's sessions) and the web view
            port = json.loads(f.instances[0].ready.read_text())["metrics_port"]

            async def counted():
                m = await scrape(port)
                return (val(m, "scistream_udp_datagrams_total", direction="to_producer") >= 2 * 160
                        and val(m, "scistream_udp_flows") == 4)      # two flows in each half
            await wait_for(counted, 15, "the UDP counters in Prometheus")
            web = json.loads(f.instances[1].ready.read_text())["web_port"]
            status, _, body = await ahttp(f"http://127.0.0.1:{web}/api/session/{uid}/PROD")
            assert status == 200, body
            shown = json.loads(body)["session"]
            assert shown["udp"] == "encrypted" and shown["udp_counters"]["flows"] == 2, shown
            status, _, page = await ahttp(f"http://127.0.0.1:{web}/session/{uid}/CONS")
            assert status == 200 and 'class="udp-encrypted"' in page and "2 flows open" in page
        finally:
            for x in socks:
                x.close()
        # release (on the instance that did not take the req): every UDP socket closed,
        # the listeners' and the flows'; the counters stay in the ended session's status
        await b.release(uid)
        assert await sql(f.url, f"SELECT uid FROM fsessions WHERE state IN {LIVE}") == []
        await wait_for(lambda: all(udp_port_free(p, h) for h, p in bound), what="UDP listeners closed")
        assert all(udp_port_free(p, h) for h, p in flow_socks)
        ended = await status_of(a, uid, "CONS")
        assert ended.state == "released" and ended.udp == "encrypted"
        assert ended.udp_counters["datagrams_in"] >= 160 and ended.udp_counters["flows"] == 0


async def test_plain_leg(facility, client_for):
    """A session whose WAN leg is plain (an original client's update, allowed) carries UDP
    plain."""
    f = facility(nodes=1, instances=1, extra=("--allow-legacy-plaintext",))
    a = client_for(f.instances[0].target)
    async with UdpEcho() as app:
        uid, prod = await prod_session(a, a, f"127.0.0.1:{app.port}", legacy=True)
        cons = await cons_half(a, uid, prod, legacy=True)
        assert cons.wan_security == "plain"
        (sock,) = [await flow_exchange(parse_listener(cons.listeners[0]), 7, 30)]
        sock.close()
        s = await status_of(a, uid, "PROD")
        assert s.udp == "plain" and s.udp_counters["datagrams_in"] >= 30
        await a.release(uid)


async def test_no_udp(facility, client_for):
    """A facility started with --no-udp binds no UDP socket and says so in status."""
    g = facility(nodes=1, instances=1, extra=("--no-udp",))
    c = client_for(g.instances[0].target)
    uid, prod = await prod_session(c, c, "127.0.0.1:9")
    s = await status_of(c, uid, "PROD")
    assert s.udp == "off" and not s.udp_counters
    host, port = parse_listener(prod.listeners[0])
    assert udp_port_free(port, host)
    await c.release(uid)


async def test_node_restarted_in_place_keeps_the_udp(facility, client_for):
    """`s2ds restart` of a facility node: the successor takes the sessions' UDP sockets
    over with the TCP listeners; datagrams cross again on the same ports, status reads the
    successor's counters, release closes the sockets."""
    f = facility(nodes=1, instances=1)
    a = client_for(f.instances[0].target)
    node = f.nodes[0]
    async with UdpEcho() as app:
        uid, prod = await prod_session(a, a, f"127.0.0.1:{app.port}")
        cons = await cons_half(a, uid, prod)
        addr = parse_listener(cons.listeners[0])
        sock = await flow_exchange(addr, 1, 20)
        try:
            async with restarted_node(f.url, node):
                # the same source: a new flow through the successor's workers (as on a single
                # gateway, the flows and their counters are the workers'), on the same ports
                await flow_more(sock, 1, range(20, 40))
                assert len(app.sources[1]) == 2
                for role in ("PROD", "CONS"):
                    s = await status_of(a, uid, role)
                    assert s.udp == "encrypted" and s.udp_counters["datagrams_in"] >= 20, s
                    assert s.udp_counters["flows"] == 1, s
                ports = [parse_listener(x) for x in (*prod.listeners, *cons.listeners)]
                await a.release(uid)
                await wait_for(lambda: all(udp_port_free(p, h) for h, p in ports), what="UDP sockets closed")
        finally:
            sock.close()


async def test_node_killed_sessions_fail_new_ones_carry_udp_on_the_survivor(facility, client_for):
    """kill -9 of the node that carries a session's PROD half: its UDP sockets go with it,
    the session fails after --node-timeout as a TCP one does, and a new session goes to the
    other node and carries datagrams."""
    f = facility(nodes=2, instances=1, node_timeout=2.0)
    a = client_for(f.instances[0].target)
    async with UdpEcho() as app:
        uid, prod = await prod_session(a, a, f"127.0.0.1:{app.port}")
        cons = await cons_half(a, uid, prod)
        (sock,) = [await flow_exchange(parse_listener(cons.listeners[0]), 1, 10)]
        sock.close()
        (row,) = await sql(f.url, "SELECT node FROM fsessions WHERE uid = $1 AND role = 'PROD'", uid)
        dead = next(n for n in f.nodes if n.name == row["node"])
        dead.kill()
        host, port = parse_listener(prod.listeners[0])
        await wait_for(lambda: udp_port_free(port, host), 10, "the dead node's UDP socket gone")
        failed = await wait_for(lambda: _prod_in_state(a, uid, "failed"), 20, "the session failed")
        assert "lost" in failed.last_error and failed.udp == "encrypted"
        await a.release(uid)                                       # its CONS half, on the survivor
        uid2, prod2 = await prod_session(a, a, f"127.0.0.1:{app.port}")
        (row2,) = await sql(f.url, "SELECT node FROM fsessions WHERE uid = $1", uid2)
        assert row2["node"] != dead.name
        cons2 = await cons_half(a, uid2, prod2)
        (sock,) = [await flow_exchange(parse_listener(cons2.listeners[0]), 2, 20)]
        sock.close()
        assert (await status_of(a, uid2, "PROD")).udp_counters["datagrams_in"] >= 20
        await a.release(uid2)


async def _prod_in_state(client, uid: str, state: str):
    s = next(x for x in (await client.status(uid)).sessions if x.role == "PROD")
    return s if s.state == state else None
