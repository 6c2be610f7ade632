"""Durable sessions: the store, re-adoption after a clean stop or a kill -9, nothing orphaned.

The kill -9 test runs two real ``s2cs`` processes with a real transfer going through them:
the control servers die mid-transfer, come back on the same state directories and port
ranges, re-adopt the data servers, and every byte arrives; release then frees it all.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (roundtrip_ok, async_wait_until, connect_session, new_uid, parse_listener, port_block,
                      still_listening)
from scistream.client import AsyncClient
from scistream.control.recovery import processes_under
from scistream.control.store import SessionRecord, SqliteStore, StoreError
from scistream.data.node.client import call_once
from scistream.data.supervise import group_members, pid_alive



# -- the store ---------------------------------------------------------------------------
async def test_store_roundtrip_modes_and_secret_erased(tmp_path):
    store = SqliteStore(tmp_path / "sessions.db", node="n1")
    await store.open()
    secret = os.urandom(32)
    live = SessionRecord(uid=new_uid(), role="PROD", created=time.time(), state="connected",
                         owner_id="alice", wan_secret=secret, data={"ports": [5100, 5101]})
    await store.put(live)
    (got,) = await store.active()
    assert (got.uid, got.state, got.wan_secret, got.data) == (live.uid, "connected", secret, live.data)
    for suffix in ("", "-wal", "-shm"):
        mode = stat.S_IMODE(os.stat(f"{tmp_path / 'sessions.db'}{suffix}").st_mode)
        assert mode == 0o600, f"sessions.db{suffix} has mode {oct(mode)}"
    live.state, live.ended = "released", time.time()
    await store.put(live)
    assert await store.active() == []
    (ended,) = await store.history(10)
    assert ended.state == "released" and ended.wan_secret is None
    # the secret is gone from the file itself, not only from the answer
    raw = sqlite3.connect(tmp_path / "sessions.db").execute("SELECT wan_secret FROM sessions").fetchall()
    assert raw == [(None,)]
    # another node's records are not this node's
    other = SqliteStore(tmp_path / "sessions.db", node="n2")
    await other.open()
    assert await other.history(10) == []
    await other.close()
    await store.close()


async def test_store_schema_version_and_newer_refused(tmp_path):
    path = tmp_path / "sessions.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.execute("PRAGMA user_version=2")
    db.close()
    with pytest.raises(StoreError, match=r"schema version 2, newer than this scistream knows \(1\)"):
        await SqliteStore(path).open()


async def test_store_group_commit_and_prune(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    recs = [SessionRecord(uid=new_uid(), role="CONS", created=time.time() + i, state="expired",
                          owner_id="bob", ended=1000.0 + i) for i in range(300)]
    await asyncio.gather(*(store.put(r) for r in recs))
    assert len(await store.history(1000)) == 300
    assert store.commits < 300  # concurrent writes share transactions
    assert await store.prune(keep=50) == 250
    kept = await store.history(1000)
    assert [r.ended for r in kept] == [1000.0 + i for i in range(299, 249, -1)]
    await store.close()


#: The built-in type: its sessions live in the node service, a process of its own (in its
#: own process group) that outlives the control server and is re-adopted by the next one.
PROCESS = "Builtin"


def service_pid(session) -> int:
    """The pid of the node service that carries a session."""
    return session.server.handle()["service_pid"]


async def _empty(pending) -> bool:
    return not await pending


def data_processes(state_dir: Path) -> list[int]:
    """The data-plane processes started from a state directory: the node service (its
    socket is ``STATE_DIR/node.sock``), and any per-session process under ``sessions/``."""
    return processes_under(state_dir)


# -- in-process: clean stop without drain, then a new server on the same state ---------
async def test_clean_stop_keeps_connected_then_readopt_and_release(servers, client_for, echo_server, tmp_path):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(), await servers()
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep)
    await roundtrip_ok(c.listeners[0])
    assert (await client_for(prod).status(uid)).sessions[0].bytes_in == 1 << 20
    await client_for(prod).update(uid, "PROD", p.prod_listeners, p.wan_secret)  # re-target: saved
    sd_p, range_p = prod.state_dir, prod.config.port_range
    pids = [pid for s in prod.registry.active.values() for pid in s.server.pids]
    await prod.stop(release=False)
    assert all(pid_alive(p) for p in pids)
    await roundtrip_ok(c.listeners[1])  # the data path does not need the control server
    prod2 = await servers(state_dir=sd_p, port_range=range_p)
    s = prod2.registry.active[(uid, "PROD")]
    assert s.state.value == "connected" and s.server.pids == pids
    assert prod2.registry.ports.used == set(s.ports)
    st = (await client_for(prod2).status(uid)).sessions[0]
    assert st.state == "connected" and list(st.listeners) == list(p.listeners)
    assert st.bytes_in == st.bytes_out == 2 << 20  # counted once: the adopted server's own counters
    await roundtrip_ok(c.listeners[0])
    await client_for(prod2).release(uid)
    await client_for(cons).release(uid)
    assert prod2.registry.ports.used == set()
    await async_wait_until(lambda: not any(pid_alive(p) for p in pids), what="data server gone")
    for listener in p.listeners:
        assert not await still_listening([listener])
    st = (await client_for(prod2).status(uid)).sessions[0]
    assert st.state == "released" and st.ended > 0 and st.bytes_in == st.bytes_out == 3 << 20


async def test_ready_session_keeps_its_update_deadline_across_a_restart(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 2))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await req
    ready_at = srv.registry.active[(uid, "PROD")].ready_at
    assert 0 < ready_at <= time.time()
    sd, port_range = srv.state_dir, srv.config.port_range
    await srv.stop(release=False)
    srv2 = await servers(state_dir=sd, port_range=port_range, update_timeout=1.5)
    s = srv2.registry.active[(uid, "PROD")]
    assert s.state.value == "ready" and s.ready_at == ready_at   # the hello's time, not the restart's
    await async_wait_until(lambda: not srv2.registry.active, timeout=10, what="update deadline")
    st = (await client_for(srv2).status(uid)).sessions[0]
    assert st.state == "expired" and "no update within 1.5 s" in st.last_error
    assert srv2.registry.ports.used == set()


async def test_data_server_died_while_down_is_restarted(servers, client_for, echo_server):
    """The node service killed while the control server was down: the next control server
    starts a new one and puts the session back on its ports."""
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(server_type=PROCESS), await servers(server_type=PROCESS)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep)
    await roundtrip_ok(c.listeners[0])
    sd, rng = cons.state_dir, cons.config.port_range
    old_pid = service_pid(cons.registry.active[(uid, "CONS")])
    await cons.stop(release=False)
    os.killpg(old_pid, signal.SIGKILL)
    await async_wait_until(lambda: not pid_alive(old_pid), what="the node service killed")
    cons2 = await servers(state_dir=sd, port_range=rng, server_type=PROCESS)
    st = (await client_for(cons2).status(uid)).sessions[0]
    assert st.state == "connected"
    assert "restarted" in st.last_error and "stopped while the control server was down" in st.last_error
    assert service_pid(cons2.registry.active[(uid, "CONS")]) != old_pid
    for listener in c.listeners:  # same listeners, same WAN secret: the chain works again
        await roundtrip_ok(listener)
    st = (await client_for(cons2).status(uid)).sessions[0]
    assert st.bytes_in == 3 << 20  # what the dead server carried + the new one
    await client_for(cons2).release(uid)
    await client_for(prod).release(uid)
    assert cons2.registry.ports.used == set()


async def test_data_server_that_cannot_restart_fails_with_reason(servers, client_for, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(server_type=PROCESS), await servers(server_type=PROCESS)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep, num_conn=1)
    sd, rng = cons.state_dir, cons.config.port_range
    old_pid = service_pid(cons.registry.active[(uid, "CONS")])
    await cons.stop(release=False)
    os.killpg(old_pid, signal.SIGKILL)
    # the whole group (the service and its workers, which hold the listeners) is gone
    await async_wait_until(lambda: not group_members(old_pid), what="the node service killed")
    squatter = await asyncio.start_server(lambda r, w: w.close(), *parse_listener(c.listeners[0]))
    async with squatter:  # another program took the port meanwhile
        cons2 = await servers(state_dir=sd, port_range=rng, server_type=PROCESS)
        st = (await client_for(cons2).status(uid)).sessions[0]
    assert st.state == "failed" and st.ended > 0
    assert "could not be restarted" in st.last_error
    assert cons2.registry.active == {} and cons2.registry.ports.used == set()
    await client_for(prod).release(uid)


async def test_orphaned_process_of_an_ended_session_is_stopped(servers, tmp_path):
    sd = tmp_path / "state"
    orphan_dir = sd / "sessions" / f"{new_uid()}-PROD"
    orphan_dir.mkdir(parents=True)
    script = orphan_dir / "s2ds.json"
    script.write_text("{}")
    # what a data server looks like: its own process group, its config in a session directory
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(script)],
                            start_new_session=True)
    try:
        await async_wait_until(lambda: proc.pid in processes_under(sd / "sessions"), what="orphan visible")
        await servers(state_dir=sd)
        assert proc.wait(10) is not None
        assert not orphan_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- real processes: kill -9 in the middle of a transfer --------------------------------
async def _start(s2cs_process, *args):
    return await asyncio.to_thread(s2cs_process, *args)


async def test_kill9_mid_transfer_restart_readopts_everything(s2cs_process, tmp_path, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sides = {"prod": (tmp_path / "prod-state", port_block()), "cons": (tmp_path / "cons-state", port_block())}
    args = {k: ["--state-dir", str(sd), "--port-range", rng, "--hello-timeout", "30", "--type", PROCESS]
            for k, (sd, rng) in sides.items()}
    procs = {k: await _start(s2cs_process, *a) for k, a in args.items()}
    clients = {k: AsyncClient(p.target, insecure=True) for k, p in procs.items()}
    try:
        uid, p, c = await connect_session(clients["prod"], clients["cons"], ep, num_conn=2, rate=80_000)
        pending = new_uid()  # a req still waiting for its hello when the server dies
        waiting = asyncio.create_task(clients["prod"].req(pending, "PROD", 3))
        await async_wait_until(lambda: (procs["prod"].state_dir / "sessions.db").exists(), what="db")

        payload = os.urandom(32 << 20)  # ~3.4 s each way at the session's 80 Mbit/s
        received = bytearray()
        r, w = await asyncio.open_connection(*parse_listener(c.listeners[0]))

        restarted = asyncio.Event()

        async def send() -> None:  # the last quarter only once the control servers are back
            for i in range(0, len(payload), 1 << 16):
                if i == len(payload) * 3 // 4:
                    await restarted.wait()
                w.write(payload[i:i + (1 << 16)])
                await w.drain()
            w.write_eof()

        async def recv() -> None:
            while chunk := await r.read(1 << 16):
                received.extend(chunk)

        transfer = asyncio.gather(send(), recv())
        await async_wait_until(lambda: len(received) >= 4 << 20, timeout=30, what="4 MiB through")
        before_kill = {k: data_processes(sd) for k, (sd, _) in sides.items()}
        for proc in procs.values():
            proc.proc.send_signal(signal.SIGKILL)
        for proc in procs.values():
            await asyncio.to_thread(proc.proc.wait, 10)
        at_kill = len(received)
        await async_wait_until(lambda: len(received) >= at_kill + (1 << 20), timeout=30,
                               what="bytes flowing with both control servers dead")
        with pytest.raises(Exception):
            await waiting  # its req died with the server
        for c_ in clients.values():
            await c_.close()
        procs = {k: await _start(s2cs_process, *a) for k, a in args.items()}
        clients = {k: AsyncClient(p.target, insecure=True) for k, p in procs.items()}
        mid = len(received)
        st = {k: (await cl.status(uid)).sessions[0] for k, cl in clients.items()}
        assert st["prod"].state == st["cons"].state == "connected"
        assert list(st["prod"].listeners) == list(p.listeners)
        assert list(st["cons"].listeners) == list(c.listeners)
        assert st["cons"].connections >= 1 and st["cons"].bytes_out > 0
        (gone,) = (await clients["prod"].status(pending)).sessions
        assert gone.state == "released" and "restarted before the hello" in gone.last_error
        assert mid < len(payload)
        restarted.set()

        await asyncio.wait_for(transfer, 60)
        w.close()
        assert len(received) == len(payload), (len(received), len(payload))
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        if os.environ.get("SCISTREAM_TEST_VERBOSE"):
            print(f"received at kill {at_kill}, at restart {mid}, total {len(received)}")
        await roundtrip_ok(c.listeners[1], 4 << 20)  # a new connection after the restart

        s2ds = {k: data_processes(sd) for k, (sd, _) in sides.items()}
        assert all(len(v) == 1 for v in s2ds.values()), s2ds
        assert s2ds == before_kill, (s2ds, before_kill)      # re-adopted, not started again
        await clients["prod"].release(uid)
        await clients["cons"].release(uid)
        for k, (sd, _) in sides.items():
            async def carried(sd=sd) -> dict:
                return (await call_once(sd / "node.sock", {"op": "list"}))["sessions"]
            await async_wait_until(lambda: _empty(carried()), what=f"{k} node service to carry nothing")
        for listener in list(p.listeners) + list(c.listeners):
            assert not await still_listening([listener])
        # the whole port range is free again: one req can take every port of it
        rng = sides["prod"][1]
        lo, hi = (int(x) for x in rng.split("-"))
        whole = new_uid()
        req = asyncio.create_task(clients["prod"].req(whole, "PROD", hi - lo + 1))
        await clients["prod"].hello(whole, "PROD", [ep])
        assert len((await req).listeners) == hi - lo + 1
        await clients["prod"].release(whole)
    finally:
        for c_ in clients.values():
            await c_.close()


async def test_sigterm_keeps_sessions_and_drain_releases(s2cs_process, tmp_path, echo_server):
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sd, rng = tmp_path / "state", port_block()
    args = ["--state-dir", str(sd), "--port-range", rng, "--type", PROCESS]
    srv = await _start(s2cs_process, *args)
    c = AsyncClient(srv.target, insecure=True)
    try:
        uid = new_uid()
        req = asyncio.create_task(c.req(uid, "PROD", 1))
        await c.hello(uid, "PROD", [ep])
        resp = await req
        await c.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
        assert await asyncio.to_thread(srv.stop) == 0  # SIGTERM, clean exit
        (pid,) = data_processes(sd)
        assert pid_alive(pid)
        await c.close()
        srv = await _start(s2cs_process, *args, "--drain")
        c = AsyncClient(srv.target, insecure=True)
        assert (await c.status(uid)).sessions[0].state == "connected"
        assert await asyncio.to_thread(srv.stop) == 0  # SIGTERM with --drain: released
        await async_wait_until(lambda: not pid_alive(pid), what="drained node service stopped")
        assert not await still_listening(resp.listeners[:1])
        await c.close()
        srv = await _start(s2cs_process, *args)
        c = AsyncClient(srv.target, insecure=True)
        st = (await c.status(uid)).sessions[0]
        assert st.state == "released" and "--drain" in st.last_error
    finally:
        await c.close()
