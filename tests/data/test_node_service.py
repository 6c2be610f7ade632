"""The node service (``s2ds serve``): every Builtin session of a node in one long-lived
data plane with worker processes. Real control servers, real service and worker
processes, real bytes through both gateways, content verified.

* a session is added and removed in place: no process starts or stops;
* 200 sessions on one service, bytes verified on a sample, everything freed after;
* ``kill -9`` of a worker: the streams on the other worker do not notice, the killed
  worker's listeners accept again (same ports) and carry new streams;
* ``s2ds restart``: a connection loop never sees a refused connection;
* the service itself killed: the control server starts a new one and puts its sessions back;
* ``s2cs`` killed (-9) and restarted: it re-adopts the running service and its sessions;
* an operator-run service (``s2cs --data-service``), left running when s2cs stops;
* ``--max-session-conns``: connections past the cap are refused and counted.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import subprocess
import termios
import time

import pytest

from scistream.client import AsyncClient
from scistream.data.node.client import call_once
from scistream.data.engine import compiled
from scistream.data.engine.conn import LOOPBACK_SNDBUF
from scistream.data.supervise import children, pid_alive

from builtin_support import LoneWorker
from conftest import (roundtrip_ok, BIN, async_wait_until, connect_session, parse_listener,
                        port_block, still_listening)



async def node_status(srv) -> dict:
    return await call_once(srv.node.path, {"op": "status"})


def pids_of(status: dict) -> list[int]:
    return [w["pid"] for w in status["workers"]]


class Stream:
    """A long-lived connection through a chain that echoes a chunk now and then."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.sent = 0

    async def open(self) -> "Stream":
        self.r, self.w = await asyncio.open_connection(*parse_listener(self.listener))
        await self.exchange()
        return self

    async def exchange(self, size: int = 64 << 10) -> None:
        payload = os.urandom(size)
        self.w.write(payload)
        await self.w.drain()
        got = await asyncio.wait_for(self.r.readexactly(size), 10)
        assert got == payload
        self.sent += size

    def close(self) -> None:
        self.w.close()


async def test_session_added_and_removed_in_place(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    before = {s: (await node_status(s)) for s in (prod, cons)}
    kids = {s: children(s.node.pid) for s in (prod, cons)}
    assert all(len(st["workers"]) == 2 and st["sessions"] == 0 for st in before.values())
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=2)
    for listener in c.listeners:
        await roundtrip_ok(listener)
    for s in (prod, cons):
        after = await node_status(s)
        assert after["sessions"] == 1
        assert pids_of(after) == pids_of(before[s])          # no process started
        assert children(s.node.pid) == kids[s]
    st = (await client_for(cons).status(uid)).sessions[0]
    assert st.state == "connected" and st.bytes_in == 2 << 20 and st.server_type == "Builtin"
    # two listeners, two workers: the session's streams are spread over both cores
    s = cons.registry.active[(uid, "CONS")]
    cfg = await s.server.config()
    assert sorted(cfg["workers"]) == [0, 1] and sorted(cfg["also"]) == [0, 1]
    # its TLS credentials live in the service's memory: no key file, and none shown
    assert cfg["tls"] and "key_pem" not in cfg and "wan_secret" not in cfg
    for gw in (prod, cons):
        assert not [p for p in gw.state_dir.rglob("*") if p.name.endswith(".pem")]
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)
    assert not await still_listening(list(p.listeners) + list(c.listeners))
    for s in (prod, cons):
        after = await node_status(s)
        assert after["sessions"] == 0 and pids_of(after) == pids_of(before[s])
        assert s.registry.ports.used == set()


async def test_200_sessions_on_one_service(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    n = 200
    prod = await servers(workers=2, port_range=port_block(n + 10))
    cons = await servers(workers=2, port_range=port_block(n + 10))
    pc, cc = client_for(prod), client_for(cons)
    sem = asyncio.Semaphore(20)

    async def one() -> tuple[str, object, object]:
        async with sem:
            return await connect_session(pc, cc, ep, num_conn=1)

    sessions = await asyncio.gather(*(one() for _ in range(n)))
    for s in (prod, cons):
        st = await node_status(s)
        assert st["sessions"] == n
        assert sorted(w["sessions"] for w in st["workers"]) == [n // 2, n // 2]   # least loaded first
    sample = sessions[::20]
    await asyncio.gather(*(roundtrip_ok(c.listeners[0], 256 << 10) for _, _, c in sample))
    for uid, _, _ in sample:
        assert (await cc.status(uid)).sessions[0].bytes_in == 256 << 10
    await asyncio.gather(*(pc.release(uid) for uid, _, _ in sessions))
    await asyncio.gather(*(cc.release(uid) for uid, _, _ in sessions))
    for s in (prod, cons):
        assert (await node_status(s))["sessions"] == 0
        assert s.registry.ports.used == set()
    assert not await still_listening([c.listeners[0] for _, _, c in sample])


async def test_kill9_of_a_worker_touches_only_its_sessions(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    pc, cc = client_for(prod), client_for(cons)
    a = await connect_session(pc, cc, ep, num_conn=1)    # at home on worker 0 of each service
    b = await connect_session(pc, cc, ep, num_conn=1)    # at home on worker 1
    homes = [(await cons.registry.active[(s[0], "CONS")].server.config())["workers"][0] for s in (a, b)]
    assert sorted(homes) == [0, 1]

    async def worker_of(sess, stream: Stream) -> int:
        port = stream.w.get_extra_info("sockname")[1]
        conns = await cons.registry.active[(sess[0], "CONS")].server.connections()
        (c,) = [c for c in conns if c["peer"].endswith(f":{port}")]
        return c["worker"]

    # streams of both sessions until one runs on each worker (the second worker of each
    # listener accepts too: the kernel picks the idle one)
    streams: dict[int, tuple] = {}
    for i in range(40):
        sess = (a, b)[i % 2]
        s = await Stream(sess[2].listeners[0]).open()
        w = await worker_of(sess, s)
        if w in streams:
            s.close()
        else:
            streams[w] = (sess, s)
        if len(streams) == 2:
            break
    assert len(streams) == 2, "no stream landed on the second worker"
    st = await node_status(cons)
    victim_w = 0
    victim_sess, victim_stream = streams[0]
    other_sess, other_stream = streams[1]
    victim, other = st["workers"][0]["pid"], st["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    # the killed worker's sessions accept again on the same ports (they never stopped listening)
    await roundtrip_ok(victim_sess[2].listeners[0], 256 << 10)
    back = time.monotonic() - killed
    print(f"listener of the killed worker carried a new stream {back * 1000:.0f} ms after kill -9")
    st = await async_wait_until(
        lambda: _restarted(cons, victim_w, victim), timeout=10, what="the killed worker replaced")
    assert st["workers"][1]["pid"] == other
    # the stream on the other worker did not notice: same connection, bytes intact
    for _ in range(20):
        await other_stream.exchange()
    # the stream the killed worker carried is gone (reset or closed)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError)):
        for _ in range(50):
            await victim_stream.exchange()
    victim_stream.close()
    other_stream.close()
    for sess in (a, b):
        assert (await cc.status(sess[0])).sessions[0].state == "connected"
        await roundtrip_ok(sess[2].listeners[0], 64 << 10)
    for uid in (a[0], b[0]):
        await pc.release(uid)
        await cc.release(uid)
    assert cons.registry.ports.used == set()


async def _restarted(srv, index: int, old_pid: int) -> dict | None:
    st = await node_status(srv)
    w = st["workers"][index]
    return st if w["alive"] and w["pid"] != old_pid and w["restarts"] >= 1 else None


async def test_service_restart_refuses_no_connection(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    pc, cc = client_for(prod), client_for(cons)
    uid, p, c = await connect_session(pc, cc, ep, num_conn=2)
    old_pid = cons.node.pid
    refused = 0
    done = 0
    other = 0
    stop = asyncio.Event()

    async def loop(listener: str) -> None:
        nonlocal refused, done, other
        host, port = parse_listener(listener)
        while not stop.is_set():
            try:
                r, w = await asyncio.open_connection(host, port)
            except ConnectionRefusedError:
                refused += 1
                continue
            except (ConnectionResetError, OSError):
                other += 1          # accepted by an old worker as it stopped: reset, not refused
                continue
            try:
                w.write(b"x" * 1024)
                await w.drain()
                if await asyncio.wait_for(r.readexactly(1024), 10) == b"x" * 1024:
                    done += 1
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                other += 1          # a connection the old workers carried may be reset
            finally:
                w.close()

    loops = [asyncio.create_task(loop(listener)) for listener in c.listeners]
    await async_wait_until(lambda: done >= 50, what="the loop running")
    proc = await asyncio.create_subprocess_exec(str(BIN / "s2ds"), "restart", "--socket", str(cons.node.path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"taken over" in out
    at_restart = done
    await async_wait_until(lambda: done >= at_restart + 50, what="the loop after the restart")
    stop.set()
    await asyncio.gather(*loops)
    assert refused == 0, f"{refused} connections refused ({done} done, {other} reset)"
    new = (await call_once(cons.node.path, {"op": "ping"}))["pid"]
    assert new != old_pid
    await async_wait_until(lambda: not pid_alive(old_pid), what="the old service gone")
    # the control server talks to the new service: stats, retarget, release
    await async_wait_until(lambda: cons.node.pid == new, what="s2cs follows the new service")
    assert (await cc.status(uid)).sessions[0].state == "connected"
    await cc.update(uid, "CONS", p.listeners, p.wan_secret)
    await roundtrip_ok(c.listeners[1])
    await pc.release(uid)
    await cc.release(uid)
    assert not await still_listening(c.listeners)
    assert (await node_status(cons))["sessions"] == 0


async def test_dead_service_is_started_again_with_its_sessions(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=1), await servers(workers=1)
    pc, cc = client_for(prod), client_for(cons)
    uid, p, c = await connect_session(pc, cc, ep, num_conn=2)
    await roundtrip_ok(c.listeners[0])
    old = cons.node.pid
    workers = pids_of(await node_status(cons))
    os.kill(old, signal.SIGKILL)
    await async_wait_until(lambda: not any(pid_alive(x) for x in [old, *workers]), what="service and workers gone")
    def back() -> bool:     # the new pid is known before the sessions are put back
        rec = cons.node.recovering
        return cons.node.pid not in (0, old) and rec is not None and rec.done()
    await async_wait_until(back, timeout=20, what="a new service with the session put back")
    for listener in c.listeners:        # same ports, same secret: the chain works again
        await roundtrip_ok(listener)
    st = (await cc.status(uid)).sessions[0]
    assert st.state == "connected"
    await pc.release(uid)
    await cc.release(uid)
    assert cons.registry.ports.used == set()


async def test_s2cs_kill9_readopts_the_service(s2cs_process, tmp_path, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sd = {k: tmp_path / f"{k}-state" for k in ("prod", "cons")}
    rng = {k: port_block() for k in sd}
    args = {k: ["--state-dir", str(sd[k]), "--port-range", rng[k], "--workers", "2"] for k in sd}
    procs = {k: await asyncio.to_thread(s2cs_process, *args[k]) for k in sd}
    clients = {k: AsyncClient(p.target, insecure=True) for k, p in procs.items()}
    try:
        uid, p, c = await connect_session(clients["prod"], clients["cons"], ep)
        stream = await Stream(c.listeners[0]).open()
        service = {k: (await call_once(sd[k] / "node.sock", {"op": "ping"}))["pid"] for k in sd}
        for proc in procs.values():
            proc.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.proc.wait, 10)
        await stream.exchange()                     # the data plane does not need the control server
        for cl in clients.values():
            await cl.close()
        procs = {k: await asyncio.to_thread(s2cs_process, *args[k]) for k in sd}
        clients = {k: AsyncClient(p.target, insecure=True) for k, p in procs.items()}
        for k in sd:
            assert (await call_once(sd[k] / "node.sock", {"op": "ping"}))["pid"] == service[k]
            st = (await clients[k].status(uid)).sessions[0]
            assert st.state == "connected"
        await stream.exchange()
        stream.close()
        await roundtrip_ok(c.listeners[1])
        await clients["prod"].release(uid)
        await clients["cons"].release(uid)
        assert not await still_listening(list(p.listeners) + list(c.listeners))
        for proc in procs.values():
            assert await asyncio.to_thread(proc.stop) == 0
        for k in sd:                                # nothing left on them: s2cs stopped its service
            await async_wait_until(lambda k=k: not pid_alive(service[k]), what=f"{k} service stopped")
    finally:
        for cl in clients.values():
            await cl.close()


async def test_operator_run_service(servers, client_for, echo_server, tmp_path):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sock = tmp_path / "run" / "node.sock"
    log = open(tmp_path / "s2ds.log", "wb")
    service = subprocess.Popen([str(BIN / "s2ds"), "serve", "--socket", str(sock), "--workers", "2"],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        await async_wait_until(lambda: sock.exists(), timeout=20, what="s2ds serve listening")
        prod = await servers(data_service=sock)
        cons = await servers(data_service=sock)         # both gateways' sessions on one node service
        uid, p, c = await connect_session(client_for(prod), client_for(cons), ep)
        for listener in c.listeners:
            await roundtrip_ok(listener)
        st = await call_once(sock, {"op": "status"})
        assert st["sessions"] == 2
        assert [w["spin"]["us"] for w in st["workers"]] == [50, 50]     # SCISTREAM_SPIN_US's default
        # each worker carries plain copying connections in C (_pump.Hub; these sessions'
        # legs are TLS on the WAN side, so none of theirs: tests/data/test_hub.py), unless
        # the Python pumps were chosen (SCISTREAM_PUMPS=python: no hub)
        hub = compiled.pump is not None
        assert all(isinstance(w["carried"]["events"], int) is hub for w in st["workers"]), st
        await client_for(prod).release(uid)
        await client_for(cons).release(uid)
        await prod.stop()
        await cons.stop()
        assert service.poll() is None                  # not ours to stop
        assert (await call_once(sock, {"op": "status"}))["sessions"] == 0
        r = subprocess.run([str(BIN / "s2ds"), "status", "--socket", str(sock)], capture_output=True, text=True)
        assert r.returncode == 0 and "0 sessions" in r.stdout and "worker 1" in r.stdout
        assert r.stdout.count("spin 50 us:") == 2, r.stdout
        assert r.stdout.count("in C: 0 connections") == (2 if hub else 0), r.stdout
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0
        log.close()
    assert not sock.exists()


async def test_missing_operator_service_is_a_clear_error(servers, tmp_path):
    from scistream.control.server import ConfigError
    with pytest.raises(ConfigError, match="does not answer.*s2ds serve"):
        await servers(data_service=tmp_path / "nothing.sock")


async def test_s2ds_cli_errors(tmp_path):
    r = subprocess.run([str(BIN / "s2ds"), "status", "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 4 and "does not answer" in r.stderr
    r = subprocess.run([str(BIN / "s2ds"), "serve", "--socket", str(tmp_path / "x.sock"), "--workers", "-1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--workers" in r.stderr


async def test_bad_requests_to_the_service_are_refused(servers):
    srv = await servers()
    path = srv.node.path
    from scistream.data.node.client import ServiceError
    bad = [
        ({"op": "nope"}, "unknown op"),
        ({"op": "add", "sid": "x", "cfg": {"role": "MIDDLE"}}, "role must be"),
        ({"op": "add", "sid": "x", "cfg": {"role": "PROD", "ports": [], "targets": ["127.0.0.1:1"],
                                           "listen_host": "127.0.0.1"}}, "ports must be"),
        ({"op": "add", "sid": "x", "cfg": {"role": "PROD", "ports": [1], "targets": ["example.org:80"],
                                           "listen_host": "127.0.0.1"}}, "cannot resolve target"),
        ({"op": "add", "sid": "x", "cfg": {"role": "PROD", "ports": [1], "targets": ["127.0.0.1:1"],
                                           "listen_host": "127.0.0.1", "tls": True}}, "tls needs"),
        ({"op": "targets", "sid": "nobody", "targets": ["127.0.0.1:1"]}, "no session"),
    ]
    for msg, why in bad:
        with pytest.raises(ServiceError, match=why):
            await call_once(path, msg)
    # a port another program holds: refused, and nothing is left reserved in the service
    with __import__("socket").socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServiceError, match="cannot listen"):
            await call_once(path, {"op": "add", "sid": "y", "cfg": {
                "role": "PROD", "ports": [port], "targets": ["127.0.0.1:1"], "listen_host": "127.0.0.1"}})
    assert (await node_status(srv))["sessions"] == 0


async def test_max_session_conns_refuses_and_counts(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(), await servers(max_session_conns=3)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    host, port = parse_listener(c.listeners[0])
    held = []
    for _ in range(3):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
        held.append(w)
    refused = 0
    for _ in range(2):
        try:
            r, w = await asyncio.open_connection(host, port)    # the kernel accepts; the service resets it
        except ConnectionResetError:
            refused += 1
            continue
        try:
            w.write(b"ping")
            got = await asyncio.wait_for(r.read(4), 10)
            refused += got == b""
        except (ConnectionError, OSError):
            refused += 1
        finally:
            w.close()
    assert refused == 2
    details = await cons.registry.active[(uid, "CONS")].server.details()
    assert details["refused_connections"] == 2 and details["connections"] == 3
    for w in held:
        w.close()
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)


C = pytest.mark.compiled


@pytest.mark.parametrize("mode,pumps", [pytest.param("auto", "c", marks=C), pytest.param("copy", "c", marks=C),
                                        ("copy", "python"), pytest.param("splice", "c", marks=C)])
async def test_plain_legs_copy_or_splice(servers, client_for, echo_server, mode, pumps, monkeypatch):
    """--plain-relay: auto copies on loopback legs (cheaper there, measured), with a send
    buffer of LOOPBACK_SNDBUF on both sockets; splice and copy are forced; bytes (both directions, a half-close) are the same either way, with
    the compiled copy pump (SCISTREAM_PUMPS=c, the default where it was built) and with
    the Python one."""
    monkeypatch.setenv("SCISTREAM_PUMPS", pumps)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod = await servers(wan_plaintext=True, plain_relay=mode)
    cons = await servers(wan_plaintext=True, plain_relay=mode)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    stream = await Stream(c.listeners[0]).open()
    conns = await prod.registry.active[(uid, "PROD")].server.connections()
    assert [x["relay"] for x in conns] == ["splice" if mode == "splice" else "copy"]
    # splice is driven from Python whatever SCISTREAM_PUMPS says
    assert [x["pumps"] for x in conns] == ["python" if mode == "splice" else pumps]
    await stream.exchange(4 << 20)
    if mode != "splice":
        # a copied loopback leg: both sockets have SO_SNDBUF = LOOPBACK_SNDBUF (the kernel
        # reports twice that, ss -m "tb"), not autotuning's up to 4 MiB: the consumer's
        # connection on CONS, and PROD's to the echo server
        proc = await asyncio.create_subprocess_exec("ss", "-tnmOH", "state", "established",
                                                    stdout=asyncio.subprocess.PIPE)
        out = (await proc.communicate())[0].decode()
        cons_port = parse_listener(c.listeners[0])[1]
        rows = [ln for ln in out.splitlines() if ln.split()[2].endswith(f":{cons_port}")
                or ln.split()[3].endswith(f"{echo_server[0]}:{echo_server[1]}")]
        assert len(rows) == 2, out
        for ln in rows:
            assert f",tb{2 * LOOPBACK_SNDBUF}," in ln, ln
    stream.close()
    await roundtrip_ok(c.listeners[0], 8 << 20)       # echo_roundtrip half-closes at the end
    st = (await client_for(cons).status(uid)).sessions[0]
    assert st.bytes_in == st.bytes_out == (12 << 20) + (64 << 10)
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)


async def test_streams_on_one_listener_use_both_workers(servers, client_for, echo_server):
    """Several streams through one listener (iperf3 -P 4 does this) are dealt out over the
    workers: the home worker keeps the first, and of those that come while it carries a
    live one, hands every other one to the second worker."""
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    streams = [await Stream(c.listeners[0]).open() for _ in range(4)]
    for srv, role in ((prod, "PROD"), (cons, "CONS")):
        conns = await srv.registry.active[(uid, role)].server.connections()
        assert sorted(x["worker"] for x in conns) == [0, 0, 1, 1], conns
    for s in streams:
        await s.exchange(1 << 20)
        s.close()
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)


async def test_connections_one_after_another_stay_home(servers, client_for, echo_server):
    """A connection that comes when the home worker carries no live connection of its
    listener stays there, so no other worker is woken for it (that cost about 70 µs per
    connection, bench/throughput); the very next one that comes while it is live goes to
    the second worker. Both gateways, plain and TLS legs."""
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    gateways = ((prod, "PROD"), (cons, "CONS"))
    home = {role: (await srv.registry.active[(uid, role)].server.config())["workers"][0]
            for srv, role in gateways}

    async def workers() -> dict[str, list[int]]:
        return {role: sorted(x["worker"] for x in await srv.registry.active[(uid, role)].server.connections())
                for srv, role in gateways}

    async def none_left() -> bool:
        return all(not w for w in (await workers()).values())

    for _ in range(8):
        s = await Stream(c.listeners[0]).open()
        assert await workers() == {role: [home[role]] for _, role in gateways}
        s.close()
        await async_wait_until(none_left, what="the connection closed on both gateways")
    first = await Stream(c.listeners[0]).open()
    second = await Stream(c.listeners[0]).open()
    assert await workers() == {role: [0, 1] for _, role in gateways}
    for s in (first, second):
        await s.exchange(256 << 10)
        s.close()
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)


async def test_connection_handed_to_a_restarting_worker_waits_for_it(servers, client_for, echo_server):
    """kill -9 of the second worker of a listener: a connection the home worker hands it
    meanwhile waits in its inbox (the service keeps the inbox) and is carried by the new
    worker; the home worker's stream does not notice."""
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(workers=2), await servers(workers=2)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    first = await Stream(c.listeners[0]).open()           # at home on both gateways
    home = (await cons.registry.active[(uid, "CONS")].server.config())["workers"][0]
    victim = (await node_status(cons))["workers"][1 - home]["pid"]
    os.kill(victim, signal.SIGKILL)
    second = await Stream(c.listeners[0]).open()          # handed to the killed worker
    await async_wait_until(lambda: _restarted(cons, 1 - home, victim), timeout=10,
                           what="the killed worker replaced")
    conns = await cons.registry.active[(uid, "CONS")].server.connections()
    assert sorted(x["worker"] for x in conns) == [0, 1], conns
    for s in (first, second):
        await s.exchange(256 << 10)
        s.close()
    await client_for(prod).release(uid)
    await client_for(cons).release(uid)


async def test_a_connection_handed_before_its_session_waits_for_it(echo_server):
    """A worker process on its own: a connection arrives in its inbox for a session it does
    not carry yet (a restarted worker reads its inbox before the service has given its
    sessions back); it waits, and is relayed once the session is added (bytes checked)."""
    worker = LoneWorker()
    try:
        client, accepted = worker.connection()
        worker.hand("s1", accepted)

        def taken() -> bool:      # the worker has read the note: nothing left in its inbox
            return struct.unpack("i", fcntl.ioctl(worker.inbox_child.fileno(), termios.FIONREAD, b"\0" * 4))[0] == 0
        await async_wait_until(taken, timeout=20, what="the worker to read its inbox")
        await worker.add_plain("s1", echo_server)         # only now the session
        client.setblocking(False)
        r, w = await asyncio.open_connection(sock=client)
        payload = os.urandom(1 << 20)
        w.write(payload)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(payload)), 10) == payload
        w.close()
    finally:
        worker.close()


@pytest.mark.parametrize("spin_env, spin_us", [(None, 50), ("0", 0)])
async def test_a_busy_worker_spins_before_it_sleeps(echo_server, spin_env, spin_us):
    """A worker process on its own, carrying one connection of small messages back and
    forth (every echo checked): its loop spins between them (SCISTREAM_SPIN_US, default
    50 us), as its ping reports; with SCISTREAM_SPIN_US=0 it never does. Once the
    connection has closed, the worker gives its free heap back (memory_trims)."""
    env = {k: v for k, v in os.environ.items() if k != "SCISTREAM_SPIN_US"}
    if spin_env is not None:
        env["SCISTREAM_SPIN_US"] = spin_env
    worker = LoneWorker(env)
    try:
        r, w = await worker.stream("s1", echo_server)
        for i in range(400):
            msg = b"%05d" % i * 20
            w.write(msg)
            assert await asyncio.wait_for(r.readexactly(len(msg)), 10) == msg
        spin = (await worker.call({"op": "ping"}))["spin"]
        assert spin["us"] == spin_us
        if spin_us:
            assert spin["hits"] + spin["missed"] + spin["gave_way"] > 0, spin
        else:
            assert spin == {"us": 0, "hits": 0, "missed": 0, "gave_way": 0}
        w.close()

        async def trimmed():       # a second after the connection closed, the heap is trimmed
            return (await worker.call({"op": "ping"}))["memory_trims"] > 0
        await async_wait_until(trimmed, timeout=20, what="the worker to give its free heap back")
    finally:
        worker.close()


async def test_operator_run_service_lost_fails_its_sessions(servers, client_for, echo_server, tmp_path):
    """A service s2cs does not own and that does not come back: its sessions fail with the
    reason, and every port they held is free again."""
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sock = tmp_path / "node.sock"
    log = open(tmp_path / "s2ds.log", "wb")
    service = subprocess.Popen([str(BIN / "s2ds"), "serve", "--socket", str(sock), "--workers", "1"],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        await async_wait_until(lambda: sock.exists(), timeout=20, what="s2ds serve listening")
        prod = await servers()
        cons = await servers(data_service=sock)
        uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
        await roundtrip_ok(c.listeners[0])
        service.kill()
        service.wait(10)

        async def failed():
            st = (await client_for(cons).status(uid)).sessions[0]
            return st if st.state == "failed" else None
        st = await async_wait_until(failed, timeout=20, what="the session failed")
        assert "node service" in st.last_error and "gone" in st.last_error, st.last_error
        await async_wait_until(lambda: not cons.registry.ports.used, what="its ports freed")
        await client_for(prod).release(uid)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        log.close()
