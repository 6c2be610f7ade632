"""``rate_kbps`` caps each direction of a whole session (all its connections together).

Bytes are counted where they arrive, over a window of several seconds after a warm-up;
the bounds are generous on the low side (a busy machine is slower, never faster)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from builtin_support import Pattern, PatternApp, data_servers, entry

RATE_KBPS = 16_000                    # 2 MB/s
RATE = RATE_KBPS * 1000 / 8
RUN = 4.0                             # seconds of transfer
WARMUP = 1.0


def window(samples: list[tuple[float, int]], start: float) -> tuple[float, int]:
    """(seconds, bytes) from the first sample after ``start`` to the last one."""
    inside = [s for s in samples if s[0] >= start]
    assert len(inside) >= 2, "too few samples"
    return inside[-1][0] - inside[0][0], inside[-1][1] - inside[0][1]


def merged(sample_lists: list[list[tuple[float, int]]]) -> list[tuple[float, int]]:
    """Per-connection cumulative samples -> one cumulative series of the session."""
    events = []
    for samples in sample_lists:
        last = 0
        for t, total in samples:
            events.append((t, total - last))
            last = total
    events.sort()
    out, acc = [], 0
    for t, n in events:
        acc += n
        out.append((t, acc))
    return out


def shaped_clients(host: str, port: int, pattern: Pattern, conns: int, upload: bool) -> tuple[list, float]:
    """``conns`` clients that read (and, with ``upload``, send) as fast as they can for RUN s."""
    socks = [socket.create_connection((host, port), 10) for _ in range(conns)]
    samples: list[list[tuple[float, int]]] = [[] for _ in socks]
    results: list[tuple[int, bool]] = [(0, False)] * conns
    threads = []

    def reader(i: int) -> None:
        results[i] = pattern.recv_check(socks[i], samples=samples[i], quiet=True)

    def writer(i: int) -> None:
        try:
            pattern.send(socks[i], 1 << 30)
        except OSError:
            pass
    start = time.monotonic()
    for i in range(conns):
        threads.append(threading.Thread(target=reader, args=(i,)))
        if upload:
            threads.append(threading.Thread(target=writer, args=(i,)))
    for t in threads:
        t.start()
    stop = threading.Event()
    stop.wait(RUN)
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in threads:
        t.join(30)
    for s in socks:
        s.close()
    assert all(ok for _, ok in results), "bytes arrived altered"
    return samples, start


def check_rate(samples: list[tuple[float, int]], start: float, what: str) -> None:
    secs, got = window(samples, start + WARMUP)
    assert secs > 2.0, f"{what}: window too short ({secs:.2f} s)"
    allowed = RATE * secs * 1.10 + 0.05 * RATE      # +10%, plus the bucket's burst
    assert got <= allowed, f"{what}: {got} bytes in {secs:.2f} s is over the cap ({allowed:.0f})"
    assert got >= RATE * secs * 0.5, f"{what}: {got} bytes in {secs:.2f} s is far under the cap"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_rate_caps_each_direction_of_the_session(tmp_path, tls):
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=1 << 30)
    try:
        async with data_servers(tmp_path) as ds:
            prod, cons = await ds.chain(app.target, tls=tls, rate_kbps=RATE_KBPS)
            down, start = await asyncio.to_thread(shaped_clients, *entry(cons), pattern, 3, True)
            check_rate(merged(down), start, "producer -> consumer, 3 connections")
            app.close()
            check_rate(merged([r.samples for r in app.results]), start, "consumer -> producer, 3 connections")
            stats = await cons.stats()
            assert stats.bytes_out >= sum(s[-1][1] for s in down if s)
    finally:
        app.close()
