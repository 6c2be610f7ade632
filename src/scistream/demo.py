"""``scistream demo``: a whole SciStream session between two facilities on this machine.

It starts a PROD and a CONS control server (``s2cs`` processes, TLS control channel), the
demo producer and consumer with their application controllers (``appctrl`` processes),
runs the exchange of PROTOCOL.md with the client library (req, hello, update on each
side), streams ``size`` bytes over ``num_conn`` connections through both data servers,
verifies every byte, releases both sides and stops everything it started, also on
Ctrl-C and on failure.

With ``testbed`` set (``scistream demo --netns``; this process then runs in the testbed's
user namespace), each program runs where it would on real facilities: each S2CS on its
gateway's namespace, the controllers and applications on the producer and consumer
hosts, and the demo shows that the consumer cannot reach the producer before the
session, which hosts carried each connection, and that nothing listens after release.

    report = asyncio.run(run_demo(DemoOptions(size=1 << 30, num_conn=4)))
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from .addr import parse_listener
from .client import AsyncClient, ChannelOptions
from .data.base import get_backend
from .netns.testbed import Testbed
from .procs import exe, spawn, tail_text, until_done


@dataclasses.dataclass
class DemoOptions:
    size: int = 1 << 30         # total bytes, split over the connections
    num_conn: int = 4
    server_type: str = "Builtin"
    listener_ip: str = "127.0.0.1"
    rate: int = 0
    keep_dir: bool = False
    say: Callable[[str], None] = print
    testbed: Testbed | None = None  # run across the namespaces of this (attached) testbed
    udp: bool = False               # numbered datagrams instead of a TCP stream (appctrl --udp)
    datagram_size: int = 1200


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each program runs (argv prefix) and which addresses each S2CS uses."""
    prod_gw: tuple[str, ...] = ()
    cons_gw: tuple[str, ...] = ()
    producer: tuple[str, ...] = ()
    consumer: tuple[str, ...] = ()
    prod_listener_ip: str = "127.0.0.1"
    cons_listener_ip: str = "127.0.0.1"
    prod_control_ip: str | None = None
    cons_control_ip: str | None = None
    producer_ip: str = "127.0.0.1"


def _layout(opts: DemoOptions) -> _Layout:
    tb = opts.testbed
    if tb is None:
        ip = opts.listener_ip
        return _Layout(prod_listener_ip=ip, cons_listener_ip=ip, producer_ip=ip)
    if not tb.inside(tb.user):
        raise RuntimeError(f"the netns demo must run in the user's namespace {tb.user.ns} "
                           "(scistream demo --netns arranges it)")
    return _Layout(prod_gw=tuple(tb.argv(tb.gw_a)), cons_gw=tuple(tb.argv(tb.gw_b)),
                   producer=tuple(tb.argv(tb.producer)), consumer=tuple(tb.argv(tb.consumer)),
                   prod_listener_ip=tb.gw_a.wan_ip, cons_listener_ip=tb.gw_b.lan_ip,
                   prod_control_ip=tb.gw_a.control_ip, cons_control_ip=tb.gw_b.control_ip,
                   producer_ip=tb.producer.ip)


@dataclasses.dataclass
class DemoReport:
    uid: str
    steps: list[tuple[str, float]]
    bytes_verified: int
    transfer_seconds: float
    streams: int
    server_type: str
    wan_security: str
    udp: dict | None = None     # --udp: the consumer's report (datagrams, lost, reordered, ...)

    @property
    def gbps(self) -> float:
        return self.bytes_verified * 8 / self.transfer_seconds / 1e9 if self.transfer_seconds else 0.0


async def _s2cs(stack: contextlib.AsyncExitStack, work: Path, name: str, opts: DemoOptions,
                where: tuple[str, ...] = (), listener_ip: str | None = None,
                control_ip: str | None = None) -> tuple[str, Path]:
    ready = work / f"{name}.ready"
    listener_ip = listener_ip or opts.listener_ip
    start = random.randrange(10000, 32000 - 64)  # 64 ports below the ephemeral port range
    argv = [*where, exe("s2cs"), "--port", "0", "--listener-ip", listener_ip, "--type", opts.server_type,
            "--port-range", f"{start}-{start + 63}", "--state-dir", str(work / name), "--auth", "none",
            "--drain", "--ready-file", str(ready)] + (["--control-ip", control_ip] if control_ip else [])
    if opts.udp and get_backend(opts.server_type).udp_support == "plain":
        argv.append("--udp-plaintext")      # nginx cannot seal datagrams: the demo's UDP crosses in the clear
    proc = await stack.enter_async_context(spawn(argv, log_path=work / f"{name}.log", grace=15))
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.returncode is not None:
            raise RuntimeError(f"{name} s2cs exited with {proc.returncode}: "
                               + tail_text(work / f"{name}.log", 2000))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} s2cs did not start within 30 s")
        await asyncio.sleep(0.02)
    info = json.loads(ready.read_text())
    return f"{control_ip or listener_ip}:{info['port']}", work / name / "server.crt"


async def run_demo(opts: DemoOptions) -> DemoReport:
    say = opts.say
    work = Path(tempfile.mkdtemp(prefix="scistream-demo-"))
    os.chmod(work, 0o700)
    uid = str(uuid.uuid4())
    steps: list[tuple[str, float]] = []
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps.append((name, now - t))
        say(f"  [{len(steps)}] {name} ({(now - t) * 1000:.0f} ms)")
        t = now

    lay = _layout(opts)
    tb = opts.testbed
    udp_args: list[str] = []
    if opts.udp:
        backend = get_backend(opts.server_type)
        if not backend.udp_support:
            raise RuntimeError(f"the {backend.kind} type carries no UDP; use --type Builtin or Nginx with --udp")
        udp_args = ["--udp", "--datagram-size", str(opts.datagram_size)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            say(f"SciStream demo: {opts.size} bytes over {opts.num_conn} connections, "
                f"data servers of type {opts.server_type}, work dir {work}")
            prod_s2cs, prod_cert = await _s2cs(stack, work, "prod-s2cs", opts, lay.prod_gw,
                                               lay.prod_listener_ip, lay.prod_control_ip)
            cons_s2cs, cons_cert = await _s2cs(stack, work, "cons-s2cs", opts, lay.cons_gw,
                                               lay.cons_listener_ip, lay.cons_control_ip)
            if tb is None:
                step(f"started PROD S2CS on {prod_s2cs} and CONS S2CS on {cons_s2cs} (TLS control channel)")
            else:
                step(f"started PROD S2CS on GW-A (control {prod_s2cs}, data servers on its WAN address "
                     f"{lay.prod_listener_ip}) and CONS S2CS on GW-B (control {cons_s2cs}, data servers on "
                     f"its LAN address {lay.cons_listener_ip}); the user's client runs on {tb.user.label} "
                     f"{tb.user.addr('gwa0')}/{tb.user.addr('gwb0')}")
            prod = await stack.enter_async_context(
                AsyncClient(prod_s2cs, ChannelOptions(server_cert=str(prod_cert))))
            cons = await stack.enter_async_context(
                AsyncClient(cons_s2cs, ChannelOptions(server_cert=str(cons_cert))))

            # 1-2: req(PROD) waits for the producer controller's hello.
            req = asyncio.create_task(prod.req(uid, "PROD", opts.num_conn, opts.rate))
            producer = await stack.enter_async_context(spawn(
                [*lay.producer, exe("appctrl"), "create-appctrl", uid, prod_s2cs, "-", "PROD", lay.producer_ip,
                 "--num-conn", str(opts.num_conn), "--size", str(opts.size),
                 "--connections", str(opts.num_conn), "--server-cert", str(prod_cert), *udp_args],
                log_path=work / "producer.log"))
            prod_resp = await until_done(req, {producer: ("producer controller", work / "producer.log")})
            step(f"req PROD + producer hello: WAN listeners {', '.join(prod_resp.listeners)}")
            if tb is not None:
                r = await _probe(tb, tb.consumer, prod_resp.prod_listeners[0])
                say(f"      before the session: consumer {tb.consumer.ip} -> producer "
                    f"{prod_resp.prod_listeners[0]}: {r}")
                t = time.monotonic()  # the probe is the demo's, not a step of the exchange
            # 3: update(PROD) with the producer's endpoints.
            upd = await prod.update(uid, "PROD", list(prod_resp.prod_listeners), prod_resp.wan_secret)
            step(f"update PROD -> producer endpoints {', '.join(prod_resp.prod_listeners)} "
                 f"(WAN leg: {upd.wan_security})")
            # 4: req(CONS) + the consumer controller's hello.
            report_file = work / "consumer.json"
            creq = asyncio.create_task(cons.req(uid, "CONS", opts.num_conn, opts.rate))
            consumer = await stack.enter_async_context(spawn(
                [*lay.consumer, exe("appctrl"), "create-appctrl", uid, cons_s2cs, "-", "CONS",
                 "--size", str(opts.size), "--server-cert", str(cons_cert), "--report", str(report_file),
                 *udp_args],
                log_path=work / "consumer.log"))
            cons_resp = await until_done(creq, {consumer: ("consumer controller", work / "consumer.log")})
            step(f"req CONS + consumer hello: consumer listeners {', '.join(cons_resp.listeners)}")
            # 5: update(CONS) with the PROD WAN listeners and the session's WAN secret.
            await cons.update(uid, "CONS", list(prod_resp.listeners), prod_resp.wan_secret)
            step("update CONS -> PROD WAN listeners")
            # 6: the consumer streams and verifies.
            watch = None
            if tb is not None and not opts.udp:   # the TCP legs' congestion control, seen with ss
                watch = asyncio.create_task(_leg_congestion(
                    tb, prod_resp.listeners[0], prod_resp.prod_listeners[0], cons_resp.listeners[0]))
            rc = await consumer.wait()
            if rc != 0:
                raise RuntimeError(f"consumer failed (exit {rc}): "
                                   + tail_text(work / "consumer.log", 2000))
            result = json.loads(report_file.read_text())
            await asyncio.wait_for(producer.wait(), 30)
            if opts.udp:
                step(f"transfer: {result['datagrams']} datagrams ({result['bytes']} bytes) verified, "
                     f"{result['lost']} lost, {result['reordered']} out of order")
            else:
                step(f"transfer: {result['bytes']} bytes verified")
            if watch is not None:
                watch.cancel()
                if seen := await watch:
                    say(f"      congestion control of the legs (ss -ti during the transfer): {seen}")
            if tb is not None:
                await _show_paths(tb, prod, cons, uid, cons_resp, prod_resp, upd.wan_security, say)
                t = time.monotonic()
            # 7: release both sides.
            await prod.release(uid)
            await cons.release(uid)
            step("release PROD and CONS")
            if tb is not None:
                r = await _probe(tb, tb.consumer, cons_resp.listeners[0])
                say(f"      after release: consumer {tb.consumer.ip} -> GW-B {cons_resp.listeners[0]}: {r}")
                for gw, target in ((tb.gw_a, prod_s2cs), (tb.gw_b, cons_s2cs)):
                    ports = await asyncio.to_thread(tb.listening_ports, gw)
                    say(f"      {gw.label} listens on (ss -ltn): {', '.join(map(str, sorted(ports)))} "
                        f"(its S2CS control port {target.rpartition(':')[2]})")
        say("  all processes stopped")
        return DemoReport(uid=uid, steps=steps, bytes_verified=result["bytes"],
                          transfer_seconds=result["seconds"], streams=result["streams"],
                          server_type=opts.server_type, wan_security=upd.wan_security,
                          udp=result if opts.udp else None)
    finally:
        if not opts.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


async def _output(argv: list[str], timeout: float, stderr=asyncio.subprocess.DEVNULL) -> str:
    """What ``argv`` prints, within ``timeout`` seconds; the process is killed and reaped on any way out."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


async def _leg_congestion(tb: Testbed, wan: str, producer: str, consumer: str, limit: float = 60.0) -> str:
    """The congestion control each leg's sockets show (``ss -ti`` on each gateway) while the
    transfer runs: polled until every leg has been seen (or ``limit`` s, or cancelled). ``wan``,
    ``producer``, ``consumer``: the PROD WAN listener, the producer's endpoint, the consumer listener."""
    wan_port, producer_port, consumer_port = (parse_listener(x)[1] for x in (wan, producer, consumer))
    legs = {"GW-B LAN": (tb.gw_b, f"( sport = :{consumer_port} )"), "GW-B WAN": (tb.gw_b, f"( dport = :{wan_port} )"),
            "GW-A WAN": (tb.gw_a, f"( sport = :{wan_port} )"), "GW-A LAN": (tb.gw_a, f"( dport = :{producer_port} )")}
    seen: dict[str, str] = {}
    deadline = time.monotonic() + limit
    with contextlib.suppress(asyncio.CancelledError):   # cancelled at the transfer's end: what was seen
        while len(seen) < len(legs) and time.monotonic() < deadline:
            for name, (host, flt) in legs.items():
                if name in seen:
                    continue
                # the congestion control of each established connection ``flt`` selects
                out = await _output(tb.argv(host, "ss", "-tinH", "state", "established", flt), 10)
                got = {line.split()[0] for line in out.splitlines() if line[:1].isspace() and line.strip()}
                if got:
                    seen[name] = "/".join(sorted(got))
            await asyncio.sleep(0.05)
    return ", ".join(f"{k} {seen[k]}" for k in legs if k in seen)


async def _probe(tb: Testbed, host, listener: str) -> str:
    """One connection attempt from ``host`` to ``listener``, described for people."""
    out = await _output(tb.argv(host, sys.executable, "-m", "scistream.netns.peer", "connect", listener,
                                "--timeout", "2"), 30, stderr=asyncio.subprocess.STDOUT)
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"probe failed: {out[-200:]}"
    return "connected" if r["ok"] else f"{r['message']} ({r['error']})"


async def _show_paths(tb: Testbed, prod: AsyncClient, cons: AsyncClient, uid: str, cons_resp, prod_resp,
                      wan: str, say: Callable[[str], None]) -> None:
    """Which hosts talked to which, with each gateway's data-server counters as evidence."""
    eps = list(prod_resp.prod_listeners)
    for i, (c, p) in enumerate(zip(cons_resp.listeners, prod_resp.listeners)):
        say(f"      consumer {tb.consumer.ip} -> GW-B {c} -> [WAN, {wan.upper()}] -> GW-A {p} "
            f"-> producer {eps[i % len(eps)]}")
    for gw, client in ((tb.gw_b, cons), (tb.gw_a, prod)):
        if info := (await client.status(uid)).sessions:
            s = info[0]
            say(f"      {gw.label} data server ({s.server_type}): {s.total_connections} connections, "
                f"{s.bytes_out} bytes towards the consumer, {s.bytes_in} towards the producer")


