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
from udp_support import UdpEcho, datagram, flow_exchange, flow_more, paced_stream, scrape, udp_port_free, val


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


async def test_flows_through_an_encrypted_chain(tmp_path):
    async with data_servers(tmp_path) as ds, UdpEcho() as app:
        prod, cons = await ds.chain(f"127.0.0.1:{app.port}", tls=True, listeners=2, udp=True)
        assert type(cons).udp_carriage(cons.spec) == "encrypted"
        a, b = entry(cons, 0), entry(cons, 1)
        socks = await asyncio.gather(flow_exchange(a, 1, 60), flow_exchange(a, 2, 60),
                                     flow_exchange(b, 3, 30, size=8000))
        for s in socks:
            s.close()
        assert all(len(app.sources[f]) == 1 for f in (1, 2, 3))
        assert len(set().union(*app.sources.values())) == 3
        p, c = udp(await stats(prod)), udp(await stats(cons))
        for side in (p, c):
            assert side["flows"] == 3 and side["datagrams_in"] >= 150 and side["datagrams_out"] >= 150
            assert not any(v for k, v in side.items() if k.startswith("drops_"))
        # the payload bytes are counted, not the sealing overhead
        assert p["bytes_in"] == c["bytes_in"] and p["bytes_out"] == c["bytes_out"]
        # a plain datagram sent straight to the PROD gateway's WAN port is never delivered
        before = app.received
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for i in range(5):
                raw.sendto(datagram(9, i, 1200), entry(prod))
        await wait_for(lambda: _dropped(prod, "truncated", 5), what="plain datagrams dropped")
        assert app.received == before and 9 not in app.sources
        ports = list(prod.spec.ports) + list(cons.spec.ports)
        await prod.stop()
        await cons.stop()
        await wait_for(lambda: all(udp_port_free(p) for p in ports), what="UDP listeners closed")


async def _dropped(srv, cause: str, n: int) -> bool:
    return udp(await stats(srv))[f"drops_{cause}"] >= n


async def test_forged_replayed_truncated_and_foreign_datagrams_are_dropped(tmp_path):
    """Datagrams on the PROD gateway's WAN port, sealed here with the session's key (as its
    CONS gateway seals them) and then tampered with: only the genuine ones reach the
    producer, each other one is dropped and counted by its cause."""
    from scistream.data import wankeys
    from scistream.data.engine.udp import zero_counters
    from scistream.data.engine.udpseal import Sealer, master_key

    async with data_servers(tmp_path, workers=1) as ds, UdpEcho() as app:
        secret = wankeys.new_secret()
        prod = await ds.start("PROD", [f"127.0.0.1:{app.port}"], secret=secret, udp=True)
        ours = Sealer(master_key(secret), "CONS")
        other = Sealer(master_key(wankeys.new_secret()), "CONS")
        flow = ours.new_flow()
        loop = asyncio.get_running_loop()
        counts = zero_counters()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
            s.setblocking(False)
            s.connect(entry(prod))
            genuine = []
            for i in range(10):
                wire = ours.seal_state(flow, datagram(1, i, 1000))
                genuine.append(wire)
                await loop.sock_sendall(s, wire)
                reply = await asyncio.wait_for(loop.sock_recv(s, 65536), 5)
                opened = ours.open(flow, reply, counts)
                assert opened is not None and opened[1] == b"echo" + datagram(1, i, 1000)
            assert app.received == 10
            # forgeries carry counters not seen yet (a seen one is refused as replayed first)
            flipped = bytearray(ours.seal_state(flow, datagram(1, 20, 1000)))
            flipped[40] ^= 0x10
            fresh = ours.seal_state(flow, datagram(1, 21, 1000))
            bad = {
                "replayed": [genuine[0], genuine[9], genuine[5]],
                "forged": [bytes(flipped), fresh[:23] + bytes(len(fresh) - 23)],
                "truncated": [genuine[2][:30], b"", datagram(1, 99, 500)],
                "foreign": [other.seal_state(other.new_flow(), datagram(1, 50, 800))],
            }
            for wires in bad.values():
                for w in wires:
                    await loop.sock_sendall(s, w)
            # a recorded datagram sent from another source cannot open a flow there either
            elsewhere.sendto(genuine[7], entry(prod))
            want = {k: len(v) for k, v in bad.items()}
            want["replayed"] += 1

            async def all_counted():
                c = udp(await stats(prod))
                return all(c[f"drops_{k}"] >= n for k, n in want.items()) and c
            try:
                c = await wait_for(all_counted, what="every bad datagram counted")
            except AssertionError:
                raise AssertionError(f"counted {udp(await stats(prod))}, want {want}") from None
            assert {k: c[f"drops_{k}"] for k in want} == want
            assert app.received == 10 and c["datagrams_in"] == 10 and c["flows"] == 1
            # the flow goes on after all that
            await loop.sock_sendall(s, ours.seal_state(flow, datagram(1, 10, 1000)))
            reply = await asyncio.wait_for(loop.sock_recv(s, 65536), 5)
            assert ours.open(flow, reply, counts)[1] == b"echo" + datagram(1, 10, 1000)
        assert not any(counts.values())


async def test_encrypted_udp_through_s2cs(servers, client_for):
    """Our client's session (a WAN secret): UDP sealed on the WAN leg, said in status."""
    async with UdpEcho() as app:
        prod_srv, cons_srv = await servers(server_type="Builtin"), await servers(server_type="Builtin")
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, f"127.0.0.1:{app.port}", 2)
        assert cons.wan_security == "tls"
        socks = await asyncio.gather(*(flow_exchange(parse_listener(x), i, 30) for i, x in enumerate(cons.listeners)))
        for s in socks:
            s.close()
        for c in (pc, cc):
            info = (await c.status(uid)).sessions[0]
            assert info.udp == "encrypted" and info.udp_counters["datagrams_in"] == 60
        await pc.release(uid)
        await cc.release(uid)
        assert all(udp_port_free(parse_listener(x)[1]) for x in list(prod.listeners) + list(cons.listeners))


FLOOD = r"""
import os, socket, struct, sys, time
host, port, seconds, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for k in range(50):
        if k % 2:   # random bytes; and headers of this session with a fresh flow id, then garbage
            s.sendto(os.urandom(200), (host, port))
        else:
            head = struct.pack("!B4s8sHQ", 1, tag, struct.pack("!I", int(time.time())) + os.urandom(4), 0, n)
            s.sendto(head + os.urandom(300), (host, port))
        n += 1
    time.sleep(0.001)
print(n)
"""


async def test_a_flood_of_garbage_on_the_wan_port_costs_the_flow_nothing(tmp_path):
    """While a paced flow crosses an encrypted chain, another process floods the PROD
    gateway's WAN port with garbage (random bytes, and datagrams with the session's tag
    that do not authenticate): the flow loses no more than the same flow sent straight
    to an echo beside it (the machine's own loss, plus 1% of the flow), and the garbage is
    dropped and counted, never delivered."""
    import subprocess
    import sys

    from scistream.data.engine.udpseal import Sealer, master_key

    async with data_servers(tmp_path) as ds, UdpEcho() as app, UdpEcho() as beside:
        prod, cons = await ds.chain(f"127.0.0.1:{app.port}", tls=True, udp=True)
        tag = Sealer(master_key(prod.spec.wan_secret), "PROD").tag
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, *map(str, entry(prod)), "4", tag.hex()],
                                 stdout=subprocess.PIPE, text=True)
        try:
            count = 3000
            through, own = await asyncio.gather(paced_stream(entry(cons), 1, count, 1000, 1000),
                                                paced_stream(("127.0.0.1", beside.port), 2, count, 1000, 1000))
            sent = int(flood.communicate(timeout=60)[0])
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        assert sent > 1000
        assert count - through <= (count - own) + count // 100, (through, own)

        async def garbage_counted():
            c = udp(await stats(prod))
            return c["drops_truncated"] + c["drops_forged"] + c["drops_foreign"] + c["drops_kernel"] >= sent and c
        c = await wait_for(garbage_counted, what="every garbage datagram dropped and counted")
        assert c["drops_truncated"] + c["drops_forged"] + c["drops_foreign"] + c["drops_kernel"] == sent, c
        assert set(app.sources) == {1} and c["flows"] == 1


async def test_udp_survives_a_service_restart(servers, client_for):
    """``s2ds restart``: the successor takes the sessions' UDP sockets with their TCP
    listeners; new flows cross on the same ports, and release frees them."""
    from conftest import BIN
    from scistream.data.supervise import pid_alive

    async with UdpEcho() as app:
        prod_srv, cons_srv = await servers(workers=2), await servers(workers=2)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, f"127.0.0.1:{app.port}", 2)
        addr = parse_listener(cons.listeners[1])
        (await flow_exchange(addr, 1, 10)).close()
        old = cons_srv.node.pid
        proc = await asyncio.create_subprocess_exec(str(BIN / "s2ds"), "restart", "--socket", str(cons_srv.node.path),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        await wait_for(lambda: not pid_alive(old), what="the old service gone")
        (await flow_exchange(addr, 2, 10)).close()
        assert len(app.sources[2]) == 1
        await wait_for(lambda: cons_srv.node.pid != old, what="s2cs follows the new service")
        info = (await cc.status(uid)).sessions[0]
        assert info.udp == "encrypted" and info.udp_counters["datagrams_in"] >= 10
        await pc.release(uid)
        await cc.release(uid)
        assert all(udp_port_free(parse_listener(x)[1]) for x in list(prod.listeners) + list(cons.listeners))


async def test_a_restarted_worker_gets_the_udp_sockets_back(servers, client_for):
    """kill -9 of the worker carrying a session: its flows go with it, the service keeps the
    UDP sockets and gives them to the new worker, and new flows cross again."""
    import os
    import signal

    from scistream.data.node.client import call_once

    async with UdpEcho() as app:
        prod_srv, cons_srv = await servers(workers=1), await servers(workers=1)
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, f"127.0.0.1:{app.port}", 1)
        addr = parse_listener(cons.listeners[0])
        (await flow_exchange(addr, 1, 10)).close()
        # counters read before the kill are kept (a dead worker's since the last read are lost, as for TCP)
        assert (await cc.status(uid)).sessions[0].udp_counters["datagrams_in"] == 10
        (victim,) = [w["pid"] for w in (await call_once(cons_srv.node.path, {"op": "status"}))["workers"]]
        os.kill(victim, signal.SIGKILL)

        async def replaced():
            (w,) = (await call_once(cons_srv.node.path, {"op": "status"}))["workers"]
            return w["alive"] and w["pid"] != victim
        await wait_for(replaced, what="the worker replaced")
        (await flow_exchange(addr, 2, 10)).close()
        info = (await cc.status(uid)).sessions[0]
        assert info.udp_counters["datagrams_in"] >= 20 and info.udp_counters["flows"] == 1
        await pc.release(uid)
        await cc.release(uid)
        assert udp_port_free(addr[1])


async def test_the_service_refuses_udp_it_cannot_seal_or_bind(servers):
    """An add asking for UDP beside a TLS leg without the session's secret (no key to seal
    with), or on a port whose UDP another program holds: refused, nothing left behind."""
    import pytest

    from conftest import free_port
    from scistream.data.node.client import ServiceError, call_once

    srv = await servers()
    base = {"role": "PROD", "targets": ["127.0.0.1:1"], "listen_host": "127.0.0.1", "udp": True}
    with pytest.raises(ServiceError, match="needs the session's wan_secret"):
        await call_once(srv.node.path, {"op": "add", "sid": "x", "cfg": {
            **base, "ports": [free_port()], "tls": True, "cert_pem": "x", "key_pem": "y"}})
    from conftest import port_block, port_is_free
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        # only the port's UDP side held: one below the ephemeral range (no outgoing TCP
        # connection takes it meanwhile) whose TCP side is free
        first, last = map(int, port_block(20).split("-"))
        for port in range(first, last + 1):
            if port_is_free(port):
                try:
                    holder.bind(("127.0.0.1", port))
                    break
                except OSError:
                    continue
        else:
            pytest.fail(f"no port of {first}-{last} free for TCP and UDP")
        with pytest.raises(ServiceError, match="cannot bind UDP"):
            await call_once(srv.node.path, {"op": "add", "sid": "y", "cfg": {**base, "ports": [port]}})
        assert port_is_free(port)        # the TCP listener bound before the UDP one failed: closed
    assert (await call_once(srv.node.path, {"op": "status"}))["sessions"] == 0


async def test_the_udp_key_never_leaves_the_service(tmp_path):
    """The service's ``config`` answer leaves out the session's sealing key, as it leaves
    out the TLS key; the s2cs side never holds it (only the WAN secret it already has)."""
    from scistream.data.node.client import call_once

    async with data_servers(tmp_path, workers=1) as ds, UdpEcho() as app:
        prod, cons = await ds.chain(f"127.0.0.1:{app.port}", tls=True, udp=True)
        (await flow_exchange(entry(cons), 1, 3)).close()
        for srv in (prod, cons):
            got = await call_once(ds.node.path, {"op": "config", "sid": srv.sid})
            assert got["cfg"]["udp"] is True
            assert not {"udp_key", "key_pem", "wan_secret"} & set(got["cfg"]), sorted(got["cfg"])
