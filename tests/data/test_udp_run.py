"""engine.udp.Run: the datagrams of one readiness event leave in runs of one size to one
destination, with UDP GSO (one system call, cut by the kernel) or one by one, each
arriving whole and in order, counted once."""
from __future__ import annotations

import os
import socket
import types

import pytest

from scistream.data.engine.udp import Run, zero_counters


@pytest.mark.parametrize("gso", [True, False])
def test_runs_arrive_whole_in_order_and_counted(gso):
    relay = types.SimpleNamespace(c=zero_counters(), gso=gso, sid="t")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx2:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        tx.connect(rx.getsockname())
        sizes = [1000] * 70 + [500] + [2000] * 3 + [8000] * 9 + [100]
        sent = [os.urandom(n) for n in sizes]
        run = Run(relay, "in")
        for i, d in enumerate(sent):
            if i == 72:     # one to the same place by another socket (unconnected, with an address)
                run.add(tx2, rx.getsockname(), d, len(d) - 10)
            else:
                run.add(tx, None, d, len(d) - 10)
        run.flush()
        got = [rx.recv(65536) for _ in sent]
        assert got == sent
        assert relay.c["datagrams_in"] == len(sent) and relay.c["bytes_in"] == sum(sizes) - 10 * len(sizes)
        assert relay.c["drops_send"] == 0 and relay.gso == gso
