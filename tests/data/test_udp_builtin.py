"""UDP through the built-in type (sessions in a node service, as s2cs starts it): numbered
datagrams verified both ways on several flows at once through a PROD + CONS chain,
replies to the right sender, one source per flow at the producer; the counters; the flow
cap and idle expiry; stop closes every UDP socket (listeners and flows)."""
from __future__ import annotations

import asyncio

from builtin_support import data_servers, entry, stats
from conftest import async_wait_until as wait_for
from udp_support import UdpEcho, flow_exchange, flow_more, udp_port_free


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
    import socket
    from udp_support import datagram
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(addr)
        await loop.sock_sendall(s, datagram(3, 0, 100))
        try:
            await asyncio.wait_for(loop.sock_recv(s, 65536), 0.5)
        except asyncio.TimeoutError:
            return True
    return False
