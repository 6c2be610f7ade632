"""HAProxy, nginx and stunnel backends on the data path: a PROD+CONS chain of real proxy
processes to a real application, bytes verified both ways, TLS and plain WAN legs,
impostors kept out, release mid-transfer, listening on the operator's address only."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl

import pytest

from scistream.data import wankeys
from scistream.data.backends.common import listening
from scistream.data.base import get_backend
from scistream.data.spec import DataSpec
from scistream.data.supervise import ChildProcess
from conftest import free_ports, port_is_free
from test_backends_support import EXTERNAL, App, Chain, leftover, roundtrip, secret, sha, try_through

MODES = ["tls", "plain"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", EXTERNAL)
async def test_chain_carries_many_connections_both_ways(kind, mode, tmp_path):
    """3 listeners x 3 connections each, 2 MiB each way per connection, every byte checked."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=3,
                                   secret=secret() if mode == "tls" else None) as chain:
        payloads = [os.urandom(2 << 20) for _ in range(9)]
        got = await asyncio.gather(*(roundtrip(chain.entries[i % 3], p) for i, p in enumerate(payloads)))
        for sent, back in zip(payloads, got):
            assert len(back) == len(sent)
            assert sha(back) == sha(sent)
        assert app.accepted == 9
        assert app.received == sum(map(len, payloads))
        # a second round on the same listeners: the proxies keep accepting
        again = await asyncio.gather(*(roundtrip(p, payloads[0][:65536]) for p in chain.entries))
        assert all(b == payloads[0][:65536] for b in again)
        stats = await chain.cons.stats()
        assert stats.bytes_in >= sum(map(len, payloads))
        assert stats.bytes_out >= sum(map(len, payloads))
        assert stats.total_connections >= 9


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_producer_speaks_first(kind, tmp_path):
    """Bytes from the producer reach the consumer before it sends anything."""
    async with App(tag=b"hello from the producer\n") as app, \
            Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret()) as chain:
        r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
        try:
            assert await asyncio.wait_for(r.readline(), 15) == b"hello from the producer\n"
        finally:
            w.close()


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_wrong_secret_gets_no_data_through(kind, tmp_path):
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=2, secret=secret(),
                                   cons_secret=secret()) as chain:
        for port in chain.entries:
            assert await try_through(port) == b""
        assert app.accepted == 0 and app.received == 0


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_tls_prod_listener_refuses_plaintext_and_strangers(kind, tmp_path):
    """With a secret, the WAN listener speaks TLS only: plain TCP, a TLS client with another
    certificate and a TLS client with none get nothing to the producer (the clients here
    do not even check the server, so only the server's own check keeps them out)."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret()) as chain:
        wan = chain.prod.spec.ports[0]
        assert await try_through(wan) == b""
        stranger = wankeys.write_credentials(secret(), chain.uid, tmp_path / "stranger")
        with_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        with_cert.load_cert_chain(stranger.cert, stranger.key)
        without_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for ctx in (with_cert, without_cert):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with pytest.raises((ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError)):
                r, w = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", wan, ssl=ctx, server_hostname="scistream-session"), 15)
                try:
                    w.write(b"x" * 1000)
                    await w.drain()
                    await asyncio.wait_for(r.readexactly(1000), 15)
                finally:
                    w.close()
        assert app.accepted == 0 and app.received == 0


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy", "Nginx")])
async def test_tls_leg_is_tls13_with_the_session_certificate(kind, tmp_path):
    """A client holding the session credentials talks TLS 1.3 to the PROD listener."""
    key = secret()
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=key) as chain:
        creds = wankeys.write_credentials(key, chain.uid, tmp_path / "peer")
        r, w = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", chain.prod.spec.ports[0], ssl=wankeys.ssl_context(creds, server=False),
            server_hostname="scistream-session"), 15)
        try:
            assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
            w.write(b"direct over TLS")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(15), 15) == b"direct over TLS"
        finally:
            w.close()


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_release_mid_transfer_stops_flow_and_frees_ports(kind, tmp_path):
    async with App() as app:
        chain = Chain(kind, tmp_path, [app.endpoint], n=2, secret=secret())
        async with chain:
            r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
            block = os.urandom(1 << 16)
            stop = asyncio.Event()

            async def pump() -> None:
                with_error = (ConnectionError, OSError)
                try:
                    while not stop.is_set():
                        w.write(block)
                        await w.drain()
                except with_error:
                    pass

            sender = asyncio.create_task(pump())
            got = 0
            while got < (4 << 20):  # data is flowing
                chunk = await asyncio.wait_for(r.read(1 << 16), 15)
                assert chunk
                got += len(chunk)
            servers = (chain.prod, chain.cons)
            await chain.stop()
            # the flow ends: EOF or reset within a deadline
            ended = False
            for _ in range(10_000):
                try:
                    chunk = await asyncio.wait_for(r.read(1 << 20), 10)
                except (ConnectionError, OSError):
                    ended = True
                    break
                if not chunk:
                    ended = True
                    break
            assert ended
            stop.set()
            w.close()
            await asyncio.wait_for(sender, 10)
            for server in servers:
                assert leftover(server) == []
                assert server.pids == []
            for port in chain.all_ports:
                assert port_is_free(port), f"port {port} still bound after stop"


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_listens_only_on_the_given_address(kind, tmp_path):
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=2) as chain:
        for port in chain.all_ports:
            with socket.socket() as s:
                s.settimeout(5)
                with pytest.raises(ConnectionRefusedError):
                    s.connect(("127.0.0.2", port))
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        for server in (chain.prod, chain.cons):
            text = server.conf_path.read_text()
            assert "0.0.0.0" not in text and "*:" not in text


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_ipv6_loopback_chain(kind, tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret(),
                                   host="::1") as chain:
        payload = os.urandom(1 << 20)
        assert sha(await roundtrip(chain.entries[0], payload, host="::1")) == sha(payload)


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_many_sequential_connections_do_not_freeze(kind, tmp_path):
    """The original's stunnel logged to a pipe nobody read and froze after a few
    connections; the log goes to a file, and 150 connections in a row all complete."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret()) as chain:
        for i in range(150):
            payload = i.to_bytes(4, "big") * 64
            assert await roundtrip(chain.entries[0], payload, timeout=20) == payload
        for server in (chain.prod, chain.cons):
            for fd in (1, 2):
                target = os.readlink(f"/proc/{server.child.pid}/fd/{fd}")
                assert not target.startswith("pipe:"), f"{kind} fd {fd} is a pipe"


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_cons_side_refuses_an_impostor_server(kind, tmp_path):
    """The CONS proxy pointed at a TLS server that does not hold the session secret (one
    with a certificate of its own, which would happily skip the PSK) sends it nothing."""
    impostor_creds = wankeys.write_credentials(secret(), "impostor", tmp_path / "impostor")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(impostor_creds.cert, impostor_creds.key)
    received = bytearray()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while chunk := await r.read(1 << 16):
                received.extend(chunk)
                w.write(chunk)
                await w.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        chain = Chain(kind, tmp_path, [f"127.0.0.1:{port}"], n=1, secret=secret())
        cons = get_backend(kind)(DataSpec(chain.uid, "CONS", "127.0.0.1", free_ports(1),
                                          (f"127.0.0.1:{port}",), wan_secret=chain.secret,
                                          workdir=tmp_path / "cons"))
        await cons.start()
        try:
            assert await try_through(cons.spec.ports[0], b"secret payload " * 100) == b""
        finally:
            await cons.stop()
    assert bytes(received) == b""


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Stunnel"])
async def test_stunnel_legacy_mode_talks_to_an_original_gateway(kind, tmp_path):
    """Without a WAN secret, our PROD stunnel accepts the original StunnelSubprocess CONS
    configuration (PSK 'client1' = uid without dashes, NULL cipher, TLS 1.2)."""
    async with App() as app:
        chain = Chain(kind, tmp_path, [app.endpoint], n=1)
        prod = get_backend(kind)(chain.prod_spec())
        await prod.start()
        try:
            (entry,) = free_ports(1)
            psk = tmp_path / "orig.key"
            psk.write_text("client1:" + chain.uid.replace("-", ""))
            conf = tmp_path / "orig.conf"
            conf.write_text(
                f"fips = no\nPSKsecrets = {psk}\nsecurityLevel = 0\nforeground = quiet\n"
                f"sslVersionMax = TLSv1.2\npid =\noutput = {tmp_path / 'orig.log'}\n"
                f"[{entry}]\nclient = yes\naccept = 127.0.0.1:{entry}\n"
                f"connect = 127.0.0.1:{prod.spec.ports[0]}\nciphers = eNULL\n")
            original = await ChildProcess.spawn([prod.binary, str(conf)], log_path=tmp_path / "orig.out",
                                                name="original-stunnel")
            try:
                lo = {ipaddress.ip_address("127.0.0.1")}
                await original.wait_ready(lambda: _true(entry in listening([original.pid], lo)),
                                          timeout=15)
                payload = os.urandom(1 << 20)
                assert sha(await roundtrip(entry, payload)) == sha(payload)
            finally:
                await original.stop()
        finally:
            await prod.stop()


async def _true(value: bool) -> bool:
    return value
