"""The event loop of the built-in data server, its timers, its pipe pool and its rate limit.

The data plane of ``s2ds`` is a plain edge-triggered epoll loop, not asyncio: a relay
spends its life in tiny callbacks (a socket became readable, splice 1 MiB, done), and
asyncio's per-event machinery (handles, futures, transports) costs more than the work
itself. Everything here is single-threaded: the loop owns every file descriptor that is
registered with it, and a handler runs to completion before the next one.

    loop = Loop()
    loop.add(sock.fileno(), EV_ALL, on_event)       # on_event(events) on every edge
    timer = loop.call_later(10.0, on_timeout)         # timer.cancel() to drop it
    bucket = TokenBucket(loop, rate_kbps=10_000)      # shared by every connection
    loop.run()                                        # until loop.stop()

``Loop(carry=True)`` (the node service's workers) waits through the compiled ``_pump.Hub``:
plain copying connections attached to it (``conn.Conn._carry``) have their events handled
in C, and only the rest, and their end, reach the handlers here.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import heapq
import itertools
import logging
import os
import select
import signal
import time
from typing import Callable

from .compiled import pump

log = logging.getLogger(__name__)

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLRDHUP, EPOLLHUP, EPOLLERR = select.EPOLLRDHUP, select.EPOLLHUP, select.EPOLLERR
#: What every socket of a connection is registered for, once, edge-triggered.
EV_ALL = EPOLLIN | EPOLLOUT | EPOLLRDHUP | select.EPOLLET
EV_READ = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
EV_WRITE = EPOLLOUT | EPOLLHUP | EPOLLERR
EV_HUP = EPOLLRDHUP | EPOLLHUP | EPOLLERR

PAGE = os.sysconf("SC_PAGE_SIZE")
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def whole_number_setting(name: str, text: str | None, default: int, meaning: str) -> int:
    """An environment setting that is a whole number >= 0 (``meaning``: its unit, and what
    0 does): unset or empty gives ``default``, and so does anything else, said in the log,
    so that a typo cannot stop a data server from starting."""
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip())
        if value < 0:
            raise ValueError(value)
    except ValueError:
        log.warning("%s=%r: not a whole number of %s; using %d", name, text, meaning, default)
        return default
    return value


def _spin_us(text: str | None, default: int = 50) -> int:
    """SCISTREAM_SPIN_US: microseconds a busy loop polls before it sleeps (0: never)."""
    return whole_number_setting("SCISTREAM_SPIN_US", text, default, "microseconds (0: no spin)")


SPIN_S = _spin_us(os.environ.get("SCISTREAM_SPIN_US")) / 1e6
#: How many waits in a row that ended within the spin make a loop spin on every wait.
SPIN_SCORE = 4
#: A yield that took longer than this ran another task: the spin stops there.
SPIN_GIVE_WAY = 20e-6
#: Seconds after a connection closes when the heap's free memory goes back to the system.
TRIM_AFTER = 1.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library). A TLS connection's rings (1.25
    MiB) are big enough for glibc to take them with mmap at first, but after the first is
    freed it raises its threshold and takes them from the heap, where what is freed stays
    with the process: a burst of connections would keep its peak in memory."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


#: SCISTREAM_CARRY=0: no connection is carried in C (Loop(carry=True) waits as any other).
CARRY = whole_number_setting("SCISTREAM_CARRY", os.environ.get("SCISTREAM_CARRY"), 1, "a switch (0: off)") != 0


class Timer:
    """A callback due at ``when``; ``fn`` is None once it is cancelled."""
    __slots__ = ("when", "fn")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        # The entry stays in the heap until its time (up to the 15 s connect timeout):
        # let go of the callback now, or it keeps its closed connection (and the TLS
        # engine's buffers) alive until then.
        self.fn = None


def _spins(name: str) -> property:
    """A spin counter of a loop (``_`` + name), and its hub's."""
    def count(loop: "Loop") -> int:
        return getattr(loop, "_" + name) + (getattr(loop.hub, name) if loop.hub is not None else 0)
    return property(count)


class Loop:
    """An edge-triggered epoll loop with timers; ``stop()`` (or SIGTERM/SIGINT) ends ``run()``."""

    def __init__(self, spin: float = 0.0, carry: bool = False) -> None:
        #: Seconds a wait may spin before it sleeps (0: never); see _wait_spinning.
        #: The node service's workers spin SPIN_S, one loop per process.
        self.spin = spin
        self._short = 0                 # > 0: the recent waits ended within the spin
        self._spin_hits = 0             # spins that met an event
        self._spin_missed = 0           # spins that ran out, then slept
        self._spin_gave_way = 0         # spins cut short: a yield ran another task
        self.trims = 0                  # heap memory given back after connections closed
        self._trim: Timer | None = None
        self.ep = select.epoll()
        #: ``carry``: plain copying connections are carried in C (``_pump.Hub``: their
        #: events never reach Python while bytes flow), and so is the spin. The node
        #: service's workers; None without the compiled pumps (SCISTREAM_PUMPS=python) or
        #: with SCISTREAM_CARRY=0.
        self.hub = (pump.Hub(self.ep.fileno(), spin, SPIN_GIVE_WAY, SPIN_SCORE)
                    if carry and CARRY and pump is not None else None)
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._pushed = 0
        self.running = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add(self._wake_r, EPOLLIN, self._on_wake)

    spin_hits = _spins("spin_hits")
    spin_missed = _spins("spin_missed")
    spin_gave_way = _spins("spin_gave_way")

    def add(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.ep.register(fd, events)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(fd)

    def forget(self, fd: int) -> None:
        """Drop the handler of an fd about to be closed (closing removes it from epoll)."""
        self.handlers.pop(fd, None)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        t = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        self._pushed += 1
        if self._pushed >= 1024:
            self._pushed = 0
            self._compact()
        return t

    def _compact(self) -> None:
        """Drop cancelled timers when they are most of the heap: a connection cancels its
        connect or handshake timeout within milliseconds, and under churn thousands of
        them would otherwise wait for their due time (15 s) in the heap."""
        live = [e for e in self._timers if e[2].fn is not None]
        if len(live) * 2 < len(self._timers):
            heapq.heapify(live)
            self._timers[:] = live

    def trim_soon(self) -> None:
        """A connection closed: give the heap's free memory back to the system in
        TRIM_AFTER seconds (once for every close in between, so a burst of closes costs one
        trim, and a steady churn one per TRIM_AFTER)."""
        if self._trim is None and _malloc_trim is not None:
            self._trim = self.call_later(TRIM_AFTER, self._trim_now)

    @property
    def trim_pending(self) -> bool:
        return self._trim is not None

    def _trim_now(self) -> None:
        assert _malloc_trim is not None     # trim_soon sets no timer without it
        self._trim = None
        _malloc_trim(0)
        self.trims += 1

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT stop the loop (through the wake-up pipe, so epoll returns)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _on_wake(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def wake(self) -> None:
        """Make the current wait return (it takes new timers into account); safe from any thread."""
        with contextlib.suppress(OSError):   # pipe full: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def stop(self) -> None:
        self.running = False
        self.wake()

    def run(self) -> None:
        self.running = True
        handlers = self.handlers
        timers = self._timers
        wait = self.hub.wait if self.hub is not None else self._wait_spinning if self.spin else self.ep.poll
        while self.running:
            timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else -1.0
            try:
                events = wait(timeout, 1024)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            for fd, ev in events:
                h = handlers.get(fd)
                if h is not None:
                    h(ev)
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    t = heapq.heappop(timers)[2]
                    if t.fn is not None:
                        t.fn()

    def _wait_spinning(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        """``epoll.poll``, but while the recent waits were short, first poll without
        sleeping for up to ``self.spin`` seconds (yielding the core between polls).

        A worker that sleeps on every wait pays a sleep and a wake-up each time: between
        two buffers of one stream (a few microseconds apart, docs/performance.md) it would
        rather stay on its core. It spins only when
        its last waits ended within the spin (``_short`` > 0), so a worker that is idle or
        whose events come seldom sleeps at once; and it stops as soon as a yield gives the
        core to some other task (the core is wanted, spinning would take it from them).
        """
        poll = self.ep.poll
        clock = time.perf_counter
        spin = self.spin
        start = clock()
        events = None
        if self._short > 0 and timeout != 0.0:
            end = start + (spin if timeout < 0 else min(spin, timeout))
            t = start
            yield_ = os.sched_yield
            while not (events := poll(0, maxevents)):
                yield_()
                before, t = t, clock()
                if t - before > SPIN_GIVE_WAY:
                    self._spin_gave_way += 1
                    self._short = 0
                    break
                if t >= end:
                    self._spin_missed += 1
                    break
            else:
                self._spin_hits += 1
        if not events:
            events = poll(timeout, maxevents)
        if events and clock() - start < spin:
            self._short = min(self._short + 1, SPIN_SCORE)
        elif self._short > 0:
            self._short -= 1
        return events

    def close(self) -> None:
        self.ep.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


#: The size asked of a splice pipe (the kernel may give less: ``PipePool.size``).
DEFAULT_PIPE = 1 << 20


class PipePool:
    """Reusable kernel pipes for splice (creating and sizing one costs 3 syscalls)."""

    def __init__(self, size: int, keep: int = 64) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        r, w = self._new(size)     # learn the size the kernel really gives
        self.size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        self.slots = max(1, self.size // PAGE)
        self.free.append((r, w))

    @staticmethod
    def _new(size: int) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        except OSError as exc:  # pipe-max-size lower than asked: keep the default size
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                os.close(r)
                os.close(w)
                raise
        return r, w

    def get(self) -> tuple[int, int]:
        return self.free.pop() if self.free else self._new(self.size)

    def put(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self.free:
            os.close(r)
            os.close(w)
        self.free.clear()


class TokenBucket:
    """A session-wide byte budget: ``rate`` bytes/s, at most ``burst`` saved up.

    ``take(n, waiter)`` grants up to ``n`` bytes now (deducted), or 0 and calls
    ``waiter()`` once enough tokens have accrued; ``refund`` gives back what a grant did
    not use. Over any interval T at most ``burst + rate * T`` bytes are granted.
    """

    def __init__(self, loop: Loop, rate_kbps: int) -> None:
        self.loop = loop
        self.rate = rate_kbps * 1000 / 8  # bytes per second
        self.burst = min(max(self.rate * 0.05, 4096.0), 16 << 20)
        self.min_grant = min(self.burst, 64 * 1024.0)
        self.tokens = self.min_grant
        self.stamp = time.monotonic()
        self.waiters: list[Callable[[], None]] = []
        self._timer: Timer | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: int, waiter: Callable[[], None]) -> int:
        self._refill()
        if self.tokens >= min(n, self.min_grant):
            k = min(n, int(self.tokens))
            self.tokens -= k
            return k
        if waiter not in self.waiters:
            self.waiters.append(waiter)
        if self._timer is None:
            delay = (self.min_grant - self.tokens) / self.rate
            self._timer = self.loop.call_later(max(delay, 0.0005), self._wake)
        return 0

    def refund(self, n: int) -> None:
        if n > 0:
            self.tokens = min(self.burst, self.tokens + n)

    def _wake(self) -> None:
        self._timer = None
        waiters, self.waiters = self.waiters, []
        # Rotate who goes first so that no connection starves the others.
        if len(waiters) > 1:
            waiters.append(waiters.pop(0))
        for w in waiters:
            w()

    def discard(self, waiter: Callable[[], None]) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
