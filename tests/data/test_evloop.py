"""The data plane's event loop on its own: the spin before a sleep (``Loop(spin=...)``, the
node service's workers use ``SCISTREAM_SPIN_US``), its bounds, and that it loses no event
and delays no timer. A real loop in a thread, real sockets."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import pytest

from scistream.data.engine import loop as evloop
from scistream.data.engine.loop import EPOLLIN, Loop



@contextlib.contextmanager
def echo_loop(spin: float):
    """A loop in a thread that echoes what arrives on one end of a socket pair; yields
    (loop, the other end). Stopped and closed on exit."""
    here, there = socket.socketpair()
    there.setblocking(False)
    loop = Loop(spin=spin)

    def on_event(_ev: int) -> None:
        while True:
            try:
                data = there.recv(65536)
            except BlockingIOError:
                return
            if not data:
                loop.remove(there.fileno())
                return
            there.sendall(data)

    loop.add(there.fileno(), EPOLLIN | evloop.select.EPOLLET, on_event)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        here.settimeout(30)
        yield loop, here
    finally:
        loop.stop()
        t.join(30)
        assert not t.is_alive()
        loop.close()
        here.close()
        there.close()


def ping(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the loop closed the connection"
        got += chunk
    assert got == payload


def test_a_busy_loop_spins_and_meets_its_events():
    """Messages one right after another: the loop's waits end within the spin, so it
    spins, and the spins meet the next message (every echo checked)."""
    with echo_loop(spin=0.5) as (loop, sock):
        for i in range(300):
            ping(sock, b"%06d" % i * 100)
        assert loop.spin_hits > 0, (loop.spin_hits, loop.spin_missed, loop.spin_gave_way)


def test_a_loop_whose_events_come_seldom_stops_spinning():
    """Waits longer than the spin: after at most SPIN_SCORE spins that run out, the loop
    sleeps at once on every wait (no more spins, hits or misses)."""
    with echo_loop(spin=0.001) as (loop, sock):
        for i in range(50):              # waits far shorter than the spin: it spins
            ping(sock, b"x%d" % i)
        spins = loop.spin_hits + loop.spin_missed + loop.spin_gave_way
        assert spins > 0
        missed_before = loop.spin_missed
        for i in range(12):              # the workload: one message every 50 ms
            time.sleep(0.05)
            ping(sock, b"y%d" % i)
        missed = loop.spin_missed
        assert missed - missed_before <= evloop.SPIN_SCORE + 1, (missed_before, missed)
        hits_then = loop.spin_hits
        for i in range(6):
            time.sleep(0.05)
            ping(sock, b"z%d" % i)
        assert (loop.spin_hits, loop.spin_missed) == (hits_then, missed), "it spun on long waits"


def test_a_spin_stops_when_the_core_is_wanted(monkeypatch):
    """A yield that lets another task run (here: takes 2 ms) ends the spin at once, and the
    loop sleeps instead; events still arrive, every echo checked."""
    with echo_loop(spin=10.0) as (loop, sock):
        for i in range(20):
            ping(sock, b"a%d" % i)
        monkeypatch.setattr(evloop.os, "sched_yield", lambda: time.sleep(0.002))
        for i in range(20):
            ping(sock, b"b%d" % i)
            time.sleep(0.02)     # the loop waits 20 ms each time: it spins, then yields
        assert loop.spin_gave_way > 0
        # a spin of 10 s with no give-way would have held each wait for 10 s or until the
        # message: the messages were echoed, and nothing ran out
        assert loop.spin_missed == 0


def test_a_timer_fires_in_the_middle_of_a_spin(monkeypatch):
    """A spin of 10 s never delays a timer due sooner: the spin ends at the timer (here
    without the give-way, which a busy machine may trigger, so that only the timer can end
    the spin)."""
    monkeypatch.setattr(evloop, "SPIN_GIVE_WAY", 60.0)
    with echo_loop(spin=10.0) as (loop, sock):
        for i in range(20):
            ping(sock, b"t%d" % i)     # now spinning on every wait
        fired = threading.Event()
        t0 = time.monotonic()
        loop.call_later(0.01, fired.set)
        loop.wake()                    # make the loop take the timer into its next wait
        assert fired.wait(5), "the timer did not fire during a 10 s spin"
        assert time.monotonic() - t0 < 5


def test_no_spin_by_default_and_for_a_spin_of_zero():
    with echo_loop(spin=0.0) as (loop, sock):
        for i in range(100):
            ping(sock, b"n%d" % i)
        assert (loop.spin_hits, loop.spin_missed, loop.spin_gave_way) == (0, 0, 0)
    assert Loop().spin == 0.0


@pytest.mark.parametrize("text, want", [(None, 50), ("", 50), ("0", 0), ("250", 250), (" 40 ", 40),
                                        ("fast", 50), ("-5", 50), ("1.5", 50)])
def test_spin_setting(text, want, caplog):
    with caplog.at_level(logging.WARNING, logger="scistream.data.engine.loop"):
        assert evloop._spin_us(text) == want
    bad = text not in (None, "") and want == 50
    assert ("SCISTREAM_SPIN_US" in caplog.text) == bad
