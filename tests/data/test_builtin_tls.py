"""The built-in data server's TLS WAN leg: mutual TLS 1.3 with the session credentials,
half-close carried as close_notify, and everybody without the secret kept out."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl

import pytest
from builtin_support import Pattern, PatternApp, data_servers, entry, stats
from conftest import async_wait_until as wait_for, echo_roundtrip

from scistream.data import wankeys

GREETING = b"producer-data-" * 100


@pytest.fixture(autouse=True, params=[pytest.param("c", marks=pytest.mark.compiled), "python"])
def tls_engine(request, monkeypatch):
    """Every test here runs with the compiled TLS engine and with the Python pumps (the node
    service and its workers read SCISTREAM_PUMPS at start)."""
    monkeypatch.setenv("SCISTREAM_PUMPS", request.param)
    return request.param


async def failed_count(srv) -> int:
    return (await stats(srv))["failed_connections"]


async def test_tls_chain_echo_many_connections(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        prod, cons = await ds.chain(f"{echo_server[0]}:{echo_server[1]}", tls=True, listeners=2)
        payloads = [os.urandom(300_000 + 4099 * i) for i in range(16)]
        got = await asyncio.gather(*(echo_roundtrip(*entry(cons, i % 2), p) for i, p in enumerate(payloads)))
        assert got == payloads
        total = sum(map(len, payloads))

        async def counted():
            a, b = await prod.stats(), await cons.stats()
            return (a.connections == b.connections == 0 and a.bytes_out == b.bytes_out == total
                    and a.bytes_in == b.bytes_in == total)
        await wait_for(counted, what="both data servers to count every byte")
        assert (await prod.stats()).total_connections == 16


async def test_cons_with_another_secret_gets_nothing_through(tmp_path):
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=1 << 20, greeting=GREETING)
    try:
        async with data_servers(tmp_path) as ds:
            prod, cons = await ds.chain(app.target, tls=True, cons_secret=wankeys.new_secret())
            got = await asyncio.to_thread(_talk, *entry(cons), b"consumer says hi" * 1000)
            assert got == b""
            await wait_for(lambda: _both_failed(prod, cons), what="both sides to refuse the handshake")
            assert app.accepted == 0
            assert (await prod.stats()).bytes_in == (await prod.stats()).bytes_out == 0
    finally:
        app.close()


async def _both_failed(prod, cons) -> bool:
    return await failed_count(prod) >= 1 and await failed_count(cons) >= 1


async def test_plain_client_to_tls_listener_gets_nothing(tmp_path):
    app = PatternApp(Pattern(), greeting=GREETING)
    try:
        async with data_servers(tmp_path) as ds:
            prod, _ = await ds.chain(app.target, tls=True)
            got = await asyncio.to_thread(_talk, *entry(prod), b"GET / HTTP/1.0\r\n\r\n" * 10)
            assert b"producer-data" not in got
            assert len(got) < 64          # at most a TLS alert
            await wait_for(lambda: _failed_at_least(prod, 1), what="the PROD side to drop the client")
            assert app.accepted == 0
    finally:
        app.close()


async def _failed_at_least(srv, n: int) -> bool:
    return await failed_count(srv) >= n


def _client_ctx(secret: bytes, tmp_path, name: str) -> ssl.SSLContext:
    files = wankeys.write_credentials(secret, "x", tmp_path / name)
    return wankeys.ssl_context(files, server=False)


@pytest.mark.parametrize("who", ["no-certificate", "other-session"])
async def test_tls_client_without_the_session_key_is_refused(tmp_path, who):
    app = PatternApp(Pattern(), greeting=GREETING)
    try:
        async with data_servers(tmp_path) as ds:
            prod, _ = await ds.chain(app.target, tls=True)
            if who == "no-certificate":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = _client_ctx(wankeys.new_secret(), tmp_path, "other")

            def attempt() -> bytes:
                with socket.create_connection(entry(prod), 10) as raw:
                    try:
                        with ctx.wrap_socket(raw, server_hostname="scistream-session") as s:
                            s.settimeout(10)
                            s.sendall(b"hello")
                            return s.recv(65536)
                    except (ssl.SSLError, ConnectionError):
                        return b""
            assert await asyncio.to_thread(attempt) == b""
            await wait_for(lambda: _failed_at_least(prod, 1), what="the PROD side to refuse")
            assert app.accepted == 0
    finally:
        app.close()


async def test_session_key_holder_speaks_tls13_to_prod(tmp_path):
    """A client that derives the credentials from the secret is let in (TLS 1.3)."""
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=2 << 20)
    try:
        async with data_servers(tmp_path) as ds:
            secret = wankeys.new_secret()
            prod = await ds.start("PROD", [app.target], secret=secret)
            ctx = _client_ctx(secret, tmp_path, "same")

            def talk() -> tuple[str | None, tuple[int, bool]]:
                with socket.create_connection(entry(prod), 10) as raw:
                    with ctx.wrap_socket(raw, server_hostname="scistream-session") as s:
                        s.settimeout(30)
                        version = s.version()
                        pattern.send(s, 1 << 20)
                        got = pattern.recv_check(s, 2 << 20)
                        s.unwrap()       # close_notify: a clean EOF for the producer
                        return version, got
            version, got = await asyncio.to_thread(talk)
            assert version == "TLSv1.3"
            assert got == (2 << 20, True)
            await wait_for(lambda: _app_done(app, 0), what="the producer to see a clean EOF")
            assert app.results[0].received == 1 << 20 and app.results[0].intact
            assert not app.results[0].error
    finally:
        app.close()


async def _app_done(app: PatternApp, i: int) -> bool:
    return len(app.results) > i and app.results[i].done


async def test_truncated_tls_stream_is_a_reset_not_an_eof(tmp_path):
    """A TCP FIN without close_notify may be an attacker cutting the stream: the producer
    must not mistake it for the end of the data."""
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=0)
    try:
        async with data_servers(tmp_path) as ds:
            secret = wankeys.new_secret()
            prod = await ds.start("PROD", [app.target], secret=secret)
            ctx = _client_ctx(secret, tmp_path, "same")

            def talk() -> None:
                raw = socket.create_connection(entry(prod), 10)
                s = ctx.wrap_socket(raw, server_hostname="scistream-session")
                pattern.send(s, 1 << 20)
                sock = socket.socket(fileno=s.detach())
                sock.shutdown(socket.SHUT_WR)     # FIN, no close_notify
                sock.settimeout(10)
                try:
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass
                sock.close()
            await asyncio.to_thread(talk)
            await wait_for(lambda: _app_done(app, 0), what="the producer's connection to end")
            res = app.results[0]
            # the producer's read ends in a reset, not an EOF (its half-close may fail too: ENOTCONN)
            assert "recv: " in res.error and "reset" in res.error.lower(), res
            assert app.accepted == 1
    finally:
        app.close()


def _talk(host: str, port: int, data: bytes) -> bytes:
    """Connect, send, read until the other side closes or resets; what came back."""
    out = b""
    try:
        with socket.create_connection((host, port), 10) as s:
            s.settimeout(10)
            s.sendall(data)
            while chunk := s.recv(65536):
                out += chunk
    except ConnectionError:
        pass
    return out


async def test_cons_resumes_tls_sessions_wherever_prod_serves_them(tmp_path, echo_server):
    """CONS keeps one TLS session and resumes it on every connection, whichever of PROD's
    workers serves it, and also once the session's PROD half has moved to another node
    service: every PROD listener of a session has the same ticket keys (derived from its
    secret). A PROD that turns a ticket down is tests/data/test_pump.py's."""
    async with data_servers(tmp_path) as ds:
        prod, cons = await ds.chain(f"{echo_server[0]}:{echo_server[1]}", tls=True)
        for i in range(4):
            assert await echo_roundtrip(*entry(cons), b"ping %d" % i) == b"ping %d" % i

        async def resumed(srv, n):
            return (await stats(srv))["tls_resumed"] >= n
        await wait_for(lambda: resumed(cons, 3), what="CONS to resume sessions")
        assert await resumed(prod, 3)
        async with data_servers(tmp_path / "another-node") as ds2:
            prod2 = await ds2.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"],
                                    secret=prod.spec.wan_secret, uid=prod.spec.uid)
            await cons.retarget((f"127.0.0.1:{prod2.spec.ports[0]}",))
            for i in range(3):
                assert await echo_roundtrip(*entry(cons), b"moved %d" % i) == b"moved %d" % i
            await wait_for(lambda: resumed(prod2, 3), what="the moved PROD to resume CONS's session")
            assert await failed_count(prod2) == 0
            assert (await stats(cons))["tls_sessions_kept"] == 1


async def test_a_flood_of_refused_connections_is_counted_not_logged_line_by_line(tmp_path):
    """200 peers without the session key: every one refused and counted, but the log gets
    20 lines for them and one that says how many more there were."""
    async with data_servers(tmp_path) as ds:
        prod = await ds.start("PROD", ["127.0.0.1:9"], secret=wankeys.new_secret())
        host, port = entry(prod)

        def refused_peer() -> None:
            with socket.create_connection((host, port), 5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")    # not TLS at all
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    while s.recv(4096):
                        pass

        for _ in range(200):
            await asyncio.to_thread(refused_peer)
        async def all_counted() -> bool:
            return await failed_count(prod) == 200
        await wait_for(all_counted, what="200 refusals to be counted")
    # the worker says what it held back when it stops (with the service, at the block's end)
    log = (tmp_path / "node.log").read_text()
    lines = [ln for ln in log.splitlines() if "(listener 0, from" in ln]
    assert len(lines) == 20, log[-3000:]
    assert "180 failed connections were not logged one by one" in log



async def test_tls_engine_carries_both_directions_through_a_full_chain_and_a_half_close(tmp_path, tls_engine):
    """The engine chosen moves the bytes (``conns`` says which), while the consumer does not
    read: every buffer of the chain fills up (the pumps keep what a full socket did not
    take) and the consumer's half-close comes long before the producer is done. Then every
    byte arrives, in order, both ways, and both data servers count them."""
    pattern = Pattern()
    back, forth = 48 << 20, 24 << 20
    app = PatternApp(pattern, send_bytes=back)
    try:
        async with data_servers(tmp_path) as ds:
            prod, cons = await ds.chain(app.target, tls=True)
            sock = await asyncio.to_thread(socket.create_connection, entry(cons), 10)
            try:
                sock.settimeout(120)
                await asyncio.to_thread(lambda: (pattern.send(sock, forth), sock.shutdown(socket.SHUT_WR)))

                async def stalled_open() -> bool:
                    for srv in (prod, cons):
                        conns = await srv.connections()
                        if len(conns) != 1 or conns[0]["state"] != "open":
                            return False
                    return (await prod.stats()).bytes_out > 0
                await wait_for(stalled_open, what="the connection to be open on both data servers")
                for srv in (prod, cons):
                    (conn,) = await srv.connections()
                    assert conn["relay"] == "tls" and conn["pumps"] == tls_engine, conn
                got, intact = await asyncio.to_thread(pattern.recv_check, sock)
            finally:
                sock.close()
            assert (got, intact) == (back, True)
            await wait_for(lambda: _app_done(app, 0), what="the producer to finish")
            res = app.results[0]
            assert (res.received, res.intact, res.error) == (forth, True, "")

            async def counted() -> bool:
                a, b = await prod.stats(), await cons.stats()
                return (a.connections == b.connections == 0 and a.bytes_in == b.bytes_in == forth
                        and a.bytes_out == b.bytes_out == back)
            await wait_for(counted, what="both data servers to count every byte")
    finally:
        app.close()


async def test_tls_engine_many_short_connections_echo(tmp_path, echo_server, tls_engine):
    """Connections that carry a few bytes and close at once, 1 to 63809 bytes each, in
    parallel: the hand-over from the handshake to the engine loses nothing (records that
    arrived with the last handshake flight, a close_notify right behind the data)."""
    async with data_servers(tmp_path) as ds:
        prod, cons = await ds.chain(f"{echo_server[0]}:{echo_server[1]}", tls=True, listeners=2)
        payloads = [os.urandom(1 + 997 * i * i) for i in range(9)] * 4
        got = await asyncio.gather(*(echo_roundtrip(*entry(cons, i % 2), p) for i, p in enumerate(payloads)))
        assert got == payloads


async def test_new_credentials_while_a_connection_is_open(tmp_path, echo_server):
    """A session's WAN leaf is issued again (``renew_credentials``) while CONS's first
    connection is still open: when that connection ends, its TLS session (of the replaced
    context) is not kept for resumption, and the next connections get through."""
    async with data_servers(tmp_path) as ds:
        prod, cons = await ds.chain(f"{echo_server[0]}:{echo_server[1]}", tls=True)
        r, w = await asyncio.open_connection(*entry(cons))
        try:
            w.write(b"open across the renewal")
            assert await asyncio.wait_for(r.readexactly(23), 10) == b"open across the renewal"
            await cons.renew_credentials()
            await prod.renew_credentials()
        finally:
            w.close()
        for i in range(3):
            assert await echo_roundtrip(*entry(cons), b"after %d" % i) == b"after %d" % i
        assert await failed_count(cons) == 0 and await failed_count(prod) == 0
