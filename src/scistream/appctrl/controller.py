"""What ``appctrl create-appctrl`` does, as coroutines the demo reuses.

PROD: start the producer (the bundled demo producer, an iperf3 server, or nothing when
the endpoints are given), then send the hello with its endpoints, then keep the producer
running until it has served its connections (iperf3: completed tests), or forever.

CONS: send the hello; its answer carries the CONS S2DS's listeners; then run the consumer
against them (the demo consumer, which verifies every byte, or an iperf3 client, tried
again while its test has not started: ``appctrl.iperf3``).

    await run_prod(client, uid, "127.0.0.1", app="demo", num_conn=4, size=1 << 30)
    report = await run_cons(client, uid, app="demo", size=1 << 30)

``size`` is the bytes of the whole transfer, over all connections (as every ``--size``):
each of the producer's ``num_conn`` endpoints serves ``size // num_conn`` bytes to each
connection, and the consumer expects ``size // len(listeners)`` on each of its listeners;
with as many listeners as producer endpoints, the consumer verifies ``size`` bytes (less
the remainder of that division).
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable, Sequence

from ..addr import parse_listener
from ..apps import demo, udpdemo
from ..client import AsyncClient
from ..client.order import hello_after_req
from ..errors import InvalidArgument
from . import iperf3

MOCK_ENDPOINTS = ["127.0.0.1:5074", "127.0.0.1:5075", "127.0.0.1:5076", "127.0.0.1:37000", "127.0.0.1:47000"]


@dataclasses.dataclass(frozen=True)
class UdpDemo:
    """The demo apps over UDP (``--udp``): datagrams of ``size`` bytes, each flow paced at
    ``rate_mbps`` (apps.udpdemo)."""
    size: int = 1200
    rate_mbps: float = 50.0

    def count(self, total: int, flows: int) -> int:
        return max(1, total // max(1, flows) // self.size)


async def run_prod(client: AsyncClient, uid: str, ip: str, *, app: str = "demo", num_conn: int = 1,
                   size: int = 1 << 30, endpoints: Sequence[str] = (), connections: int | None = None,
                   say: Callable[[str], None] = print, udp: UdpDemo | None = None) -> None:
    if app == "none":
        if not endpoints:
            raise InvalidArgument("--app none needs the producer's endpoints (--endpoint HOST:PORT)")
        for e in endpoints:
            parse_listener(e)
        await hello_after_req(client, uid, "PROD", list(endpoints))
        say(f"hello sent for {uid}; producer endpoints: {', '.join(endpoints)}")
        return
    if app == "demo" and udp is not None:
        # datagrams to each flow a consumer opens, on ports where the TCP demo producer
        # listens too (a session's port carries both to the same target)
        tcp = demo.Producer(size // num_conn)
        producer = udpdemo.UdpProducer(udp.count(size, num_conn), udp.size, udp.rate_mbps, connections)
        try:
            eps = await tcp.start(ip, [0] * num_conn)
            await producer.start(ip, [parse_listener(e)[1] for e in eps])
            resp = await hello_after_req(client, uid, "PROD", eps)
            say(f"hello sent for {uid}: {resp.message}; producer endpoints (TCP and UDP): {', '.join(eps)}")
            await producer.done.wait()       # never set without --connections: serve until interrupted
            say(f"producer sent {producer.count} datagrams of {udp.size} bytes to each of "
                f"{connections} flow(s)")
        finally:
            await producer.close()
            await tcp.close()
        return
    if app == "demo":
        per_conn = size // num_conn
        producer = demo.Producer(per_conn, connections)
        try:
            eps = await producer.start(ip, [0] * num_conn)
            resp = await hello_after_req(client, uid, "PROD", eps)
            say(f"hello sent for {uid}: {resp.message}; producer endpoints: {', '.join(eps)}")
            if connections is None:
                await asyncio.Event().wait()  # serve until interrupted
            await producer.done.wait()
            say(f"producer served {connections} connection(s) of {per_conn} bytes")
        finally:
            await producer.close()
        return
    if app == "iperf3":
        async with iperf3.server(ip) as (ep, serve):
            await hello_after_req(client, uid, "PROD", [ep])
            say(f"hello sent for {uid}; iperf3 server on {ep}")
            await serve(connections, say)
        return
    raise InvalidArgument(f"unknown --app {app!r}; choose demo, iperf3 or none")


async def run_cons(client: AsyncClient, uid: str, *, app: str = "demo", size: int = 1 << 30,
                   connect_timeout: float = 120.0, iperf_args: Sequence[str] = (),
                   say: Callable[[str], None] = print,
                   udp: UdpDemo | None = None) -> demo.ConsumeReport | udpdemo.UdpReport | iperf3.Iperf3Report | None:
    resp = await hello_after_req(client, uid, "CONS")
    listeners = list(resp.listeners)
    say(f"hello sent for {uid}; consumer listeners: {listeners}")
    if app == "none":
        return None
    if app == "demo" and udp is not None:
        r = await udpdemo.udp_consume(listeners, udp.count(size, len(listeners)), udp.size,
                                      connect_timeout=connect_timeout)
        say(f"consumer verified {r.received} datagrams ({r.bytes} bytes) over {len(listeners)} flow(s) "
            f"in {r.seconds:.2f} s: {r.lost} lost ({r.loss:.3%}), {r.reordered} out of order")
        return r
    if app == "demo":
        report = await demo.consume(listeners, size // max(1, len(listeners)), connect_timeout=connect_timeout)
        say(f"consumer verified {report.bytes} bytes over {len(listeners)} connection(s) "
            f"in {report.seconds:.2f} s ({report.gbps:.2f} Gbit/s)")
        return report
    if app == "iperf3":
        r = await iperf3.client(listeners[0], timeout=connect_timeout, args=iperf_args)
        say(f"iperf3: {r.bytes} bytes received ({r.sent} sent) over {r.streams} stream(s) in {r.seconds:.2f} s "
            f"({r.gbps:.2f} Gbit/s)" + (f"; the test started at attempt {r.attempts}" if r.attempts > 1 else ""))
        return r
    raise InvalidArgument(f"unknown --app {app!r}; choose demo, iperf3 or none")
