"""Small network tools run inside a testbed's namespaces: ``python -m scistream.netns.peer``.

* ``connect HOST:PORT...``: one connection attempt to each (all at once); prints a line
  ``{"listener": .., "ok": .., "error": "ENETUNREACH", "message": ..}`` per target (exit 0
  when every one connected), so a caller can check that a host cannot reach another
  rather than assume it.
* ``echo-server --bind IP --ports N``: N listeners on OS-picked ports; every connection is
  echoed back while the server hashes what it received; writes the endpoints to
  ``--ready`` and, after ``--connections`` connections that carried data (an empty one
  is a probe), the hashes to ``--report``.
* ``echo-client LISTENER...``: one connection per listener, sends ``--size`` random bytes
  with ``--marker`` embedded every 1000 bytes while reading the echo; checks every byte
  came back, then closes (no half-close: not every proxy carries one, and this tool checks
  the path, not that); writes what it sent (sha256) to ``--report``; exit 0 only if all
  matched.
* ``source --bind IP --ports N``: N listeners; every connection gets a known byte pattern
  (``pattern``) at ``--rate`` bit/s (0: as fast as it goes) until the peer closes it or
  the tool is stopped; writes the endpoints to ``--ready``. A producer that sends slowly.
* ``sink LISTENER...``: one connection per listener, each read at ``--rate`` bit/s (0: as
  fast as it comes) for ``--seconds``, every byte checked against the pattern; prints
  ``{"received": [..], "ok": ..}``. A consumer that reads slowly.
* ``ping HOST``: ``--count`` ICMP echo requests, one every ``--interval`` seconds (a raw
  socket: root), each round trip timed by the kernel's receive timestamp; prints one line
  ``{"sent": .., "received": .., "rtt_ms": [..], "lost": [seq, ..]}`` (a reply not back
  ``--wait`` seconds after the last request counts as lost). Needs no ``ping`` installed.

    ip netns exec NS python -m scistream.netns.peer connect 192.0.2.10:5074
    ip netns exec NS python -m scistream.netns.peer echo-client --size 1048576 \
        --marker SCISTREAM-MARKER-1234 --report out.json 203.0.113.1:5100
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

from ..addr import format_listener, parse_listener

log = logging.getLogger(__name__)


async def probe(listener: str, timeout: float = 3.0) -> dict:
    host, port = parse_listener(listener)
    result = {"listener": listener, "ok": False}
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return {**result, "error": "ETIMEDOUT", "message": f"no answer within {timeout} s"}
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return {**result, "error": name, "message": exc.strerror or str(exc)}
    me = format_listener(*w.get_extra_info("sockname")[:2])
    w.close()
    return {**result, "ok": True, "error": "", "message": f"connected from {me}"}


async def _each(one: Callable[..., Awaitable[dict]], listeners: list[str], *args) -> list[dict]:
    """``one(listener, *args)`` for every listener, all at once."""
    return list(await asyncio.gather(*(one(l, *args) for l in listeners)))


def payload(size: int, marker: bytes, seed: bytes) -> bytes:
    """``size`` pseudo-random bytes (from ``seed``) with ``marker`` every 1000 bytes."""
    blocks = range(size // (992 + len(marker)) + 1)  # 992 bytes: 31 times a sha256, then the marker
    return b"".join(hashlib.sha256(seed + i.to_bytes(8, "big")).digest() * 31 + marker for i in blocks)[:size]


async def echo_server(bind: str, ports: int, connections: int, ready: Path, report: Path) -> None:
    results: list[dict] = []
    done = asyncio.Event()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        digest, n = hashlib.sha256(), 0
        local, peer = w.get_extra_info("sockname"), w.get_extra_info("peername")
        try:
            while chunk := await r.read(1 << 16):
                digest.update(chunk)
                n += len(chunk)
                w.write(chunk)
                await w.drain()
            w.write_eof()
            await w.drain()
        except ConnectionError as exc:
            log.warning("echo: %s", exc)
        finally:
            w.close()
            if n:  # a connection that carried nothing is a reachability probe, not a stream
                results.append({"endpoint": format_listener(*local[:2]), "peer": format_listener(*peer[:2]),
                                "bytes": n, "sha256": digest.hexdigest()})
            if len(results) >= connections:
                done.set()

    await _serve_until_done(serve, bind, ports, ready, done)
    report.write_text(json.dumps(results))


async def _serve_until_done(serve: Callable[..., Awaitable[None]], bind: str, ports: int, ready: Path, done: asyncio.Event) -> None:
    """Listen on ``ports`` OS-picked ports of ``bind`` with ``serve``, say the endpoints in
    ``ready`` (written whole), and serve until ``done`` is set or SIGTERM comes."""
    servers = [await asyncio.start_server(serve, bind, 0) for _ in range(ports)]
    endpoints = [format_listener(bind, s.sockets[0].getsockname()[1]) for s in servers]
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"endpoints": endpoints, "pid": os.getpid()}))
    tmp.rename(ready)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    for s in servers:
        s.close()


_BLOCK = bytes((i * 131 + 7) % 256 for i in range(65521))   # a prime length: no alignment with reads
_TWICE = _BLOCK * 2


def pattern(offset: int, n: int) -> bytes:
    """The stream's bytes ``offset`` to ``offset + n`` (n <= 65521)."""
    at = offset % len(_BLOCK)
    return _TWICE[at:at + n]


async def _paced(rate_bps: float, start: float, done_bytes: int) -> None:
    """Sleep until ``done_bytes`` are due at ``rate_bps`` since ``start`` (0: never)."""
    if rate_bps > 0:
        due = start + done_bytes * 8 / rate_bps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def source(bind: str, ports: int, rate_bps: float, ready: Path) -> None:
    stop = asyncio.Event()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sent, start = 0, time.monotonic()
        chunk = 16384 if rate_bps else 65521
        with contextlib.closing(w), contextlib.suppress(OSError):  # OSError: the peer went away
            while not stop.is_set():
                w.write(pattern(sent, chunk))
                sent += chunk
                await w.drain()
                await _paced(rate_bps, start, sent)

    await _serve_until_done(serve, bind, ports, ready, stop)


async def _sink_one(listener: str, rate_bps: float, seconds: float) -> dict:
    r, w = await asyncio.wait_for(asyncio.open_connection(*parse_listener(listener)), 10)
    got, ok, start = 0, True, time.monotonic()
    size = 4096 if rate_bps else 65521
    with contextlib.closing(w), contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while chunk := await r.read(size):
                ok = ok and chunk == pattern(got, len(chunk))
                got += len(chunk)
                await _paced(rate_bps, start, got)
    return {"listener": listener, "received": got, "ok": ok and got > 0,
            "bps": round(got * 8 / max(1e-3, time.monotonic() - start))}


async def _echo_one(listener: str, size: int, marker: bytes, timeout: float) -> dict:
    data = payload(size, marker, listener.encode())
    r, w = await asyncio.wait_for(asyncio.open_connection(*parse_listener(listener)), timeout)

    async def send() -> None:
        for i in range(0, len(data), 1 << 16):
            w.write(data[i:i + (1 << 16)])
            await w.drain()

    sender = asyncio.create_task(send())
    try:
        got = await asyncio.wait_for(r.readexactly(len(data)), timeout)
        await sender
    except asyncio.IncompleteReadError as exc:
        got = exc.partial
    finally:
        sender.cancel()
        w.close()
    return {"listener": listener, "sent": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "received": len(got), "echo_ok": got == data}


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; not named by every Python


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{(len(data) + 1) // 2}H", data + b"\0" * (len(data) % 2)))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host: str, count: int, interval: float, wait: float, size: int = 56) -> dict:
    """ICMP echo round trips to ``host``: {"sent", "received", "rtt_ms" (by sequence order), "lost"}."""
    ident = os.getpid() & 0xFFFF
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    sent: dict[int, int] = {}   # seq -> send time (ns, CLOCK_REALTIME like the kernel's stamp)
    rtt: dict[int, float] = {}
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        seq = 0
        while True:
            now = time.monotonic()
            if seq < count and now >= start + seq * interval:
                csum = _checksum(struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF) + body)
                packet = struct.pack("!BBHHH", 8, 0, csum, ident, seq & 0xFFFF) + body
                sent[seq] = time.time_ns()
                sock.sendto(packet, (host, 0))
                seq += 1
                continue
            until = start + seq * interval if seq < count else start + (count - 1) * interval + wait
            if seq >= count and (now >= until or len(rtt) == count):
                break
            if not select.select([sock], [], [], max(0.0, until - now))[0]:
                continue
            data, anc, _, _ = sock.recvmsg(65536, 1024)
            stamp = next((struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                          if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
            got = stamp[0] * 1_000_000_000 + stamp[1] if stamp else time.time_ns()
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident and rseq in sent and rseq not in rtt:
                rtt[rseq] = (got - sent[rseq]) / 1e6
    return {"sent": count, "received": len(rtt), "rtt_ms": [rtt[i] for i in sorted(rtt)],
            "lost": [i for i in range(count) if i not in rtt]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scistream.netns.peer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    clients = argparse.ArgumentParser(add_help=False)  # the options of the tools that connect ...
    clients.add_argument("listeners", nargs="+")
    servers = argparse.ArgumentParser(add_help=False)  # ... and of those that listen
    servers.add_argument("--bind", required=True)
    servers.add_argument("--ports", type=int, default=1)
    servers.add_argument("--ready", type=Path, required=True)
    c = sub.add_parser("connect", parents=[clients])
    c.add_argument("--timeout", type=float, default=3.0)
    s = sub.add_parser("echo-server", parents=[servers])
    s.add_argument("--connections", type=int, default=1)
    s.add_argument("--report", type=Path, required=True)
    e = sub.add_parser("echo-client", parents=[clients])
    e.add_argument("--size", type=int, default=1 << 20)
    e.add_argument("--marker", default="SCISTREAM-MARKER")
    e.add_argument("--timeout", type=float, default=30.0)
    e.add_argument("--report", type=Path, required=True)
    so = sub.add_parser("source", parents=[servers])
    so.add_argument("--rate", type=float, default=0.0, help="bit/s per connection; 0: as fast as it goes")
    si = sub.add_parser("sink", parents=[clients])
    si.add_argument("--rate", type=float, default=0.0, help="bit/s per connection; 0: as fast as it comes")
    si.add_argument("--seconds", type=float, default=10.0)
    p = sub.add_parser("ping")
    p.add_argument("host")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--wait", type=float, default=2.0)
    p.add_argument("--size", type=int, default=56)
    a = ap.parse_args(argv)
    ok = True
    if a.cmd == "ping":
        print(json.dumps(ping(a.host, a.count, a.interval, a.wait, a.size)))
    elif a.cmd == "source":
        asyncio.run(source(a.bind, a.ports, a.rate, a.ready))
    elif a.cmd == "echo-server":
        asyncio.run(echo_server(a.bind, a.ports, a.connections, a.ready, a.report))
    elif a.cmd == "connect":
        results = asyncio.run(_each(probe, a.listeners, a.timeout))
        print("\n".join(map(json.dumps, results)))
        ok = all(r["ok"] for r in results)
    elif a.cmd == "sink":
        results = asyncio.run(_each(_sink_one, a.listeners, a.rate, a.seconds))
        ok = all(r["ok"] for r in results)
        print(json.dumps({"received": results, "ok": ok}))
    else:
        results = asyncio.run(_each(_echo_one, a.listeners, a.size, a.marker.encode(), a.timeout))
        a.report.write_text(json.dumps(results))
        ok = all(r["echo_ok"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
