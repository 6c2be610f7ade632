"""HAProxy, nginx and stunnel backends: lifecycle. Retarget without dropping established
connections, crash detection, missing binaries, configuration and bind errors reported
in the binary's own words, idle streams that survive, re-adoption, rate settings."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time

import pytest

from scistream.data.backends import common, nginx
from scistream.data.base import BackendUnavailable, get_backend
from scistream.data.spec import DataSpec
from scistream.data.supervise import children
from scistream.errors import DataServerError, InvalidArgument
from conftest import async_wait_until, free_ports, port_is_free
from test_backends_support import EXTERNAL, App, Chain, leftover, roundtrip, secret


# A well-formed target the proxies' own configuration checks refuse, found without a DNS
# query (no test may reach the machine's DNS server): a link-local address scoped to an
# interface that does not exist. Names never get this far in a session anyway: the
# session manager resolves them and hands the data servers addresses.
UNUSABLE = "[fe80::1%nosuchif]:5000"


async def exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 15)


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_retarget_keeps_established_connection(kind, tmp_path):
    """Update on a connected session: the open stream stays with the old producer
    endpoint and keeps flowing; new connections reach the new one."""
    async with App(tag=b"A") as a, App(tag=b"B") as b, \
            Chain(kind, tmp_path, [a.endpoint], n=2, secret=secret()) as chain:
        r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
        try:
            assert await asyncio.wait_for(r.readexactly(1), 15) == b"A"
            before = os.urandom(1 << 20)
            assert await exchange(r, w, before) == before
            await chain.prod.retarget((b.endpoint, b.endpoint))
            assert chain.prod.spec.targets == (b.endpoint, b.endpoint)
            after = os.urandom(1 << 20)
            assert await exchange(r, w, after) == after  # same connection, still alive
            for port in chain.entries:
                got = await roundtrip(port, b"new")
                assert got == b"Bnew"
            assert await exchange(r, w, b"still there") == b"still there"
        finally:
            w.close()
        assert a.accepted == 1 and b.accepted == 2


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_retarget_cons_side(kind, tmp_path):
    """The CONS side re-pointed at another PROD gateway (new WAN listeners)."""
    key = secret()
    async with App(tag=b"1") as one, App(tag=b"2") as two, \
            Chain(kind, tmp_path / "c1", [one.endpoint], n=1, secret=key) as c1, \
            Chain(kind, tmp_path / "c2", [two.endpoint], n=1, secret=key, uid=c1.uid) as c2:
        assert await roundtrip(c1.entries[0], b"x") == b"1x"
        await c1.cons.retarget(c2.cons.spec.targets)
        assert await roundtrip(c1.entries[0], b"x") == b"2x"


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy", "Nginx")])
async def test_failed_retarget_keeps_the_old_targets(kind, tmp_path):
    async with App(tag=b"A") as a, Chain(kind, tmp_path, [a.endpoint], n=1) as chain:
        old = chain.prod.conf_path.read_text()
        with pytest.raises(DataServerError, match="rejected the generated configuration"):
            await chain.prod.retarget((UNUSABLE,))
        assert chain.prod.conf_path.read_text() == old
        assert chain.prod.spec.targets == (a.endpoint,)
        assert await roundtrip(chain.entries[0], b"ok") == b"Aok"


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_kill_9_is_reported_with_a_reason(kind, tmp_path):
    async with App() as app:
        server = get_backend(kind)(DataSpec("11111111-2222-3333-4444-555555555555", "PROD", "127.0.0.1",
                                            free_ports(2), (app.endpoint,) * 2, workdir=tmp_path))
        await server.start()
        try:
            # in the foreground: the proxy is our own child, not a detached daemon
            with open(f"/proc/{server.child.pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
            watcher = asyncio.create_task(server.wait_exit())
            await asyncio.sleep(0)
            assert not watcher.done()
            os.kill(server.child.pid, signal.SIGKILL)
            reason = await asyncio.wait_for(watcher, 15)
            assert kind.lower() in reason and "signal 9" in reason
        finally:
            await server.stop()
        assert leftover(server) == []
        for port in server.spec.ports:
            assert port_is_free(port)


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy",)])
async def test_haproxy_worker_crash_takes_the_master_down(kind, tmp_path):
    async with App() as app:
        server = get_backend(kind)(DataSpec("11111111-2222-3333-4444-555555555555", "PROD", "127.0.0.1",
                                            free_ports(1), (app.endpoint,), workdir=tmp_path))
        await server.start()
        try:
            workers = children(server.child.pid)
            assert workers
            watcher = asyncio.create_task(server.wait_exit())
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            reason = await asyncio.wait_for(watcher, 15)
            assert "exited" in reason and "Killed" in reason  # haproxy's own words, from its log
        finally:
            await server.stop()
        assert leftover(server) == []


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_missing_binary_is_a_clear_error(kind, tmp_path, monkeypatch):
    cls = get_backend(kind)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(cls.env_var, raising=False)
    monkeypatch.setattr(common, "SBIN_DIRS", ())
    with pytest.raises(BackendUnavailable, match=rf"apt-get install {cls.package}"):
        cls.check_available()
    server = cls(DataSpec("11111111-2222-3333-4444-555555555555", "PROD", "127.0.0.1",
                          free_ports(1), ("127.0.0.1:9",), workdir=tmp_path / "w"))
    with pytest.raises(DataServerError, match="not found"):
        await server.start()
    monkeypatch.setenv(cls.env_var, str(empty / "nope"))
    with pytest.raises(BackendUnavailable, match=cls.env_var):
        cls.check_available()


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Nginx"])
def test_missing_nginx_stream_module_is_a_clear_error(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(nginx, "STREAM_MODULE", tmp_path / "ngx_stream_module.so")
    with pytest.raises(BackendUnavailable, match="libnginx-mod-stream"):
        get_backend(kind).check_available()


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_port_in_use_fails_start_with_the_binarys_words(kind, tmp_path):
    """A listener that cannot be bound: start() fails (no OK with nothing listening),
    the message carries the proxy's own error, and nothing is left running."""
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        ports = free_ports(1) + (taken,)
        server = get_backend(kind)(DataSpec("11111111-2222-3333-4444-555555555555", "PROD", "127.0.0.1",
                                            ports, ("127.0.0.1:9",) * 2, workdir=tmp_path))
        with pytest.raises(DataServerError) as err:
            await server.start()
        assert re.search(r"[Aa]ddress already in use|Address in use", str(err.value)), str(err.value)
        assert leftover(server) == []
        assert port_is_free(ports[0])
        await server.stop()
    finally:
        holder.close()


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy", "Nginx")])
async def test_refused_target_is_rejected_before_start(kind, tmp_path):
    server = get_backend(kind)(DataSpec("11111111-2222-3333-4444-555555555555", "PROD", "127.0.0.1",
                                        free_ports(1), (UNUSABLE,), workdir=tmp_path))
    with pytest.raises(DataServerError, match=r"rejected the generated configuration: .*nosuchif"):
        await server.start()
    assert server.child is None


_TIMEOUTS = {
    "Haproxy": r"timeout (?:client|server|tunnel|client-fin|server-fin) (\d+)(\w*)",
    "Nginx": r"proxy_timeout (\d+)(\w*);",
    "Stunnel": r"TIMEOUTidle = (\d+)()",
}
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0.001}


def _sections(kind: str, text: str) -> list[str]:
    """The config's sections; of a HAProxy section with a ``timeout tunnel``, only that line:
    the tunnel timeout supersedes client and server once a stream is up (the short client
    timeout of a TLS WAN listener bounds its handshake; tests/data/test_bad_peers.py checks
    that a quiet stream outlives it)."""
    if kind != "Haproxy":
        return [text]
    out = []
    for section in re.split(r"\n(?=\S)", text):
        tunnel = re.findall(r"timeout tunnel \S+", section)
        out += tunnel or [section]
    return out


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_quiet_stream_survives(kind, tmp_path):
    """No short idle timeout in the config (the original cut quiet streams after 50 s),
    and a 3-s idle gap mid-stream is survived."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret()) as chain:
        for server in (chain.prod, chain.cons):
            found = []
            for section in _sections(kind, server.conf_path.read_text()):
                found += re.findall(_TIMEOUTS[kind], section)
            assert found, "the idle timeout must be explicit"
            for value, unit in found:
                assert int(value) * _UNIT[unit] >= 86400, f"idle timeout {value}{unit} is too short"
        r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
        try:
            assert await exchange(r, w, b"before the gap") == b"before the gap"
            await asyncio.sleep(3)  # the idle gap under test
            assert await exchange(r, w, b"after the gap") == b"after the gap"
        finally:
            w.close()


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_adopt_running_server(kind, tmp_path):
    """A restarted control server takes the proxy over from its handle, then stops it."""
    async with App(tag=b"A") as a, App(tag=b"B") as b, \
            Chain(kind, tmp_path, [a.endpoint], n=2, secret=secret()) as chain:
        old = chain.prod
        handle = old.handle()
        assert handle["pid"] == old.child.pid
        adopted = await type(old).adopt(old.spec, handle)
        assert adopted.child.pid == old.child.pid
        assert await roundtrip(chain.entries[0], b"x") == b"Ax"
        await adopted.retarget((b.endpoint, b.endpoint))
        assert await roundtrip(chain.entries[1], b"y") == b"By"
        watcher = asyncio.create_task(adopted.wait_exit())
        await adopted.stop()
        assert leftover(adopted) == []
        for port in old.spec.ports:
            assert port_is_free(port)
        watcher.cancel()
        with pytest.raises(DataServerError, match="is gone"):
            await type(old).adopt(old.spec, handle)
        await old.stop()  # the original owner's stop is harmless now


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_adopted_server_crash_is_reported(kind, tmp_path):
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1) as chain:
        adopted = await type(chain.cons).adopt(chain.cons.spec, chain.cons.handle())
        watcher = asyncio.create_task(adopted.wait_exit())
        os.kill(adopted.child.pid, signal.SIGKILL)
        reason = await asyncio.wait_for(watcher, 15)
        assert kind.lower() in reason
        await adopted.stop()
        assert leftover(adopted) == []


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Nginx"])
async def test_nginx_shapes_rate_per_connection(kind, tmp_path):
    """rate_kbps is per session: nginx's per-connection limits get rate / listeners."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=2, rate_kbps=8000) as chain:
        text = chain.cons.conf_path.read_text()
        assert "proxy_download_rate 500000;" in text  # 8000 kbit/s = 1 MB/s over 2 listeners
        assert "proxy_upload_rate 500000;" in text
        payload = os.urandom(1 << 20)
        t0 = time.monotonic()
        assert await roundtrip(chain.entries[0], payload) == payload
        # 1 MiB at 0.5 MB/s takes ~2 s; a lower bound only (never fails on a slow machine)
        assert time.monotonic() - t0 > 1.0


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] in ("Haproxy", "Stunnel")])
async def test_unshaped_backends_warn_once(kind, tmp_path, caplog, monkeypatch):
    cls = get_backend(kind)
    monkeypatch.setattr(cls, "_rate_warned", False)
    caplog.set_level(logging.WARNING, logger="scistream.data.backends.common")
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, rate_kbps=1000,
                                   secret=secret()) as chain:
        assert await roundtrip(chain.entries[0], b"z") == b"z"
    warnings = [r for r in caplog.records if "does not shape bandwidth" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_stop_is_idempotent_and_safe_before_start(kind, tmp_path):
    server = get_backend(kind)(DataSpec("11111111-2222-3333-4444-555555555555", "CONS", "127.0.0.1",
                                        free_ports(1), ("127.0.0.1:9",), workdir=tmp_path))
    await server.stop()
    await server.start()
    await server.stop()
    await server.stop()
    assert leftover(server) == []
    assert port_is_free(server.spec.ports[0])


@pytest.mark.parametrize("kind", EXTERNAL)
async def test_bad_spec_is_refused(kind, tmp_path):
    cls = get_backend(kind)
    bad = [DataSpec("u", "PROD", "127.0.0.1", free_ports(2), ("127.0.0.1:9",), workdir=tmp_path),
           DataSpec("u", "PROD", "127.0.0.1; daemon", free_ports(1), ("127.0.0.1:9",), workdir=tmp_path),
           DataSpec("u", "PROD", "127.0.0.1", free_ports(1), ("x;y:9",), workdir=tmp_path)]
    for spec in bad:
        with pytest.raises(InvalidArgument):
            await cls(spec).start()


_TIMER = re.compile(r"timer:\((\w+),(?:(\d+)min)?(?:(\d+)sec)?")


def _keepalive_timers(out: str, local: set[int], peer: set[int]) -> dict[str, list[tuple[str, int]]]:
    """From ``ss -tnoH state established``: (timer kind, seconds left) of the sockets whose
    local port is in ``local`` (accepted by a proxy) or whose peer port is in ``peer``."""
    found: dict[str, list[tuple[str, int]]] = {"accepted": [], "outgoing": []}
    for line in out.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        lport, pport = int(f[2].rpartition(":")[2]), int(f[3].rpartition(":")[2])
        m = _TIMER.search(line)
        timer = (m.group(1), int(m.group(2) or 0) * 60 + int(m.group(3) or 0)) if m else ("none", 0)
        if lport in local:
            found["accepted"].append(timer)
        elif pport in peer:
            found["outgoing"].append(timer)
    return found


@pytest.mark.parametrize("kind", ["Builtin", *EXTERNAL])
async def test_tcp_keepalive_timings_reach_every_proxy_socket(kind, tmp_path):
    """The operator's --tcp-keepalive (here 30 s idle) is what the kernel runs on the
    sockets each data server accepts and opens (nginx: the accepted ones; it has no
    per-upstream setting and keeps the system's there)."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret(),
                                   keepalive=(30, 5, 3)) as chain:
        r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
        try:
            assert await exchange(r, w, b"keepalive") == b"keepalive"

            async def settled():
                """The four sockets, once none has a retransmission timer running (data
                in flight shows as timer:(on,...) until it is acknowledged)."""
                proc = await asyncio.create_subprocess_exec("ss", "-tnoH", "state", "established",
                                                            stdout=asyncio.subprocess.PIPE)
                out = (await proc.communicate())[0].decode()
                t = _keepalive_timers(out, set(chain.all_ports), {app.port, *chain.prod.spec.ports})
                all_ = t["accepted"] + t["outgoing"]
                return (t, out) if len(all_) == 4 and all(k != "on" for k, _ in all_) else None
            timers, out = await async_wait_until(settled, 10, "the chain's sockets to settle")
            for kind_, left in timers["accepted"]:      # CONS's and PROD's accepted sockets
                assert kind_ == "keepalive" and left <= 30, (timers, out)
            for kind_, left in timers["outgoing"]:      # CONS -> PROD and PROD -> app
                assert kind_ == "keepalive", (timers, out)
                if kind != "Nginx":
                    assert left <= 30, (timers, out)
        finally:
            w.close()


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Haproxy"])
async def test_haproxy_counters_survive_a_reload(kind, tmp_path):
    """Bytes carried before a retarget (a reload: a new worker with counters at zero) are
    still in the session's counters afterwards, and new bytes add to them."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=1, secret=secret()) as chain:
        first = os.urandom(1 << 20)
        assert await roundtrip(chain.entries[0], first) == first

        async def prod_bytes_at_least(n: int):
            st = await chain.prod.stats()
            return st if st.bytes_in >= n and st.bytes_out >= n and st.connections == 0 else None
        await async_wait_until(lambda: prod_bytes_at_least(1 << 20), 15, "the first connection's bytes")
        await chain.prod.retarget((app.endpoint,))
        st = await chain.prod.stats()
        assert st.bytes_in >= 1 << 20 and st.total_connections >= 1, st   # not back to zero
        second = os.urandom(1 << 20)
        assert await roundtrip(chain.entries[0], second) == second
        st = await async_wait_until(lambda: prod_bytes_at_least(2 << 20), 15, "both connections' bytes")
        assert st.total_connections == 2, st


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Stunnel"])
async def test_stunnel_relay_is_owned_with_stunnel(kind, tmp_path):
    """stunnel runs behind our relay (its plain sides are Unix sockets to it), both in the
    process group the server owns: after a stream, a kill -9 of the PROD relay takes the
    session down with a reason, and stop leaves no process, port or socket file."""
    async with App() as app, Chain(kind, tmp_path, [app.endpoint], n=2, secret=secret()) as chain:
        r, w = await asyncio.open_connection("127.0.0.1", chain.entries[0])
        try:
            assert await exchange(r, w, b"x") == b"x"
        finally:
            w.close()
        servers = (chain.prod, chain.cons)
        paths = [s.plain_path(i) for s in servers for i in range(2)]
        assert all(os.path.exists(p) for p in paths)
        for server in servers:
            assert server.relayed and len(leftover(server)) == 2, leftover(server)   # relay + stunnel
        watcher = asyncio.create_task(chain.prod.wait_exit())
        os.kill(chain.prod.child.pid, signal.SIGKILL)
        assert "signal 9" in await asyncio.wait_for(watcher, 15)
    for server in servers:
        assert leftover(server) == []
        assert all(port_is_free(p) for p in server.spec.ports)
    assert not any(os.path.exists(p) for p in paths)


@pytest.mark.parametrize("kind", [p for p in EXTERNAL if p.values[0] == "Stunnel"])
async def test_stunnel_starts_over_the_socket_files_of_a_killed_one(kind, tmp_path):
    """A session's stunnel and relay killed outright leave their Unix socket files behind
    (stunnel does not bind over one): the next start of the same session removes them."""
    async with App() as app:
        spec = DataSpec("11111111-2222-3333-4444-555555555555", "CONS", "127.0.0.1", free_ports(1),
                        (app.endpoint,), workdir=tmp_path)
        server = get_backend(kind)(spec)
        await server.start()
        path = server.plain_path(0)
        try:
            os.killpg(server.child.pid, signal.SIGKILL)
            await async_wait_until(lambda: leftover(server) == [], 10, "the group to die")
            assert os.path.exists(path)
        finally:
            await server.stop()
        os.mknod(path, 0o600 | 0o140000)    # as a killed stunnel leaves it: a socket file
        again = get_backend(kind)(spec)
        await again.start()
        try:   # started: the relay on the port, stunnel on the Unix socket
            assert await again._ready() and path in common.unix_listening(leftover(again))
        finally:
            await again.stop()
        assert leftover(again) == [] and not os.path.exists(path)
