"""The built-in type's UDP relay on its compiled path (``_pump.udp_pass`` and ``UdpDir``)
against its Python path: the sealed bytes are the same both ways (a compiled gateway and
a Python one carry a session between them, either one on either side), and what fails to
open on the compiled path is dropped and counted by cause there, never delivered.

The relays run in this process on an engine loop whose handlers are called here, one
readiness event at a time (loopback delivers a datagram inside the sender's call)."""
from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from scistream.data import wankeys
from scistream.data.engine import compiled
from scistream.data.engine.loop import Loop
from scistream.data.engine.udp import UdpRelay, sockaddr, zero_counters
from scistream.data.engine.udpseal import OVERHEAD, WINDOW, Sealer, master_key

needs_module = pytest.mark.skipif(compiled.module is None, reason="the compiled module (_pump.c) was not built")
pytestmark = needs_module


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


@pytest.mark.parametrize("cons_fast,prod_fast", [(True, False), (False, True), (True, True)])
def test_sealers_interoperate_both_ways(cons_fast, prod_fast):
    """Every size, both directions, reordering inside the window, replays refused, rekeying:
    a compiled UdpDir and the Python Direction read each other's bytes."""
    key = master_key(wankeys.new_secret())
    cons, prod = Sealer(key, "CONS", 5, fast=cons_fast), Sealer(key, "PROD", 5, fast=prod_fast)
    assert (cons.fast, prod.fast) == (cons_fast, prod_fast)
    c = zero_counters()
    flow = cons.new_flow()
    rng = random.Random(7)
    sent = [os.urandom(n) for n in [0, 1, 15, 16, 17, 1200, 8000, 65535 - OVERHEAD] + [rng.randrange(2000) for _ in range(30)]]
    wires = [cons.seal_state(flow, d) for d in sent]
    assert all(len(w) == len(d) + OVERHEAD for w, d in zip(wires, sent))
    keys = None
    for w, d in zip(wires, sent):      # in order (epochs move forward one at a time)
        opened = prod.open(keys, w, c)
        assert opened is not None and opened[1] == d
        keys = opened[0]
    assert keys.recv.epoch == (len(sent) - 1) // 5
    assert all(prod.open(keys, w, c) is None for w in wires[-5:])      # replays of this epoch
    assert c["drops_replayed"] == 5
    # the other way, out of order inside one epoch (a key per 5 datagrams): reordered ones open
    back = [os.urandom(100 + i) for i in range(5)]
    bwires = [prod.seal_state(keys, d) for d in back]
    order = [0, 3, 1, 4, 2]
    for i in order:
        assert cons.open(flow, bwires[i], c)[1] == back[i]
    forged = bytearray(bwires[2])
    forged[-1] ^= 1
    assert cons.open(flow, bytes(forged), c) is None
    assert c["drops_forged"] == 0 and c["drops_replayed"] == 6     # the same counter: seen, refused first


def test_the_compiled_window_is_udpseals():
    """The replay window of UdpDir (a ring of bits) against the Python one (a shifted integer):
    the same answers over a long random walk of counters."""
    key = os.urandom(32)
    py = Sealer(master_key(key), "PROD", fast=False)._dir(os.urandom(32), 0, False)
    cd = compiled.module.UdpDir(os.urandom(32), 0, False)
    rng = random.Random(11)
    top = 0
    for _ in range(20000):
        jump = rng.choice([1, 1, 2, 3, -1, -5, -100, -WINDOW + 1, -WINDOW, -WINDOW - 1, 50, WINDOW, WINDOW + 7])
        ctr = max(0, top + jump)
        assert cd.replayed(ctr) == py.replayed(ctr), ctr
        if not py.replayed(ctr):
            py.accept(ctr)
            cd.accept(ctr)
        assert cd.top == py.top
        top = max(top, ctr)


class Chain:
    """client -> CONS relay -> (sealed) -> PROD relay -> app, in this process: each relay on
    its compiled path or on its Python path."""

    def __init__(self, cons_compiled: bool, prod_compiled: bool, rekey_after: int = 1 << 32) -> None:
        self.loop = Loop()
        self.app = _udp()
        self.key = master_key(wankeys.new_secret())
        self.prod_l, self.cons_l = _udp(), _udp()
        for s in (self.prod_l, self.cons_l):
            s.setblocking(False)
        app_addr, prod_addr = self.app.getsockname(), self.prod_l.getsockname()
        buckets = {"in": None, "out": None}
        self.prod = UdpRelay(self.loop, [(0, self.prod_l)], lambda: [(socket.AF_INET, app_addr)], sid="t/PROD",
                             buckets=buckets, sealer=Sealer(self.key, "PROD", rekey_after, fast=prod_compiled),
                             wan_side="listener", compiled=prod_compiled)
        self.cons = UdpRelay(self.loop, [(0, self.cons_l)], lambda: [(socket.AF_INET, prod_addr)], sid="t/CONS",
                             buckets=buckets, sealer=Sealer(self.key, "CONS", rekey_after, fast=cons_compiled),
                             wan_side="flow", compiled=cons_compiled)
        assert (self.cons.compiled is not None, self.prod.compiled is not None) == (cons_compiled, prod_compiled)

    def forward(self) -> None:
        self.cons._from_source(0, self.cons_l)
        self.prod._from_source(0, self.prod_l)

    def backward(self) -> None:
        for f in list(self.prod.flows.values()):
            self.prod._from_target(f)
        for f in list(self.cons.flows.values()):
            self.cons._from_target(f)

    def close(self) -> None:
        self.cons.close()
        self.prod.close()
        self.app.close()
        self.loop.close()


@pytest.mark.parametrize("cons_compiled,prod_compiled", [(True, False), (False, True), (True, True), (False, False)])
def test_a_chain_of_compiled_and_python_relays(cons_compiled, prod_compiled):
    """Numbered datagrams of two flows through CONS and PROD relays, each compiled or Python:
    all arrive, in order, one source per flow at the app; replies reach the right sender;
    counters agree on both relays. Rekeying every 50 datagrams crosses the two paths too."""
    ch = Chain(cons_compiled, prod_compiled, rekey_after=50)
    a, b = _udp(), _udp()
    try:
        sent = {0: [], 1: []}
        got: dict[int, list] = {0: [], 1: []}
        sources: dict[int, set] = {0: set(), 1: set()}
        for rnd in range(6):                   # batches of 40 datagrams per readiness event
            for i in range(40):
                f = i % 2
                d = struct.pack("!HI", f, rnd * 40 + i) + os.urandom(1200 if f == 0 else 8000)
                sent[f].append(d)
                (a if f == 0 else b).sendto(d, ch.cons_l.getsockname())
            ch.forward()
            for _ in range(40):
                d, src = ch.app.recvfrom(65536)
                f = struct.unpack("!H", d[:2])[0]
                got[f].append(d)
                sources[f].add(src)
                ch.app.sendto(b"re" + d[:6], src)
            ch.backward()
        assert got == sent
        assert all(len(s) == 1 for s in sources.values()) and sources[0] != sources[1]
        for sock, f in ((a, 0), (b, 1)):
            replies = [sock.recv(100) for _ in range(120)]
            assert replies == [b"re" + d[:6] for d in sent[f]]
        pc, cc = ch.prod.counters(), ch.cons.counters()
        for c in (pc, cc):
            assert c["datagrams_in"] == 240 and c["datagrams_out"] == 240 and c["flows"] == 2
            assert not any(v for k, v in c.items() if k.startswith("drops_"))
        assert pc["bytes_in"] == cc["bytes_in"] == 120 * (1206 + 8006)
        for relay, on in ((ch.cons, cons_compiled), (ch.prod, prod_compiled)):
            if on:      # most of it on the compiled path: the new flows and new epochs went to Python
                assert 0 < relay.given_back < 480 / 2
            else:
                assert relay.given_back == 0
    finally:
        a.close()
        b.close()
        ch.close()


def test_the_compiled_path_drops_and_counts_what_does_not_open():
    """Forged, replayed, truncated and foreign datagrams on a compiled PROD relay's WAN port,
    and forged, replayed and truncated replies on a compiled CONS relay's flow: none is
    delivered, each is counted by cause, on the compiled path (none given back to Python)."""
    ch = Chain(True, True)
    a = _udp()
    try:
        a.sendto(b"first", ch.cons_l.getsockname())
        ch.forward()
        assert ch.app.recvfrom(100)[0] == b"first"
        (cflow,) = ch.cons.flows.values()
        (pflow,) = ch.prod.flows.values()
        ch.app.sendto(b"warm", pflow.sock.getsockname())    # a reply: each direction has its key now
        ch.backward()
        assert a.recv(100) == b"warm"
        given = ch.prod.given_back, ch.cons.given_back
        # the CONS relay's sealing, seen by a peer: datagrams of this flow, recorded
        cons_sealer, prod_sealer = ch.cons.sealer, ch.prod.sealer
        genuine = [cons_sealer.seal_state(cflow.state, b"g%d" % i) for i in range(5)]
        other = Sealer(master_key(wankeys.new_secret()), "CONS", fast=False)
        flipped = bytearray(cons_sealer.seal_state(cflow.state, b"x" * 50))
        flipped[30] ^= 4
        header = bytearray(cons_sealer.seal_state(cflow.state, b"y" * 50))
        header[22] ^= 1                        # the counter (authenticated)
        bad = {"truncated": [genuine[0][:OVERHEAD - 1], b"\x02" + genuine[0][1:], b""],
               "foreign": [other.seal_state(other.new_flow(), b"z")],
               "forged": [bytes(flipped), bytes(header)]}
        flow_sock = cflow.sock                 # the PROD relay sees its flow from this socket
        for w in genuine:
            flow_sock.send(w)
        ch.prod._from_source(0, ch.prod_l)
        assert [ch.app.recvfrom(100)[0] for _ in genuine] == [b"g%d" % i for i in range(5)]
        for wires in bad.values():
            for w in wires:
                flow_sock.send(w)
        for w in genuine[1:4]:                 # again
            flow_sock.send(w)
        ch.prod._from_source(0, ch.prod_l)
        c = ch.prod.counters()
        assert {k: c[f"drops_{k}"] for k in ("truncated", "foreign", "forged", "replayed")} == \
            {"truncated": 3, "foreign": 1, "forged": 2, "replayed": 3}
        assert c["datagrams_in"] == 6
        ch.app.settimeout(0.2)
        with pytest.raises(TimeoutError):
            ch.app.recvfrom(100)
        # replies on the CONS relay's flow socket, as if from the PROD gateway
        src = ch.prod_l
        good = prod_sealer.seal_state(pflow.state, b"reply")
        forged = bytearray(prod_sealer.seal_state(pflow.state, b"reply2"))
        forged[-3] ^= 1
        for w in (good, bytes(forged), good, good[:10]):
            src.sendto(w, flow_sock.getsockname())
        ch.cons._from_target(cflow)
        assert a.recv(100) == b"reply"
        cc = ch.cons.counters()
        assert (cc["drops_forged"], cc["drops_replayed"], cc["drops_truncated"], cc["datagrams_out"]) == (1, 1, 1, 2)
        a.settimeout(0.2)
        with pytest.raises(TimeoutError):
            a.recv(100)
        assert (ch.prod.given_back, ch.cons.given_back) == given
    finally:
        a.close()
        ch.close()


def test_sockaddr_is_the_kernels():
    """The compiled path keys a flow by the sockaddr recvmmsg gives; engine.udp.sockaddr
    makes the same bytes from a Python address (flows opened on either path meet)."""
    with _udp() as rx, _udp() as tx:
        tx.sendto(b"x", rx.getsockname())
        data, src = rx.recvfrom(10)
        assert sockaddr(socket.AF_INET, src) == struct.pack("=H", socket.AF_INET) + struct.pack("!H", src[1]) + \
            socket.inet_aton(src[0]) + bytes(8)


@pytest.mark.parametrize("prod_pumps,cons_pumps", [("python", "c"), ("c", "python")])
async def test_gateways_on_the_compiled_and_the_python_path_carry_a_sealed_session(
        tmp_path, monkeypatch, prod_pumps, cons_pumps):
    """A PROD gateway's node service on one path and the CONS gateway's on the other (as
    ``SCISTREAM_PUMPS`` chooses at start): numbered datagrams of 1,200 and 8,000 bytes on
    two flows, each verified by its echo, through the sealed WAN leg both ways."""
    import asyncio

    from builtin_support import data_servers, entry, stats
    from udp_support import UdpEcho, flow_exchange
    if compiled.pump is None:
        pytest.skip("SCISTREAM_PUMPS=python: the compiled path is not chosen here")
    secret = wankeys.new_secret()
    async with UdpEcho() as app:
        monkeypatch.setenv("SCISTREAM_PUMPS", prod_pumps)
        async with data_servers(tmp_path / "prod", workers=1) as pds:
            monkeypatch.setenv("SCISTREAM_PUMPS", cons_pumps)
            async with data_servers(tmp_path / "cons", workers=1) as cds:
                prod = await pds.start("PROD", [f"127.0.0.1:{app.port}"], secret=secret, udp=True)
                cons = await cds.start("CONS", [f"127.0.0.1:{p}" for p in prod.spec.ports], secret=secret,
                                       uid=prod.spec.uid, udp=True)
                socks = await asyncio.gather(flow_exchange(entry(cons), 1, 80),
                                             flow_exchange(entry(cons), 2, 40, size=8000))
                for s in socks:
                    s.close()
                assert all(len(app.sources[f]) == 1 for f in (1, 2))
                for srv in (prod, cons):
                    c = {k[4:]: v for k, v in (await stats(srv)).items() if k.startswith("udp_")}
                    assert c["flows"] == 2 and c["datagrams_in"] >= 120 and c["datagrams_out"] >= 120
                    assert not any(v for k, v in c.items() if k.startswith("drops_")), c


def test_a_gro_run_is_split_and_each_datagram_opened_on_its_own():
    """A GSO run of sealed datagrams reaches a compiled PROD relay's listener as one read
    (UDP GRO, over loopback): each datagram in it is opened, delivered or dropped on its
    own (one forged in the middle, one replayed), in order."""
    ch = Chain(True, True)
    a = _udp()
    try:
        a.sendto(b"first", ch.cons_l.getsockname())
        ch.forward()
        assert ch.app.recvfrom(100)[0] == b"first"
        (cflow,) = ch.cons.flows.values()
        sealer = ch.cons.sealer
        wires = [sealer.seal_state(cflow.state, b"%04d" % i + bytes(996)) for i in range(12)]
        forged = bytearray(wires[5])
        forged[-1] ^= 1
        wires[5] = bytes(forged)
        wires[8] = wires[7]                    # a replay inside the run
        size = len(wires[0])
        cflow.sock.sendmsg([b"".join(wires)], [(socket.SOL_UDP, 103, struct.pack("=H", size))])
        ch.prod._from_source(0, ch.prod_l)
        got = []
        ch.app.settimeout(0.5)
        try:
            while True:
                got.append(ch.app.recvfrom(2000)[0][:4])
        except TimeoutError:
            pass
        assert got == [b"%04d" % i for i in range(12) if i not in (5, 8)]
        c = ch.prod.counters()
        assert (c["drops_forged"], c["drops_replayed"], c["datagrams_in"]) == (1, 1, 11)
    finally:
        a.close()
        ch.close()


@pytest.mark.parametrize("compiled_path", [True, False])
def test_a_plain_relay_over_ipv6(compiled_path):
    """A plain (unsealed) relay on ::1, compiled or Python: datagrams through, replies back to
    their sender (the compiled path's IPv6 sockaddr as key and as reply address)."""
    def udp6() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        s.settimeout(5)
        return s
    try:
        app, lsock, a = udp6(), udp6(), udp6()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    loop = Loop()
    lsock.setblocking(False)
    app_addr = app.getsockname()
    relay = UdpRelay(loop, [(0, lsock)], lambda: [(socket.AF_INET6, app_addr)], sid="t6",
                     buckets={"in": None, "out": None}, compiled=compiled_path)
    try:
        assert (relay.compiled is not None) == compiled_path
        for rnd in range(3):
            sent = [b"%d-%d" % (rnd, i) + bytes(i) for i in range(30)]
            for d in sent:
                a.sendto(d, lsock.getsockname())
            relay._from_source(0, lsock)
            got = []
            for _ in sent:
                d, src = app.recvfrom(2000)
                got.append(d)
                app.sendto(b"re" + d, src)
            assert got == sent
            (flow,) = relay.flows.values()
            relay._from_target(flow)
            assert [a.recv(2000) for _ in sent] == [b"re" + d for d in sent]
        c = relay.counters()
        assert c["datagrams_in"] == c["datagrams_out"] == 90 and c["flows"] == 1
        if compiled_path:
            assert flow.source == a.getsockname() and relay.given_back == 30   # the first batch: a new source
    finally:
        relay.close()
        loop.close()
        app.close()
        a.close()
