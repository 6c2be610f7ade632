"""The built-in data server (sessions in the node service, as s2cs starts it): real
connections, bytes checked, counters, several listeners and targets, retargeting,
failures, stop. The service takes the pumps SCISTREAM_PUMPS names (.ci/run runs these
tests again with the Python pumps)."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest
from builtin_support import Pattern, PatternApp, data_servers, entry, stats
from conftest import async_wait_until as wait_for, echo_roundtrip, port_is_free

from scistream.errors import DataServerError


async def tag_server(tag: bytes):
    """A target that says who it is and closes."""
    async def serve(r, w):
        w.write(tag)
        await w.drain()
        w.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def read_all(host: str, port: int, send: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout) as s:
        s.settimeout(timeout)
        if send:
            s.sendall(send)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


async def test_many_connections_through_one_listener(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        srv = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        payloads = [os.urandom(200_000 + 997 * i) for i in range(40)]
        got = await asyncio.gather(*(echo_roundtrip(*entry(srv), p) for p in payloads))
        assert [len(g) for g in got] == [len(p) for p in payloads]
        assert got == payloads
        total = sum(map(len, payloads))

        async def settled():
            s = await srv.stats()
            return s.connections == 0 and s.bytes_out == total and s
        stats = await wait_for(settled, what="all connections closed and counted")
        assert stats.total_connections == 40
        assert stats.bytes_in == total


async def test_each_listener_goes_to_its_own_target(tmp_path):
    servers = [await tag_server(b"target-%d" % i) for i in range(3)]
    try:
        targets = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        async with data_servers(tmp_path) as ds:
            srv = await ds.start("PROD", targets)
            for i in range(3):
                for _ in range(2):
                    assert await asyncio.to_thread(read_all, *entry(srv, i)) == b"target-%d" % i
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()


async def test_retarget_sends_new_connections_elsewhere(tmp_path):
    a, b = await tag_server(b"A"), await tag_server(b"B")
    try:
        async with data_servers(tmp_path) as ds:
            srv = await ds.start("PROD", [f"127.0.0.1:{a.sockets[0].getsockname()[1]}"])
            assert await asyncio.to_thread(read_all, *entry(srv)) == b"A"
            await srv.retarget((f"127.0.0.1:{b.sockets[0].getsockname()[1]}",))
            assert await asyncio.to_thread(read_all, *entry(srv)) == b"B"
            with pytest.raises(DataServerError, match="host:port"):
                await srv.retarget(("nonsense",))
            assert await asyncio.to_thread(read_all, *entry(srv)) == b"B"
    finally:
        for s in (a, b):
            s.close()
            await s.wait_closed()


async def test_unreachable_target_closes_the_client_and_is_counted(tmp_path):
    # a port bound without listen() refuses connections, and nobody else can take it
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        async with data_servers(tmp_path) as ds:
            srv = await ds.start("PROD", [f"127.0.0.1:{closed_port.getsockname()[1]}"])
            assert await asyncio.to_thread(read_until_closed, *entry(srv), b"hello") == b""
            await _check_failed_counted(srv)


def read_until_closed(host: str, port: int, send: bytes) -> bytes:
    """read_all, where a reset at any point (the data server may reset the connection
    before connect() has even returned) also means: closed, nothing came back."""
    try:
        return read_all(host, port, send)
    except (ConnectionResetError, BrokenPipeError):
        return b""


async def _check_failed_counted(srv) -> None:

    async def failed():
        r = await stats(srv)
        return r["failed_connections"] == 1 and r["connections"] == 0
    await wait_for(failed, what="the failed connection to be counted")
    assert (await srv.stats()).bytes_in == 0
    # still serving
    assert (await stats(srv))["total_connections"] == 1


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_half_close_both_ways(tmp_path, tls):
    """Each side shuts its write half first in turn; the other direction still drains
    (over TLS: close_notify, and reading goes on)."""
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=5 << 20)
    try:
        async with data_servers(tmp_path) as ds:
            _, cons = await ds.chain(app.target, tls=tls)
            await check_half_close(app, pattern, cons)
    finally:
        app.close()


async def check_half_close(app: PatternApp, pattern: Pattern, cons) -> None:
    """Shared by the plain and TLS tests (see test_builtin_tls)."""
    # 1. The producer sends 5 MiB and half-closes at once; the consumer reads all of it
    #    and the EOF, and only then sends its 3 MiB.
    def consumer_reads_first() -> tuple[int, bool]:
        with socket.create_connection(entry(cons), 10) as s:
            s.settimeout(60)
            got = pattern.recv_check(s)
            pattern.send(s, 3 << 20)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
            return got
    assert await asyncio.to_thread(consumer_reads_first) == (5 << 20, True)
    await wait_for(lambda: len(app.results) == 1 and app.results[0].received == 3 << 20, 30)
    assert app.results[0].intact and not app.results[0].error

    # 2. The consumer sends 3 MiB and half-closes; it still gets the producer's 5 MiB.
    def consumer_closes_first() -> tuple[int, bool]:
        with socket.create_connection(entry(cons), 10) as s:
            s.settimeout(60)
            pattern.send(s, 3 << 20)
            s.shutdown(socket.SHUT_WR)
            return pattern.recv_check(s)
    assert await asyncio.to_thread(consumer_closes_first) == (5 << 20, True)
    await wait_for(lambda: len(app.results) == 2 and app.results[1].received == 3 << 20, 30)
    assert app.results[1].intact and not app.results[1].error


async def test_per_connection_counters(tmp_path):
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=0)
    try:
        async with data_servers(tmp_path) as ds:
            srv = await ds.start("PROD", [app.target])
            s = await asyncio.to_thread(socket.create_connection, entry(srv), 10)
            try:
                await asyncio.to_thread(pattern.send, s, 3 << 20)

                async def counted():
                    conns = await srv.connections()
                    return len(conns) == 1 and conns[0]["bytes_in"] == 3 << 20 and conns
                conns = await wait_for(counted, what="the connection's counter")
                assert conns[0]["listener"] == 0 and conns[0]["state"] == "open"
                assert conns[0]["target"] == app.target and conns[0]["bytes_out"] == 0
            finally:
                s.close()
            assert await wait_for(lambda: _no_conns(srv), what="the connection to go")
    finally:
        app.close()


async def _no_conns(srv) -> bool:
    return await srv.connections() == []


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_stop_mid_transfer_ends_flow_and_frees_ports(tmp_path, tls):
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=64 << 30)   # far more than will ever be sent
    try:
        async with data_servers(tmp_path) as ds:
            prod, cons = await ds.chain(app.target, tls=tls)
            s = await asyncio.to_thread(socket.create_connection, entry(cons), 10)
            s.settimeout(30)
            try:
                first = await asyncio.to_thread(pattern.recv_check, s, 8 << 20)
                assert first == (8 << 20, True)
                await cons.stop()
                await prod.stop()
                # the consumer sees the end of the stream (EOF or reset), not a hang
                rest = await asyncio.to_thread(_drain_until_closed, s)
                assert rest < 64 << 30
            finally:
                s.close()
            for port in prod.spec.ports + cons.spec.ports:
                assert port_is_free(port), f"port {port} still taken"
            assert await ds.sessions() == {}
    finally:
        app.close()


def _drain_until_closed(s: socket.socket) -> int:
    n = 0
    try:
        while chunk := s.recv(1 << 20):
            n += len(chunk)
    except ConnectionResetError:
        pass
    return n


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_descriptors_pauses_accepting_then_recovers(tmp_path, echo_server):
    import resource
    import time
    async with data_servers(tmp_path) as ds:
        srv = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        pid = await ds.worker_of(srv)
        assert await echo_roundtrip(*entry(srv), b"before") == b"before"
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))   # accept() gets EMFILE
        blocked = await asyncio.to_thread(socket.create_connection, entry(srv), 10)
        try:
            blocked.sendall(b"waiting in the backlog")
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(1.0)   # a measurement window, not a synchronisation
            spent = _cpu_seconds(pid) - cpu0
            assert spent < 0.5 * (time.monotonic() - t0), f"the worker spun while out of descriptors ({spent:.2f} s)"
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            blocked.settimeout(10)
            got = await asyncio.to_thread(blocked.recv, 100)
            assert got == b"waiting in the backlog"[:len(got)] and got
        finally:
            blocked.close()
        assert await echo_roundtrip(*entry(srv), b"after") == b"after"
        assert "pausing it" in ds.log


async def test_ipv6_listener_and_target(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        prod = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"], host="::1")
        cons = await ds.start("CONS", [f"[::1]:{prod.spec.ports[0]}"], host="::1")
        payload = os.urandom(1 << 20)
        assert await echo_roundtrip("::1", cons.spec.ports[0], payload) == payload

        async def counted():
            s = await prod.stats()
            return s.connections == 0 and s.bytes_in == s.bytes_out == len(payload)
        await wait_for(counted, what="the PROD side to count the bytes")


async def test_connections_spread_over_workers(tmp_path):
    """With several worker processes, a burst of long connections on one listener is
    shared out over two of them, and the session's counters add up over all of them."""
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=0)
    socks = []
    try:
        async with data_servers(tmp_path, workers=3) as ds:
            srv = await ds.start("PROD", [app.target])
            assert len(await ds.worker_pids()) == 3
            for _ in range(9):
                socks.append(await asyncio.to_thread(socket.create_connection, entry(srv), 10))
            for s in socks:
                await asyncio.to_thread(pattern.send, s, 1 << 20)

            async def all_counted():
                conns = await srv.connections()
                return len(conns) == 9 and all(c["bytes_in"] == 1 << 20 for c in conns) and conns
            conns = await wait_for(all_counted, what="nine connections to carry 1 MiB each")
            # one listener is served by two workers (its home and a second one): the home
            # worker keeps a connection, hands the next to the second while it carries one
            per_worker = {w: sum(c["worker"] == w for c in conns) for w in range(3)}
            used = [n for n in per_worker.values() if n]
            assert len(used) == 2 and min(used) >= 4, per_worker
            for s in socks:
                s.close()

            async def closed():
                st = await srv.stats()
                return st.connections == 0 and st.bytes_in == 9 << 20 and st.total_connections == 9
            await wait_for(closed, what="the counters of every worker to add up")
    finally:
        for s in socks:
            s.close()
        app.close()


def test_keepalive_setting():
    from scistream.data.spec import keepalive_setting
    assert keepalive_setting(None) == (60, 15, 4)          # the default: a dead peer goes within 2 min
    assert keepalive_setting([5, 2, 3]) == (5, 2, 3)
    assert keepalive_setting([0, 0, 0]) == (0, 0, 0)       # off
    for bad in ([1, 0, 3], [1, 2], "60", [-1, 1, 1]):
        with pytest.raises(ValueError, match="keepalive"):
            keepalive_setting(bad)


def test_loopback_sndbuf_setting(caplog):
    """SCISTREAM_LOOPBACK_SNDBUF: bytes, 0 for the kernel's autotuning; anything else is
    said in the log and the default (512 KiB) is used, so a typo cannot stop the workers."""
    from scistream.data.engine.conn import _loopback_sndbuf
    assert _loopback_sndbuf(None) == 512 << 10
    assert _loopback_sndbuf("") == 512 << 10
    assert _loopback_sndbuf("262144") == 262144
    assert _loopback_sndbuf(" 0 ") == 0
    for bad in ("512k", "-1", "1.5"):
        caplog.clear()
        assert _loopback_sndbuf(bad) == 512 << 10
        assert "SCISTREAM_LOOPBACK_SNDBUF" in caplog.text and repr(bad) in caplog.text


async def test_both_sockets_of_a_connection_have_keepalive(tmp_path, echo_server):
    """Seen from outside, as the kernel reports it (``ss -o``): a keepalive timer on the
    accepted socket and on the one to the target. (tests/netns: a cut link is detected.)"""
    async with data_servers(tmp_path) as ds:
        srv = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        host, port = entry(srv)
        r, w = await asyncio.open_connection(host, port)
        try:
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            proc = await asyncio.create_subprocess_exec(
                "ss", "-tnoH", "state", "established", stdout=asyncio.subprocess.PIPE)
            out = (await proc.communicate())[0].decode()
            # columns: Recv-Q Send-Q local peer timer
            accepted = [ln for ln in out.splitlines() if ln.split()[2].endswith(f"127.0.0.1:{port}")]
            to_target = [ln for ln in out.splitlines() if ln.split()[3].endswith(f"127.0.0.1:{echo_server[1]}")]
            assert accepted and all("timer:(keepalive" in ln for ln in accepted), out
            assert to_target and all("timer:(keepalive" in ln for ln in to_target), out
        finally:
            w.close()
