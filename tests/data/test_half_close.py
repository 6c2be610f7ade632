"""Half-closed streams through a whole session of every type, built as s2cs builds it (two
in-process control servers, req/hello/update through the real client): 4 connections,
8 MiB each way per connection, every byte checked, several rounds, in three shapes:

* ``echo``: the consumer sends, shuts down its write side and reads until the end; the
  producer echoes as it reads and closes after the consumer's end (the consumer closes
  first; the producer's last bytes follow the consumer's FIN);
* ``late``: the consumer sends, shuts down its write side, then reads the answer slowly
  (1 KiB reads); the producer answers (what it read, reversed) only once it has read
  everything, so the whole answer follows the consumer's FIN and queues up on the way;
* ``first``: the producer sends its payload and shuts down its write side at once, then
  reads until the end; the consumer sends half of its payload, reads until the producer's
  end, then sends the other half and closes (the producer closes first).

Each with the TLS WAN leg and the plain one (``wan-plaintext``; Stunnel has no plain TCP
leg: there it is the original's TLS 1.2 with the uid-derived key). Every type carries every
stream whole: the stunnel types through our relay (``scistream.data.backends.stunnel_relay``),
which passes an application's end to stunnel only once stunnel has read everything before
it; their sessions wait for the far side's end as long as for an idle stream
(``TIMEOUTclose``). stunnel driven without the relay, as the original tooling's
StunnelSubprocess configuration drives it, drops the end of some streams: what arrives is
always a prefix of what was sent, and every short stream is counted as cut.

``SCISTREAM_HALF_CLOSE_ROUNDS=N`` runs every shape N times as often (a longer soak).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import pytest

from conftest import (async_wait_until, connect_session, echo_roundtrip, free_ports, new_uid,
                      parse_listener)
from scistream.data.backends.common import IDLE_TIMEOUT_S
from scistream.data.backends.stunnel import StunnelServer
from scistream.data.base import get_backend
from scistream.data.spec import DataSpec
from test_backends_support import Served, _param

TYPES = [_param(n) for n in ("Builtin", "Haproxy", "Nginx", "Stunnel", "StunnelSubprocess")]
CONNS = 4
SIZE = 8 << 20
#: Rounds of each shape (the ``late`` shape is where stunnel alone loses most often).
SOAK = int(os.environ.get("SCISTREAM_HALF_CLOSE_ROUNDS", "1") or 1)
ROUNDS = {"echo": 2 * SOAK, "first": 2 * SOAK, "late": 3 * SOAK}
#: At most this many more ``late`` rounds on a type that does not carry half-closes whole,
#: until one of its streams comes short (so its counting is exercised).
MORE_LATE_ROUNDS = 10
TIMEOUT = 60.0
KEY = 16   # a payload's first bytes name it (random payloads: unique)
READ_PIECE = 1024   # the slow consumer's reads


class Producer(Served):
    """The producer's endpoint: behaves as the current ``shape`` says, records what it
    sent and what it read (by the payload's first bytes)."""

    def __init__(self) -> None:
        self.shape = "echo"
        self.sent: dict[bytes, bytes] = {}
        self.read: dict[bytes, bytes] = {}
        self.ended = 0

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if self.shape == "echo":
                while chunk := await r.read(1 << 16):
                    w.write(chunk)
                    await w.drain()
            elif self.shape == "late":
                data = await r.read(-1)
                w.write(data[::-1])   # the answer: what it read, reversed
                await w.drain()
            else:   # first: send everything and close the write side, then read
                payload = os.urandom(SIZE)
                self.sent[payload[:KEY]] = payload
                w.write(payload)
                await w.drain()
                w.write_eof()
                data = await r.read(-1)
                self.read[data[:KEY]] = data
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
            self.ended += 1


async def consumer_last(port: int, payload: bytes) -> bytes:
    """Send half of ``payload``, read until the producer's end, send the other half, close
    the write side; return what was read."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    half = len(payload) // 2
    ended = asyncio.Event()

    async def send() -> None:
        w.write(payload[:half])
        await w.drain()
        await ended.wait()
        w.write(payload[half:])
        await w.drain()
        w.write_eof()

    sender = asyncio.create_task(send())
    try:
        got = await asyncio.wait_for(r.read(-1), TIMEOUT)
        ended.set()
        await asyncio.wait_for(sender, TIMEOUT)
    finally:
        sender.cancel()
        w.close()
    return got


async def consumer_slow(port: int, payload: bytes) -> bytes:
    """Send ``payload``, close the write side, then read the answer in small pieces (a
    consumer slower than the producer, so the answer queues up along the chain)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        w.write(payload)
        await w.drain()
        w.write_eof()
        got = bytearray()
        while chunk := await asyncio.wait_for(r.read(READ_PIECE), TIMEOUT):
            got += chunk
    finally:
        w.close()
    return bytes(got)


def compare(what: str, sent: bytes, got: bytes, short: list[str], bad: list[str]) -> None:
    """Whole, short (a prefix of what was sent) or bad (anything else)."""
    if got == sent:
        return
    if len(got) < len(sent) and sent[:len(got)] == got:
        short.append(f"{what}: {len(got)} of {len(sent)} bytes")
    else:
        bad.append(f"{what}: {len(got)} bytes that are not what was sent ({len(sent)})")


async def one_round(shape: str, app: Producer, ports: list[int], short: list[str], bad: list[str]) -> None:
    app.shape, ended = shape, app.ended
    app.sent.clear()
    app.read.clear()
    payloads = [os.urandom(SIZE) for _ in ports]
    if shape == "first":
        got = await asyncio.gather(*(consumer_last(p, c) for p, c in zip(ports, payloads)))
    elif shape == "late":
        got = await asyncio.gather(*(consumer_slow(p, c) for p, c in zip(ports, payloads)))
    else:
        got = await asyncio.gather(*(echo_roundtrip("127.0.0.1", p, c, TIMEOUT) for p, c in zip(ports, payloads)))
    # the producer's side of each stream is over once its handler ended
    await async_wait_until(lambda: app.ended >= ended + len(ports), TIMEOUT, "the producer's streams to end")
    for i, (c, g) in enumerate(zip(payloads, got)):
        if shape == "echo":
            compare(f"{shape} #{i} to the consumer", c, g, short, bad)
        elif shape == "late":
            compare(f"{shape} #{i} to the consumer", c[::-1], g, short, bad)
        else:
            compare(f"{shape} #{i} to the consumer", app.sent.get(g[:KEY], b"?"), g, short, bad)
            compare(f"{shape} #{i} to the producer", c, app.read.get(c[:KEY], b""), short, bad)


async def cut_streams(client, uid: str) -> int:
    return sum(s.cut_streams for s in (await client.status(uid)).sessions)


@pytest.mark.parametrize("leg", ["tls", "plain"])
@pytest.mark.parametrize("kind", TYPES)
async def test_half_closed_streams_arrive_whole_or_counted(kind, leg, servers, client_for, caplog):
    await rounds_through_a_session(kind, leg, servers, client_for, caplog,
                                   carries=get_backend(kind).carries_half_close)


@pytest.mark.parametrize("leg", ["tls", "plain"])
@pytest.mark.parametrize("kind", [p for p in TYPES if p.values[0] == "Stunnel"])
async def test_stunnel_without_the_relay_drops_ends_and_counts_them(kind, leg, servers, client_for, caplog,
                                                                     monkeypatch):
    """``SCISTREAM_STUNNEL_RELAY=off``: stunnel's own TCP sockets face the applications, as
    the original drives it; some ends are lost, every short stream is counted, the session
    start warns."""
    monkeypatch.setenv("SCISTREAM_STUNNEL_RELAY", "off")
    await rounds_through_a_session(kind, leg, servers, client_for, caplog, carries=False)


async def rounds_through_a_session(kind, leg, servers, client_for, caplog, *, carries: bool) -> None:
    caplog.set_level(logging.WARNING, logger="scistream")
    async with Producer() as app:
        prod_srv = await servers(server_type=kind, wan_plaintext=leg == "plain")
        cons_srv = await servers(server_type=kind, wan_plaintext=leg == "plain")
        pc, cc = client_for(prod_srv), client_for(cons_srv)
        uid, prod, cons = await connect_session(pc, cc, app.endpoint, CONNS)
        assert cons.wan_security == ("tls" if leg == "tls" else "plain")
        ports = [parse_listener(l)[1] for l in cons.listeners]
        short: list[str] = []
        bad: list[str] = []
        for shape, rounds in ROUNDS.items():
            for _ in range(rounds):
                await one_round(shape, app, ports, short, bad)
        if not carries:
            # stunnel's documented limitation: late answers lose their end in about half the
            # streams here; more rounds until it shows (almost never needed)
            for _ in range(MORE_LATE_ROUNDS):
                if short:
                    break
                await one_round("late", app, ports, short, bad)
        cut = await cut_streams(pc, uid) + await cut_streams(cc, uid)
        for srv in (prod_srv, cons_srv):
            (session,) = srv.registry.active.values()
            if isinstance(session.server, StunnelServer):
                # stunnel waits for the far side's end as long as it keeps an idle stream
                # (its default, 60 s, cut off an answer that came later), and its plain
                # sides are the relay's Unix sockets
                conf = session.server.conf_path.read_text()
                assert conf.count(f"TIMEOUTclose = {IDLE_TIMEOUT_S}\n") == CONNS, conf
                assert session.server.relayed == carries, conf
                assert conf.count(".sock\n") == (CONNS if carries else 0), conf
        await pc.release(uid)
        await cc.release(uid)
    rounds = sum(ROUNDS.values())
    print(f"{kind} {leg}: {rounds} rounds of {CONNS} streams, {len(short)} short streams, "
          f"{cut} counted as cut: {short}")
    assert not bad, bad
    warned = "may drop the end of a half-closed stream" in caplog.text
    if carries:
        assert not short, short
        assert cut == 0 and not warned
    else:
        assert warned, "no warning at session start"
        assert len(short) <= cut, f"{len(short)} short streams, {cut} counted: {short}"
        # if stunnel now carries them all, the docs and this test are out of date
        assert short, (f"{kind} carried every half-closed stream whole, also "
                       f"{MORE_LATE_ROUNDS} more late rounds: update the docs")


class OriginalStunnel(StunnelServer):
    """The original tooling's StunnelSubprocess configuration (its ``stunnel.conf.j2``,
    scistream-proto 1.2.1): TLS 1.2 with the uid-derived PSK, ``ciphers = eNULL``, stunnel's
    default timeouts and socket options, ``debug = 7``, the applications' TCP connections
    straight to stunnel (no relay). Two changes, neither on the data path: ``accept`` on
    127.0.0.1 (the original binds every interface) and the log written to our file (the
    original's went to a pipe nobody read)."""
    relayed = False

    def render(self) -> str:
        spec = self.spec
        lines = ["; the original's StunnelSubprocess configuration", "fips = no",
                 f"PSKsecrets = {self.legacy_psk}", "securityLevel = 0", "debug = 7",
                 "foreground = yes", "sslVersionMax = TLSv1.2",
                 f"pid = {spec.workdir / 'stunnel.pid'}"]
        for port, target in zip(spec.ports, spec.targets):
            lines += ["", f"[{port}]", f"client = {'yes' if spec.role == 'CONS' else 'no'}",
                      f"accept = 127.0.0.1:{port}", f"connect = {target}", "ciphers = eNULL"]
        return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def stunnel_pair(cls: type[StunnelServer], endpoint: str, workdir: Path, n: int = CONNS):
    """A PROD and a CONS stunnel of class ``cls`` for one session (no WAN secret: the
    original's TLS 1.2 with the uid-derived key), forwarding to ``endpoint``."""
    uid = new_uid()
    prod = cls(DataSpec(uid, "PROD", "127.0.0.1", free_ports(n), (endpoint,) * n, workdir=workdir / "prod"))
    await prod.start()
    try:
        cons = cls(DataSpec(uid, "CONS", "127.0.0.1", free_ports(n),
                            tuple(f"127.0.0.1:{p}" for p in prod.spec.ports), workdir=workdir / "cons"))
        await cons.start()
        try:
            yield prod, cons
        finally:
            await cons.stop()
    finally:
        await prod.stop()


@pytest.mark.parametrize("kind", [p for p in TYPES if p.values[0] == "StunnelSubprocess"])
async def test_the_originals_stunnel_configuration_drops_the_same_ends(kind, tmp_path):
    """The same rounds through two stunnels configured as the original's StunnelSubprocess
    gateways: the same streams come short, only by their end, and the same log lines
    count them."""
    async with Producer() as app, stunnel_pair(OriginalStunnel, app.endpoint, tmp_path) as (prod, cons):
        assert "ciphers = eNULL" in cons.conf_path.read_text()
        ports = list(cons.spec.ports)
        short: list[str] = []
        bad: list[str] = []
        for shape, rounds in ROUNDS.items():
            for _ in range(rounds):
                await one_round(shape, app, ports, short, bad)
        for _ in range(MORE_LATE_ROUNDS):
            if short:
                break
            await one_round("late", app, ports, short, bad)
        cut = (await prod.stats()).cut_streams + (await cons.stats()).cut_streams
    print(f"the original's configuration: {len(short)} short streams, {cut} counted as cut: {short}")
    assert not bad, bad
    assert short, "the original's configuration carried every half-closed stream whole"
    assert len(short) <= cut, f"{len(short)} short streams, {cut} counted: {short}"


class ImpatientStunnel(StunnelServer):
    """Our stunnel configuration waiting 1 s, not 7 days, for the far side's end."""
    close_timeout = 1


@pytest.mark.parametrize("kind", [p for p in TYPES if p.values[0] == "Stunnel"])
async def test_a_stream_stunnel_gives_up_waiting_for_is_counted(kind, tmp_path):
    """The producer answers only after the consumer has seen the end: with a 1 s
    ``TIMEOUTclose`` stunnel ends the stream first (nothing of the answer, a clean end),
    and counts it as cut."""
    release = asyncio.Event()

    async def late(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.read(-1)
            await release.wait()
            w.write(data)
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(late, "127.0.0.1", 0)
    endpoint = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with stunnel_pair(ImpatientStunnel, endpoint, tmp_path, n=1) as (prod, cons):
            assert "TIMEOUTclose = 1\n" in prod.conf_path.read_text()
            r, w = await asyncio.open_connection("127.0.0.1", cons.spec.ports[0])
            try:
                w.write(os.urandom(1 << 20))
                await w.drain()
                w.write_eof()
                assert await asyncio.wait_for(r.read(-1), TIMEOUT) == b""
            finally:
                w.close()
                release.set()

            async def counted() -> bool:
                return (await prod.stats()).cut_streams + (await cons.stats()).cut_streams >= 1
            await async_wait_until(counted, 15, "the cut stream counted")
    finally:
        server.close()
