"""UDP through the built-in type (sessions in a node service, as s2cs starts it): numbered
datagrams verified both ways on several flows at once through a PROD + CONS chain,
replies to the right sender, one source per flow at the producer; the counters; the flow
cap and idle expiry; stop closes every UDP socket (listeners and flows)."""
from __future__ import annotations

import asyncio
import socket
import time

from builtin_support import data_servers, entry, stats
from conftest import async_wait_until as wait_for, connect_session, parse_listener
from udp_support import UdpEcho, datagram, flow_exchange, flow_more, scrape, udp_port_free, val


def udp(st: dict) -> dict:
    return {k[4:]: v for k, v in st.items() if k.startswith("udp_")}


async def test_flows_through_a_plain_chain(tmp_path):
    async with data_servers(tmp_path) as ds, UdpEcho() as app:
        prod, cons = await ds.chain(f"127.0.0.1:{app.port}", tls=False, listeners=2, udp=True)
        a, b = entry(cons, 0), entry(cons, 1)
        socks = await asyncio.gather(flow_exchange(a, 1, 60), flow_exchange(a, 2, 60),
                                     flow_exchange(b, 3, 30, size=8000))
        try:
            assert all(len(app.sources[f]) == 1 for f in (1, 2, 3))
            assert len(set().union(*app.sources.values())) == 3    # one source per flow, each its own
            await flow_more(socks[1], 2, range(60, 70))
            assert len(app.sources[2]) == 1
            c = udp(await stats(cons))
            assert c["flows"] == 3 and c["total_flows"] == 3
            assert c["datagrams_in"] >= 160 and c["datagrams_out"] >= 160
            assert c["bytes_in"] >= 130 * 1200 + 30 * 8000
            assert not any(v for k, v in c.items() if k.startswith("drops_"))
            # status through the s2cs side of the backend
            st = await cons.stats()
            assert st.udp["flows"] == 3 and st.udp["datagrams_in"] == c["datagrams_in"]
        finally:
            for s in socks:
                s.close()
        ports = list(prod.spec.ports) + list(cons.spec.ports)
        flow_ports = [s for s in app.sources.values() for s in s]
        assert not any(udp_port_free(p) for p in ports)
        await prod.stop()
        await cons.stop()
        # the listeners and every flow's socket are closed
        await wait_for(lambda: all(udp_port_free(p) for p in ports), what="UDP listeners closed")
        assert all(udp_port_free(port, host) for host, port in flow_ports)


async def test_flow_cap_and_idle_expiry(tmp_path):
    async with data_servers(tmp_path, workers=1) as ds, UdpEcho() as app:
        srv = await ds.start("PROD", [f"127.0.0.1:{app.port}"], udp=True, udp_max_flows=2, udp_idle=2.0)
        first = await flow_exchange(entry(srv), 1, 5)
        second = await flow_exchange(entry(srv), 2, 5)
        try:
            # a third source is over the cap: its datagrams are dropped and counted
            third = await asyncio.wait_for(_no_echo(entry(srv)), 10)
            assert third
            c = udp(await stats(srv))
            assert c["flows"] == 2 and c["drops_flow_limit"] >= 1
            assert 3 not in app.sources
            # idle: both flows end, their sockets closed
            await wait_for(lambda: _flows(srv, 0), what="idle flows expired")
            c = udp(await stats(srv))
            assert c["flows_expired"] == 2
            assert all(udp_port_free(port, host) for srcs in app.sources.values() for host, port in srcs)
            # the same source again: a new flow (a new source at the producer)
            await flow_more(first, 1, range(5, 8))
            assert len(app.sources[1]) == 2
        finally:
            first.close()
            second.close()


async def _flows(srv, n: int) -> bool:
    return udp(await stats(srv))["flows"] == n


async def _no_echo(addr) -> bool:
    """A third flow's datagram gets no echo within half a second."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(addr)
        await loop.sock_sendall(s, datagram(3, 0, 100))
        try:
            await asyncio.wait_for(loop.sock_recv(s, 65536), 0.5)
        except asyncio.TimeoutError:
            return True
    return False


async def test_udp_through_s2cs_status_metrics_and_rate(servers, client_for):
    """Sessions made the way a user makes them (the original tooling's client, plain WAN leg
    allowed), UDP counted in status and Prometheus; the session's rate polices datagrams."""
    async with UdpEcho() as app:
        prod_srv = await servers(server_type="Builtin", allow_legacy_plaintext=True, enforce_legacy_rate=True,
                                 metrics_port=0)
        cons_srv = await servers(server_type="Builtin", allow_legacy_plaintext=True, enforce_legacy_rate=True)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        rate_kbps = 8000         # 1 MB/s; the bucket's burst: 50 kB
        uid, prod, cons = await connect_session(pc, cc, f"127.0.0.1:{app.port}", 1, rate=rate_kbps, legacy=True)
        addr = parse_listener(cons.listeners[0])
        (sock,) = [await flow_exchange(addr, 1, 20)]
        loop = asyncio.get_running_loop()
        # 300 datagrams of 1200 bytes at ~5 MB/s: far over the rate, many are dropped
        start = time.monotonic()
        for i in range(300):
            await loop.sock_sendall(sock, datagram(1, 1000 + i, 1200))
            if i % 20 == 19:
                await asyncio.sleep(0.005)    # pacing (~5 MB/s): the listener's buffer never fills
        sock.close()

        async def counted():
            info = (await cc.status(uid)).sessions[0]
            c = dict(info.udp_counters)
            return c.get("datagrams_in", 0) + c.get("drops_rate", 0) >= 320 and (info, c)
        info, c = await wait_for(counted, what="the burst counted")
        elapsed = time.monotonic() - start      # every datagram was relayed or dropped by now
        assert info.udp == "plain"
        assert c["drops_rate"] > 0
        # at most the bucket's burst plus the rate over the time since the first datagram
        assert (c["datagrams_in"] - 20) * 1200 <= 50_000 + 1_000_000 * elapsed
        pinfo = (await pc.status(uid)).sessions[0]
        assert pinfo.udp_counters["datagrams_in"] >= 20 and pinfo.udp_counters["flows"] == 1
        m = await scrape(prod_srv.metrics_port)
        assert val(m, "scistream_udp_datagrams_total", direction="to_producer") == pinfo.udp_counters["datagrams_in"]
        assert val(m, "scistream_udp_flows") == 1
        assert ("scistream_udp_drops_total", (("cause", "forged"),)) in m
        await pc.release(uid)
        await cc.release(uid)
        m = await scrape(prod_srv.metrics_port)
        assert val(m, "scistream_udp_flows") == 0
        assert val(m, "scistream_udp_datagrams_total", direction="to_producer") >= 20
        assert all(udp_port_free(parse_listener(x)[1]) for x in list(prod.listeners) + list(cons.listeners))
