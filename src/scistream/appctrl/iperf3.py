"""iperf3 at both ends of a session (``appctrl create-appctrl --app iperf3``).

Nothing here opens a connection of its own to the iperf3 server: an iperf3 server takes
every connection for a client's control connection, and one that closes without a word
ends its test in an error, and with it a real client's connection queued behind it
(reset), or the whole server when it runs with ``-1``. So:

- the server (PROD) is known to listen from the kernel's table of listening sockets, and
  runs until it has completed ``tests`` tests (or forever), counting from its ``--json``
  documents: a connection that was no test (an error document) does not count;
- the client (CONS) waits for the chain to be up by trying: an attempt that ended before
  its test started (the chain not through yet: refused, reset) is tried again until the
  deadline; one that started is the result, whatever it says.

    async with server("127.0.0.1") as (endpoint, serve):   # listening
        ...say hello with endpoint...
        await serve(tests=2, say=print)
    report = await client("127.0.0.1:5200", timeout=120)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
from typing import AsyncIterator, Awaitable, Callable, Sequence

from ..addr import format_listener, free_port, parse_listener
from ..data.backends.common import socket_inodes
from ..errors import InvalidArgument
from ..procs import spawn

log = logging.getLogger(__name__)


class Iperf3Failed(ConnectionError):
    """iperf3 did not run its test (appctrl: "application failed", exit code 5)."""


@dataclasses.dataclass(frozen=True)
class Iperf3Report:
    """An iperf3 client's test: ``bytes`` the receiver got (``sent``: what the sender
    wrote) in ``seconds``, over ``streams`` streams; ``attempts`` before it started."""
    bytes: int
    sent: int
    seconds: float
    streams: int
    attempts: int = 1

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds else 0.0

    @classmethod
    def of(cls, doc: dict, attempts: int = 1) -> "Iperf3Report":
        end = doc.get("end", {})
        received = end.get("sum_received") or end.get("sum") or {}   # TCP; UDP has one "sum"
        sent = end.get("sum_sent") or received
        return cls(int(received.get("bytes", 0)), int(sent.get("bytes", 0)), float(received.get("seconds", 0.0)),
                   len(end.get("streams") or doc.get("start", {}).get("connected", [])), attempts)


def _iperf3(*args: str):
    """iperf3 with ``args`` and its output piped, always stopped and reaped (``procs.spawn``)."""
    binary = shutil.which("iperf3")
    if not binary:
        raise InvalidArgument("iperf3 is not installed (apt-get install iperf3)")
    return spawn([binary, *args], stdout=asyncio.subprocess.PIPE)


async def _documents(stream: asyncio.StreamReader) -> AsyncIterator[dict]:
    """The JSON documents iperf3 ``--json`` prints (one per test), as they come: each from a
    line ``{`` to a line ``}``; the lines between two (warnings) are skipped."""
    lines: list[str] | None = None
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\r\n")
        if text == "{":
            lines = []
        if lines is None:
            continue
        lines.append(text)
        if text == "}":
            with contextlib.suppress(ValueError):
                yield json.loads("\n".join(lines))
            lines = None


def _listening(port: int) -> bool:
    """Whether a socket listens on TCP ``port`` (the kernel's tables; no connection made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1:4:2]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@contextlib.asynccontextmanager
async def server(ip: str, timeout: float = 10.0) -> AsyncIterator[tuple[str, Callable[..., Awaitable[int]]]]:
    """An iperf3 server on ``ip``, listening: (its endpoint, ``serve``). ``await
    serve(tests, say)`` returns once it completed ``tests`` tests (None: runs until
    cancelled), saying each; the server is stopped on leaving."""
    port = free_port(ip)
    async with _iperf3("-s", "--json", "-B", ip, "-p", str(port)) as proc:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not _listening(port):
            if proc.returncode is not None:
                said = [d.get("error", "") async for d in _documents(proc.stdout)]
                raise Iperf3Failed(f"iperf3 -s exited with {proc.returncode}: {'; '.join(said) or 'no error said'}")
            if loop.time() > deadline:
                raise Iperf3Failed(f"iperf3 -s is not listening on {format_listener(ip, port)} after {timeout:g} s")
            await asyncio.sleep(0.02)

        async def serve(tests: int | None = None, say: Callable[[str], None] = print) -> int:
            done = 0
            async for doc in _documents(proc.stdout):
                if "error" in doc:
                    say(f"iperf3 server: a connection that was no test ({doc['error']}), not counted")
                    continue
                done += 1
                r = Iperf3Report.of(doc)
                say(f"iperf3 server: test {done}{f' of {tests}' if tests else ''}: {r.bytes} bytes received "
                    f"over {r.streams} stream(s) in {r.seconds:.2f} s ({r.gbps:.2f} Gbit/s)")
                if tests and done >= tests:
                    return done
            raise Iperf3Failed(f"the iperf3 server exited with {await proc.wait()} after {done} test(s)")

        yield format_listener(ip, port), serve


async def _attempt(host: str, port: int, args: Sequence[str], deadline: float) -> dict | None:
    """One iperf3 client run: its JSON document, or None if it had not started its test
    (no data stream open) by the deadline."""
    loop = asyncio.get_running_loop()
    async with _iperf3("-c", host, "-p", str(port), "--json", *args) as proc:
        out = asyncio.ensure_future(proc.stdout.read())
        try:
            text = await asyncio.wait_for(asyncio.shield(out), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            # an iperf3 client holds one socket for its control connection, one more per
            # data stream once the server accepted the test
            if len(socket_inodes([proc.pid])) < 2:
                out.cancel()
                return None
            text = await out
        await proc.wait()
    docs = [d async for d in _documents(_reader(text))]
    if not docs:
        raise Iperf3Failed(f"iperf3 -c exited with {proc.returncode}: {text.decode(errors='replace').strip()}")
    return docs[-1]


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def client(listener: str, *, timeout: float, args: Sequence[str] = ()) -> Iperf3Report:
    """iperf3's client through ``listener``; tried again while its test has not started
    (the chain not through yet), for up to ``timeout`` seconds."""
    host, port = parse_listener(listener)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, attempts, last = 0.05, 0, "no attempt"
    while True:
        attempts += 1
        doc = await _attempt(host, port, args, deadline)
        if doc is None:
            last = "still waiting for the server's answer"
        elif "error" not in doc:
            return Iperf3Report.of(doc, attempts)
        elif doc.get("intervals") or "test_start" in doc.get("start", {}):
            raise Iperf3Failed(f"iperf3 test through {listener} failed after it started: {doc['error']}")
        else:
            last = doc["error"]
        if doc is None or loop.time() + delay > deadline:
            raise Iperf3Failed(f"iperf3 could not start a test through {listener} within {timeout:g} s "
                               f"({attempts} attempt(s)); the last: {last}")
        log.debug("iperf3 attempt %d through %s: %s; again in %.2f s", attempts, listener, last, delay)
        await asyncio.sleep(delay)       # a retry's pause, not a wait for something
        delay = min(delay * 2, 1.0)
