"""Plain connections carried in C (``_pump.Hub``, ``Loop(carry=True)``, the node service's
workers): their events are handled without the interpreter while bytes flow, their end
comes back to Python, and nothing is lost on the way. Real sockets, a real worker
process, every byte checked."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from scistream.data.engine.loop import EPOLLIN, EV_ALL, Loop
from scistream.data.engine.compiled import module as _pump

from builtin_support import LoneWorker
from conftest import async_wait_until, wait_until

pytestmark = pytest.mark.compiled

MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(b"%d" % seed).digest() * 2048        # 64 KiB
    return (block * (size // len(block) + 1))[:size]


# -- the hub on its own ------------------------------------------------------------

@contextlib.contextmanager
def carried_pair(spin: float = 0.0):
    """Two socket pairs joined by a Hub connection (x1 <-> [a | b] <-> y1), in a thread
    that waits on the hub and records what comes back to Python; yields (hub, x1, y1,
    events back to Python, the epoll). Stopped and closed on exit."""
    x0, x1 = socket.socketpair()
    y0, y1 = socket.socketpair()
    ep = select.epoll()
    stop_r, stop_w = os.pipe()
    for s in (x0, y0):
        s.setblocking(False)
        ep.register(s.fileno(), EV_ALL)
    ep.register(stop_r, EPOLLIN)
    hub = _pump.Hub(ep.fileno(), spin)
    hub.attach(x0.fileno(), y0.fileno(), _pump.Copier(), _pump.Copier(), True, True, True, True)
    back: list[tuple[int, int]] = []
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            for fd, ev in hub.wait(-1):
                if fd == stop_r:
                    done.set()
                else:
                    back.append((fd, ev))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield hub, x1, y1, back, (x0, y0)
    finally:
        os.write(stop_w, b"x")
        t.join(10)
        assert not t.is_alive()
        for s in (x0, x1, y0, y1):
            s.close()
        ep.close()
        os.close(stop_r)
        os.close(stop_w)


def exchange(a: socket.socket, b: socket.socket, data: bytes) -> bytes:
    """Send data into a, read as much from b (a thread sends while this reads)."""
    sender = threading.Thread(target=a.sendall, args=(data,), daemon=True)
    sender.start()
    got = bytearray()
    b.settimeout(20)
    while len(got) < len(data):
        chunk = b.recv(1 << 20)
        assert chunk, "EOF before all the bytes"
        got += chunk
    sender.join(20)
    return bytes(got)


def test_the_hub_moves_both_ways_and_counts_without_python():
    """Bytes pass both ways through a carried connection, every one checked, and no event
    comes back to Python while they flow; ``take`` counts them once."""
    with carried_pair() as (hub, x1, y1, back, (x0, _y0)):
        fwd, rev = pattern(8 * MiB, 1), pattern(3 * MiB, 2)
        assert exchange(x1, y1, fwd) == fwd
        assert exchange(y1, x1, rev) == rev
        assert back == []
        assert hub.carried > 0 and hub.attached == 1
        assert hub.take(x0.fileno()) == (len(fwd), len(rev))
        assert hub.take(x0.fileno()) == (0, 0)


def test_the_end_of_a_carried_connection_comes_back_to_python():
    """A half-close is not handled in C: the event that shows it comes back untouched (the
    peer's RDHUP on x0, or, if the hub was still busy with y0's last EPOLLOUT when the FIN
    came, that event, during which x0's recv met the EOF), the bytes before it were all
    delivered, and ``detach`` hands over the counts and what the hub knew of the sockets."""
    with carried_pair() as (hub, x1, y1, back, (x0, y0)):
        data = pattern(2 * MiB, 3)
        assert exchange(x1, y1, data) == data
        x1.shutdown(socket.SHUT_WR)
        wait_until(lambda: back, 10, "the end to come back to Python")
        assert back and back[0][0] in (x0.fileno(), y0.fileno()), back
        if back[0][0] == x0.fileno():
            assert back[0][1] & (select.EPOLLRDHUP | select.EPOLLHUP), back
        n_in, n_out, ra, wa, rb, wb, err = hub.detach(x0.fileno())
        assert (n_in, n_out, err) == (len(data), 0, 0)
        assert wb      # y0 took everything
        assert hub.attached == 0
        assert x0.recv(10) == b""      # the EOF is still there for Python to read
        with pytest.raises(KeyError):
            hub.detach(x0.fileno())
        y1.sendall(b"after")           # y0 is no longer carried: its event comes back
        wait_until(lambda: any(fd == y0.fileno() for fd, _ in back), 10, "y0's event to come back")
        assert any(fd == y0.fileno() for fd, _ in back)


def test_attach_refuses_what_it_cannot_carry():
    a, b = socket.socketpair()
    ep = select.epoll()
    try:
        hub = _pump.Hub(ep.fileno())
        with pytest.raises(ValueError):
            hub.attach(a.fileno(), a.fileno(), _pump.Copier(), _pump.Copier(), True, True, True, True)
        with pytest.raises(TypeError):
            hub.attach(a.fileno(), b.fileno(), object(), _pump.Copier(), True, True, True, True)
        hub.attach(a.fileno(), b.fileno(), _pump.Copier(), _pump.Copier(), True, True, True, True)
        with pytest.raises(ValueError):
            hub.attach(b.fileno(), a.fileno(), _pump.Copier(), _pump.Copier(), True, True, True, True)
        with pytest.raises(KeyError):
            hub.take(b.fileno())        # known by its first descriptor only
        assert hub.detach(a.fileno())[:2] == (0, 0)
    finally:
        ep.close()
        a.close()
        b.close()


def test_a_timeout_ends_the_wait_while_a_connection_is_busy():
    """The hub keeps handling a busy carried connection inside one wait, but the wait
    still ends at its timeout (the loop's next timer)."""
    x0, x1 = socket.socketpair()
    y0, y1 = socket.socketpair()
    ep = select.epoll()
    for s in (x0, y0, x1, y1):
        s.setblocking(False)
    for s in (x0, y0):
        ep.register(s.fileno(), EV_ALL)
    hub = _pump.Hub(ep.fileno(), 50e-6)
    hub.attach(x0.fileno(), y0.fileno(), _pump.Copier(), _pump.Copier(), True, True, True, True)
    stop = threading.Event()
    moved = [0]

    def feed() -> None:       # keep the connection busy: write into x1, drain y1
        chunk = b"z" * 65536
        while not stop.is_set():
            with contextlib.suppress(BlockingIOError):
                x1.send(chunk)
            with contextlib.suppress(BlockingIOError):
                moved[0] += len(y1.recv(1 << 20))

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        for timeout in (0.05, 0.2):
            t0 = time.monotonic()
            assert hub.wait(timeout) == []
            took = time.monotonic() - t0
            assert timeout <= took < timeout + 2.0, took
        assert moved[0] > 0 and hub.carried > 0
    finally:
        stop.set()
        t.join(10)
        hub.detach(x0.fileno())
        ep.close()
        for s in (x0, x1, y0, y1):
            s.close()


def test_a_carried_wait_spins_and_stops_when_the_core_is_wanted():
    """The hub's spin: on a loop of quick echoes it meets events; with another busy process
    on the same core (both pinned to it), a yield runs that process and the spin gives way."""
    with carried_pair(spin=10.0) as (hub, x1, y1, back, _):
        x1.settimeout(20)
        y1.settimeout(20)
        for i in range(200):
            x1.sendall(b"m%d" % i)
            assert y1.recv(100) == b"m%d" % i
        assert hub.spin_hits > 0
        assert back == []
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        gave = 0
        with carried_pair(spin=10.0) as (hub, x1, y1, back, _):
            x1.settimeout(20)
            y1.settimeout(20)
            # every thread of this process (the hub's among them) on the busy process's core
            for tid in os.listdir(f"/proc/{os.getpid()}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})
            for i in range(30):
                x1.sendall(b"w%d" % i)
                assert y1.recv(100) == b"w%d" % i
                time.sleep(0.01)      # between messages the hub's wait spins, or gives way
            gave = hub.spin_gave_way
        assert gave > 0
    finally:
        busy.kill()
        busy.wait()
        for tid in os.listdir(f"/proc/{os.getpid()}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), allowed)


# -- in the loop and the relay -------------------------------------------------------

def test_a_loop_that_carries_still_runs_its_timers_and_handlers():
    """Loop(carry=True): events of descriptors the hub does not carry reach their
    handlers, and timers fire."""
    loop = Loop(spin=50e-6, carry=True)
    assert loop.hub is not None
    r, w = os.pipe()
    got: list[bytes] = []
    fired = threading.Event()
    loop.add(r, EPOLLIN, lambda ev: got.append(os.read(r, 100)))
    loop.call_later(0.02, fired.set)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        os.write(w, b"hello")
        assert fired.wait(10)
        wait_until(lambda: got, 10, "the pipe's handler to run")
        assert got == [b"hello"]
    finally:
        loop.stop()
        t.join(10)
        loop.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("pumps", ["c", "python", "carry-off"])
async def test_a_worker_carries_its_plain_connections_in_c(echo_server, pumps):
    """A node worker on its own, one plain connection to an echo server: 24 MiB there and
    back, every byte checked; while it is open the worker's ping says it is carried in C
    (not with SCISTREAM_PUMPS=python, nor with SCISTREAM_CARRY=0), the session's counters
    are exact, and after the client's half-close the rest comes back, then EOF, and
    nothing stays attached."""
    env = {k: v for k, v in os.environ.items() if k not in ("SCISTREAM_PUMPS", "SCISTREAM_CARRY")}
    if pumps == "python":
        env["SCISTREAM_PUMPS"] = "python"
    elif pumps == "carry-off":
        env["SCISTREAM_CARRY"] = "0"
    worker = LoneWorker(env)
    try:
        r, w = await worker.stream("s1", echo_server)
        data = pattern(24 * MiB, 7)

        async def send() -> None:
            for i in range(0, len(data), 1 << 20):
                w.write(data[i:i + (1 << 20)])
                await w.drain()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(r.readexactly(len(data) // 2), 30)
        ping = await worker.call({"op": "ping"})
        if pumps == "c":
            assert ping["carried"]["connections"] == 1, ping
            assert ping["carried"]["events"] > 0, ping
        else:
            assert ping["carried"] == {"connections": 0, "events": None}, ping
        got += await asyncio.wait_for(r.readexactly(len(data) - len(got)), 30)
        await sender
        assert got == data
        stats = (await worker.call({"op": "stats", "sids": ["s1"]}))["stats"]["s1"]
        assert (stats["bytes_in"], stats["bytes_out"]) == (len(data), len(data)), stats
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 30) == b""      # EOF passed on, both ways
        w.close()

        async def gone():
            p = await worker.call({"op": "ping"})
            return p["connections"] == 0 and p["carried"]["connections"] == 0
        await async_wait_until(gone, timeout=20, what="the connection to close in the worker")
        stats = (await worker.call({"op": "stats", "sids": ["s1"]}))["stats"]["s1"]
        assert (stats["bytes_in"], stats["bytes_out"], stats["failed_connections"]) == (len(data), len(data), 0)
    finally:
        worker.close()


async def test_a_reset_of_a_carried_connection_resets_the_other_side():
    """The target resets a carried connection in the middle of a stream: the worker takes
    it back, counts it failed, and the client sees a reset (not a clean EOF)."""
    accepted_there: list[socket.socket] = []
    ready = asyncio.Event()

    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(4 * MiB)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted_there.append(sock)
        ready.set()
        w.transport.abort()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    worker = LoneWorker()
    try:
        r, w = await worker.stream("s1", server.sockets[0].getsockname()[:2])
        with pytest.raises((ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
            for _ in range(64):
                w.write(pattern(1 * MiB, 9))
                await asyncio.wait_for(w.drain(), 30)
            await asyncio.wait_for(r.readexactly(1), 30)
        assert ready.is_set()

        async def failed():
            p = await worker.call({"op": "ping"})
            s = (await worker.call({"op": "stats", "sids": ["s1"]}))["stats"]["s1"]
            return p["carried"]["connections"] == 0 and s["connections"] == 0 and s["failed_connections"] == 1
        await async_wait_until(failed, timeout=20, what="the worker to drop the reset connection")
        w.close()
    finally:
        worker.close()
        server.close()
        await server.wait_closed()


async def test_a_churn_of_carried_connections_leaves_nothing_behind(echo_server):
    """300 plain connections through one worker, 24 at a time, of every size from nothing
    to 512 KiB, echoed and checked, half-closed by the client; every 10th reset by the
    client in the middle of its stream instead. Afterwards the worker holds no connection,
    carries none, has as many descriptors open as before, and counted every byte of the
    echoed ones."""
    worker = LoneWorker()
    try:
        await worker.add_plain("s1", echo_server)
        fds = f"/proc/{worker.proc.pid}/fd"
        before = len(os.listdir(fds))

        async def one(i: int) -> int:
            r, w = await worker.client("s1")
            data = pattern((i * 7919) % (512 * 1024 + 1), i)
            if i % 10 == 9:                            # reset in the middle of the stream
                w.write(data[: len(data) // 2] or b"x")
                await w.drain()
                await asyncio.wait_for(r.readexactly(1), 20)
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
                return 0
            w.write(data)
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 30)
            assert got == data, (i, len(got), len(data))
            w.close()
            return len(data)

        sem = asyncio.Semaphore(24)

        async def limited(i: int) -> int:
            async with sem:
                return await one(i)

        echoed = sum(await asyncio.gather(*(limited(i) for i in range(300))))

        async def settled():
            p = await worker.call({"op": "ping"})
            return (p["connections"] == 0 and p["carried"]["connections"] == 0
                    and len(os.listdir(fds)) == before)
        await async_wait_until(settled, timeout=30, what="the worker to close every connection")
        stats = (await worker.call({"op": "stats", "sids": ["s1"]}))["stats"]["s1"]
        assert stats["total_connections"] == 300, stats
        assert stats["failed_connections"] == 30, stats        # the resets, and only they
        assert stats["bytes_in"] >= echoed and stats["bytes_out"] >= echoed, (stats, echoed)
        assert (await worker.call({"op": "ping"}))["carried"]["events"] > 0
    finally:
        worker.close()
