"""A facility of several nodes on loopback: two control instances (``s2cs --facility``),
node services registered in a real PostgreSQL (``s2ds serve --store``), real bytes.

Nodes listen on their own loopback addresses (127.0.0.2, 127.0.0.3): a session's
listeners carry its node's address. The CONS side is a single-gateway s2cs.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (BIN, async_wait_until, cons_session, new_uid, parse_listener, prod_session, roundtrip_ok,
                      still_listening)
from scistream.client import AsyncClient

asyncpg = pytest.importorskip("asyncpg")

from facilityhelpers import Node, facility, pg, restarted_node, sql, sql_sync  # noqa: E402,F401  (fixtures too)
from pghelpers import running_postgres  # noqa: E402

LIVE = "('requested', 'ready', 'connected')"


async def live_rows(url: str):
    return await sql(url, f"SELECT uid, role, node, state, ports FROM fsessions WHERE state IN {LIVE}")


async def test_sessions_spread_over_nodes_req_and_hello_on_different_instances(
        facility, servers, client_for, echo_server):
    f = facility(nodes=2, instances=2)
    cons_gw = await servers()
    a, b = (client_for(p.target) for p in f.instances)
    cons = client_for(cons_gw)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    made = []
    for i in range(4):
        x, y = (a, b) if i % 2 == 0 else (b, a)
        uid, prod = await prod_session(x, y, ep, num_conn=2)
        made.append((uid, prod, (await cons_session(cons, uid, prod)).listeners))
    rows = await live_rows(f.url)
    assert {r["node"] for r in rows} == {"dtn1", "dtn2"}          # both nodes carry sessions
    by_uid = {r["uid"]: r for r in rows}
    for uid, prod, cons_listeners in made:
        node = next(n for n in f.nodes if n.name == by_uid[uid]["node"])
        assert all(listener.startswith(f"{node.address}:") for listener in prod.listeners)
        await roundtrip_ok(cons_listeners[0], 256 << 10)        # consumer -> CONS -> node -> producer
    # status on either instance: the node and the instance of each session
    for c in (a, b):
        st = await c.status()
        infos = {s.uid: s for s in st.sessions}
        for uid, _, _ in made:
            assert infos[uid].state == "connected"
            assert infos[uid].node == by_uid[uid]["node"]
            assert infos[uid].instance.endswith(tuple(f":{p.port}" for p in f.instances))
            assert infos[uid].bytes_out >= 256 << 10            # counters from the node
    # release on the other instance from the one that took the req; nothing stays reserved
    for i, (uid, _, _) in enumerate(made):
        await (b if i % 2 == 0 else a).release(uid)
        await cons.release(uid)
    assert await live_rows(f.url) == []
    for n in f.nodes:
        reply = json.loads(subprocess.run([str(BIN / "s2ds"), "status", "--json", "--socket",
                                           str(n.dir / "node.sock")], capture_output=True, text=True,
                                          timeout=30).stdout)
        assert reply["sessions"] == 0


async def test_kill_control_instance_between_req_and_update(facility, servers, client_for, echo_server):
    """The user's client knows both instances (``--s2cs A,B``); A takes the req and is killed
    -9 while the req waits for its hello: the client moves the req to B by itself, where it
    finds the same session (same ports), and completes there with the hello sent to B."""
    f = facility(nodes=1, instances=2)
    user = client_for(",".join(p.target for p in f.instances))     # A first
    app = client_for(f.instances[1].target)                       # the app controller reaches B
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()
    req = asyncio.create_task(user.req(uid, "PROD", 2, 0))
    await async_wait_until(lambda: _has_row(f.url, uid), 10, "the req recorded")
    first = (await sql(f.url, "SELECT instance, ports FROM fsessions WHERE uid = $1", uid))[0]
    assert first["instance"].endswith(f":{f.instances[0].port}")    # A took it
    f.instances[0].proc.send_signal(signal.SIGKILL)
    f.instances[0].proc.wait()
    await app.hello(uid, "PROD", [ep])       # whether the retried req reached B yet or not
    prod = await req
    assert user.target == f.instances[1].target and [u.address for u in user.last_unreachable] == [
        f.instances[0].target]
    await user.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
    rows = await sql(f.url, "SELECT state, ports FROM fsessions WHERE uid = $1", uid)
    assert [r["state"] for r in rows] == ["connected"]                # one session, not two
    assert list(rows[0]["ports"]) == list(first["ports"])
    assert [f"127.0.0.2:{p}" for p in rows[0]["ports"]] == list(prod.listeners)
    await roundtrip_ok((await cons_session(cons, uid, prod)).listeners[0], 256 << 10)
    await cons.release(uid)
    await user.release(uid)
    assert await live_rows(f.url) == []


async def _has_row(url: str, uid: str) -> bool:
    return bool(await sql(url, "SELECT 1 FROM fsessions WHERE uid = $1", uid))


async def test_killed_instance_timers_taken_over(facility, client_for, echo_server):
    """A lease and a hello timeout of sessions whose instance was killed -9 are acted on by the
    surviving instance, once, within a second or two of being due."""
    f = facility(nodes=1, instances=2, extra=("--hello-timeout", "4"))
    a, b = (client_for(p.target) for p in f.instances)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid, prod = await prod_session(a, a, ep, lease=3)
    waiting = new_uid()
    pending = asyncio.create_task(a.req(waiting, "PROD", 1, 0))
    await async_wait_until(lambda: _has_row(f.url, waiting), 10, "the second req recorded")
    f.instances[0].proc.send_signal(signal.SIGKILL)
    f.instances[0].proc.wait()
    with pytest.raises(Exception):
        await pending
    rows = await sql(f.url, "SELECT lease_expires, hello_due FROM fsessions WHERE uid = ANY($1::text[]) "
                            "ORDER BY uid = $2", [uid, waiting], waiting)
    lease_due, hello_due = rows[0]["lease_expires"], rows[1]["hello_due"]

    async def ended(u: str) -> bool:
        r = await sql(f.url, "SELECT state, ended, last_error FROM fsessions WHERE uid = $1", u)
        return r[0]["state"] == "expired" and r[0]
    await async_wait_until(lambda: ended(uid), 15, "the lease acted on by the survivor")
    await async_wait_until(lambda: ended(waiting), 15, "the hello timeout acted on by the survivor")
    r1 = (await sql(f.url, "SELECT ended, last_error FROM fsessions WHERE uid = $1", uid))[0]
    r2 = (await sql(f.url, "SELECT ended, last_error FROM fsessions WHERE uid = $1", waiting))[0]
    assert "lease of 3 s ended" in r1["last_error"]
    assert "no hello within 4 s" in r2["last_error"]
    assert r1["ended"] - lease_due < 2.0 and r2["ended"] - hello_due < 2.0
    # the node no longer carries the expired session: its listener is closed
    await async_wait_until(lambda: _refused(prod.listeners[0]), 10, "the expired session's listener closed")
    assert await live_rows(f.url) == []
    st = await b.status(uid)
    assert st.sessions[0].state == "expired"


async def _refused(listener: str) -> bool:
    host, _, port = listener.rpartition(":")
    try:
        _, w = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    w.close()
    return False


async def test_node_killed_sessions_fail_new_ones_go_to_the_survivor(facility, servers, client_for, echo_server):
    f = facility(nodes=2, instances=2, node_timeout=2.0)
    a, b = (client_for(p.target) for p in f.instances)
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sessions = [await prod_session(a, b, ep) for _ in range(4)]
    cons_of = {uid: (await cons_session(cons, uid, prod)).listeners[0] for uid, prod in sessions}
    rows = await live_rows(f.url)
    assert {r["node"] for r in rows} == {"dtn1", "dtn2"}
    victim = f.nodes[0]
    on_victim = {r["uid"] for r in rows if r["node"] == victim.name}
    killed_at = time.time()
    victim.kill()

    async def failed() -> bool:
        got = await sql(f.url, "SELECT state, last_error, ended FROM fsessions WHERE uid = ANY($1::text[])",
                        list(on_victim))
        return all(r["state"] == "failed" for r in got) and got
    got = await async_wait_until(failed, 15, "the lost node's sessions failed")
    for r in got:
        assert f"node {victim.name} lost: no heartbeat for 2 s" in r["last_error"]
        assert r["ended"] - killed_at < f.node_timeout + 2.0 + 1.0  # heartbeat period + a timer tick
    node_row = (await sql(f.url, "SELECT state, reason FROM nodes WHERE name = $1", victim.name))[0]
    assert node_row["state"] == "lost"
    # nothing of the lost node stays reserved; the survivor's sessions are untouched
    assert {r["node"] for r in await live_rows(f.url)} == {"dtn2"}
    for uid, prod in sessions:
        if uid not in on_victim:
            await roundtrip_ok(cons_of[uid], 128 << 10)
    # new sessions go to the survivor
    for _ in range(2):
        uid, prod = await prod_session(b, a, ep)
        assert prod.listeners[0].startswith("127.0.0.3:")
        await roundtrip_ok((await cons_session(cons, uid, prod)).listeners[0], 128 << 10)
        cons_of[uid] = ""
    # status says why, on either instance
    st = await a.status(next(iter(on_victim)))
    assert st.sessions[0].state == "failed" and "lost" in st.sessions[0].last_error
    # the node comes back: it is up again and carries nothing the store does not list
    victim.start()
    await async_wait_until(lambda: _node_state(f.url, victim.name, "up"), 15, "the node back up")
    for uid in [r["uid"] for r in await live_rows(f.url)]:
        await a.release(uid)
    for uid in cons_of:
        await cons.release(uid)
    assert await live_rows(f.url) == []


async def _node_state(url: str, name: str, state: str) -> bool:
    rows = await sql(url, "SELECT state FROM nodes WHERE name = $1", name)
    return bool(rows) and rows[0]["state"] == state


async def test_drain_undrain_and_list(facility, client_for, echo_server):
    f = facility(nodes=2, instances=1)
    a = client_for(f.instances[0].target)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    s2cs = [str(BIN / "s2cs"), "nodes"]
    out = subprocess.run(s2cs + ["drain", "dtn1", "--store", f.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "node dtn1 drained" in out.stdout
    for _ in range(3):
        _, prod = await prod_session(a, a, ep)
        assert prod.listeners[0].startswith("127.0.0.3:")      # all on dtn2
    listed = json.loads(subprocess.run(s2cs + ["list", "--json", "--store", f.url], capture_output=True,
                                       text=True, timeout=60).stdout)
    by = {n["name"]: n for n in listed["nodes"]}
    assert by["dtn1"]["state"] == "drained" and by["dtn1"]["sessions"] == 0
    assert by["dtn2"]["state"] == "up" and by["dtn2"]["sessions"] == 3 and by["dtn2"]["ports_used"] == 3
    assert [i["address"] for i in listed["instances"]] == [f"127.0.0.1:{f.instances[0].port}"]
    text = subprocess.run(s2cs + ["list", "--store", f.url], capture_output=True, text=True, timeout=60).stdout
    assert "dtn1" in text and "drained" in text and "control instance" in text
    assert subprocess.run(s2cs + ["undrain", "dtn1", "--store", f.url], capture_output=True,
                          timeout=60).returncode == 0
    placed = set()
    for _ in range(4):
        _, prod = await prod_session(a, a, ep)
        placed.add(prod.listeners[0].rsplit(":", 1)[0])
    assert "127.0.0.2" in placed                                 # dtn1 takes sessions again
    bad = subprocess.run(s2cs + ["drain", "nosuch", "--store", f.url], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no node named 'nosuch'" in bad.stderr
    for r in await live_rows(f.url):
        await a.release(r["uid"])


async def test_node_obeys_only_the_facility_token(facility, tmp_path):
    f = facility(nodes=1, instances=1)
    import ssl
    from scistream.data.node.client import ServiceConnection, ServiceError
    row = (await sql(f.url, "SELECT control, cert FROM nodes WHERE name = 'dtn1'"))[0]
    host, _, port = row["control"].rpartition(":")
    ctx = ssl.create_default_context(cadata=row["cert"])
    ctx.check_hostname = False

    def opener():
        return asyncio.open_connection(host, int(port), ssl=ctx)
    for token in ("wrong-token-0123456789", ""):
        conn = ServiceConnection("dtn1", opener=opener, token=token)
        with pytest.raises(ServiceError, match="obeys only its facility's control servers"):
            await conn.call({"op": "list"}, 5, busy_retry=0)
        await conn.close()
    good = ServiceConnection("dtn1", opener=opener, token=f.token.read_text())
    try:
        assert (await good.call({"op": "list"}, 5, busy_retry=0))["sessions"] == {}
        with pytest.raises(ServiceError, match="node's own operator"):
            await good.call({"op": "shutdown"}, 5, busy_retry=0)
        with pytest.raises(ServiceError, match="outside this node's range"):
            await good.call({"op": "add", "sid": "x/PROD", "cfg": {
                "uid": "x", "role": "PROD", "listen_host": "127.0.0.2", "ports": [1], "targets": ["127.0.0.1:9"]}},
                5, busy_retry=0)
    finally:
        await good.close()
    # a TLS client that does not trust the pinned certificate gets nowhere either
    other = ssl.create_default_context()
    with pytest.raises(ssl.SSLError):
        await asyncio.open_connection(host, int(port), ssl=other)


async def test_facility_bad_configuration_is_a_clear_error(pg, tmp_path):
    s2cs = [str(BIN / "s2cs"), "start", "--port", "0", "--auth", "none", "--insecure",
            "--state-dir", str(tmp_path / "sd")]
    token = tmp_path / "t"
    token.write_text("x" * 32)
    token.chmod(0o644)
    url = pg.url(pg.createdb())
    for args, msg in [
        (["--facility"], "--facility needs --store"),
        (["--facility", "--store", url], "--facility needs --node-token-file"),
        (["--facility", "--store", url, "--node-token-file", str(token)], "readable by other users"),
    ]:
        out = subprocess.run(s2cs + args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and msg in out.stderr, out.stderr
    token.chmod(0o600)
    out = subprocess.run(s2cs + ["--facility", "--store", url, "--node-token-file", str(token), "--type", "Haproxy"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--facility places sessions on node services" in out.stderr
    node = subprocess.run([str(BIN / "s2ds"), "serve", "--socket", str(tmp_path / "n.sock"), "--store", url,
                           "--address", "dtn1.example.org", "--token-file", str(token)],
                          capture_output=True, text=True, timeout=60)
    assert node.returncode == 2 and "give this node's IP address" in node.stderr
    node = subprocess.run([str(BIN / "s2ds"), "serve", "--socket", str(tmp_path / "n.sock"), "--store", url,
                           "--address", "127.0.0.2"], capture_output=True, text=True, timeout=60)
    assert node.returncode == 2 and "--store needs --token-file" in node.stderr
    node = subprocess.run([str(BIN / "s2ds"), "serve", "--socket", str(tmp_path / "n.sock"), "--store", url,
                           "--token-file", str(token)], capture_output=True, text=True, timeout=60)
    assert node.returncode == 2 and "--store needs --address" in node.stderr


@pytest.fixture
def own_pg():
    """A PostgreSQL of the test's own (it is stopped and started again)."""
    with running_postgres(restartable=True) as server:
        yield server


async def test_database_restarted_under_load(own_pg, facility, servers, client_for, echo_server):
    """Calls fail clearly while the database is down, running streams keep flowing, and after
    it is back nothing is lost or doubled: every session a client saw set up is one row."""
    f = facility(nodes=1, instances=2, node_timeout=2.0, server=own_pg)
    a, b = (client_for(p.target) for p in f.instances)
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid0, prod0 = await prod_session(a, b, ep)
    stream = (await cons_session(cons, uid0, prod0)).listeners[0]
    done: list[str] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def load(x: AsyncClient, y: AsyncClient) -> None:
        while not stop.is_set():
            try:
                uid, _ = await prod_session(x, y, ep)
                await y.release(uid)
                done.append(uid)
            except Exception as exc:  # noqa: BLE001 - counted and checked below
                errors.append(str(exc))
                await asyncio.sleep(0.05)   # a client's pause before trying again
    workers = [asyncio.create_task(load(a, b)), asyncio.create_task(load(b, a))]
    await async_wait_until(lambda: len(done) >= 6, 30, "sessions set up before the outage")
    await asyncio.to_thread(own_pg.stop)
    before, down_at = len(errors), time.monotonic()
    # an outage longer than --node-timeout: the nodes miss heartbeats, and must not be failed for it
    await async_wait_until(lambda: len(errors) >= before + 4 and time.monotonic() > down_at + 3.0, 30,
                           "calls failing while the database is down")
    await roundtrip_ok(stream, 256 << 10)          # the data plane does not need the database
    down = errors[before:]
    assert all("session store unavailable" in e or "cannot reach" in e for e in down), down[:3]
    with pytest.raises(Exception, match="session store unavailable"):
        await a.status()
    await asyncio.to_thread(own_pg.start)

    async def listening_again() -> bool:   # each instance LISTENs again (its waiting reqs wake on NOTIFY)
        rows = await sql(f.url, "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'LISTEN %'")
        return rows[0]["n"] == 2
    await async_wait_until(listening_again, 30, "both instances listening again")
    n = len(done)
    await async_wait_until(lambda: len(done) >= n + 6, 60, "sessions set up again after the restart")
    stop.set()
    await asyncio.gather(*workers)
    rows = await sql(f.url, "SELECT uid, role, state FROM fsessions WHERE uid = ANY($1::text[])", done)
    assert sorted(r["uid"] for r in rows) == sorted(done)          # each exactly once
    assert all(r["state"] == "released" for r in rows)
    assert (await sql(f.url, "SELECT state FROM nodes"))[0]["state"] == "up"   # the outage failed no node
    await roundtrip_ok(stream, 256 << 10)
    live = await live_rows(f.url)
    for uid in {r["uid"] for r in live}:
        await a.release(uid)
    await cons.release(uid0)
    assert await live_rows(f.url) == []


async def test_500_sessions_across_two_instances_every_reservation_back(facility, client_for, echo_server):
    f = facility(nodes=2, instances=2)
    a, b = (client_for(p.target) for p in f.instances)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    sem = asyncio.Semaphore(16)
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        x, y = (a, b) if i % 2 else (b, a)
        async with sem:
            uid, prod = await prod_session(x, y, ep)
            peak = max(peak, len(await live_rows(f.url))) if i % 50 == 0 else peak
            await y.release(uid)
    await asyncio.gather(*(one(i) for i in range(500)))
    assert await live_rows(f.url) == []
    rows = await sql(f.url, "SELECT state, count(*) AS n, count(DISTINCT instance) AS inst, "
                            "count(DISTINCT node) AS nodes FROM fsessions GROUP BY state")
    assert [(r["state"], r["n"]) for r in rows] == [("released", 500)]
    assert rows[0]["inst"] == 2 and rows[0]["nodes"] == 2
    listed = json.loads(subprocess.run([str(BIN / "s2cs"), "nodes", "list", "--json", "--store", f.url],
                                       capture_output=True, text=True, timeout=60).stdout)
    assert [(n["sessions"], n["ports_used"], n["bandwidth_used_kbps"]) for n in listed["nodes"]] == [(0, 0, 0)] * 2
    for n in f.nodes:
        reply = json.loads(subprocess.run([str(BIN / "s2ds"), "status", "--json", "--socket",
                                           str(n.dir / "node.sock")], capture_output=True, text=True,
                                          timeout=30).stdout)
        assert reply["sessions"] == 0


async def test_metrics_per_node(facility, servers, client_for, echo_server):
    f = facility(nodes=2, instances=1, node_timeout=2.0, extra=("--metrics-port", "0"))
    a = client_for(f.instances[0].target)
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    port = json.loads(f.instances[0].ready.read_text())["metrics_port"]
    made = []
    for _ in range(4):
        uid, prod = await prod_session(a, a, ep)
        made.append(uid)
        await roundtrip_ok((await cons_session(cons, uid, prod)).listeners[0], 100_000)

    def scrape() -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body) for s in fam.samples}
    m = await asyncio.to_thread(scrape)
    assert m[("scistream_store_up", ())] == 1
    per_node = {n.name: m[("scistream_node_sessions", (("node", n.name),))] for n in f.nodes}
    assert sum(per_node.values()) == 4 and all(v >= 1 for v in per_node.values())
    assert all(m[("scistream_node_up", (("node", n.name),))] == 1 for n in f.nodes)
    carried = sum(m[("scistream_node_bytes_forwarded_total", (("direction", "to_producer"), ("node", n.name)))]
                  for n in f.nodes)
    assert carried >= 4 * 100_000
    assert m[("scistream_sessions", (("state", "connected"),))] == 4
    assert m[("scistream_ports", (("state", "used"),))] == 4
    f.nodes[0].kill()

    def lost() -> bool:
        return asyncio.run(_node_state(f.url, f.nodes[0].name, "lost"))
    await async_wait_until(lambda: asyncio.to_thread(lost), 15, "the node lost")
    m = await asyncio.to_thread(scrape)
    assert m[("scistream_node_up", (("node", f.nodes[0].name),))] == 0
    assert m[("scistream_node_sessions", (("node", f.nodes[0].name),))] == 0
    for r in await live_rows(f.url):
        await a.release(r["uid"])
    for uid in made:
        await cons.release(uid)


async def test_timers_acted_on_exactly_once_by_two_live_instances(facility, client_for, echo_server):
    """Both instances run their timers over the same rows: every lease end is acted on by
    exactly one of them (one ``expired`` line in the two audit logs together, one
    transition in the store)."""
    f = facility(nodes=1, instances=2)
    a, b = (client_for(p.target) for p in f.instances)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uids = []
    for i in range(12):
        x, y = (a, b) if i % 2 else (b, a)
        uid, _ = await prod_session(x, y, ep, lease=6)   # long enough to set them all up under load
        uids.append(uid)

    async def all_expired() -> bool:
        rows = await sql(f.url, "SELECT state FROM fsessions WHERE uid = ANY($1::text[])", uids)
        return len(rows) == 12 and all(r["state"] == "expired" for r in rows)
    await async_wait_until(all_expired, 30, "every lease acted on")

    def expired_lines() -> list[dict]:
        out = []
        for p in f.instances:
            for line in (p.state_dir / "audit.log").read_text().splitlines():
                rec = json.loads(line)
                if rec.get("what") == "expired":
                    out.append(rec)
        return out
    lines = expired_lines()
    assert sorted(r["uid"] for r in lines) == sorted(uids)          # each once, no more
    assert {r["uid"] for r in lines if "lease of 6 s ended" in r.get("detail", "")} == set(uids)
    assert await live_rows(f.url) == []


async def test_instance_stopped_gracefully_leaves_waiting_req_to_another(facility, client_for, echo_server):
    """SIGTERM (a rolling upgrade): a req waiting for its hello on the stopping instance
    answers UNAVAILABLE at once, its session stays; the req retried on another instance
    gets the same session."""
    f = facility(nodes=1, instances=2)
    a, b = (client_for(p.target) for p in f.instances)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()
    req = asyncio.create_task(a.req(uid, "PROD", 1, 0))
    await async_wait_until(lambda: _has_row(f.url, uid), 10, "the req recorded")
    assert f.instances[0].stop(signal.SIGTERM) == 0
    with pytest.raises(Exception, match="shutting down; retry on another instance|cannot reach"):
        await req
    assert [r["state"] for r in await sql(f.url, "SELECT state FROM fsessions WHERE uid = $1", uid)] == ["requested"]
    retry = asyncio.create_task(b.req(uid, "PROD", 1, 0))
    await b.hello(uid, "PROD", [ep])
    prod = await retry
    await b.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
    assert [r["state"] for r in await sql(f.url, "SELECT state FROM fsessions WHERE uid = $1", uid)] == ["connected"]
    await b.release(uid)


async def test_cli_over_two_instances_and_status_columns(facility, echo_server, tmp_path):
    """s2uc and appctrl given both instances (--s2cs A,B): a session made with A dead from the
    start, its status with the node and the instance (list --json)."""
    f = facility(nodes=2, instances=2)
    a, b = (p.target for p in f.instances)
    f.instances[0].stop(signal.SIGKILL)
    env = {**os.environ, "HOME": str(tmp_path), "SCISTREAM_S2CS": f"{a},{b}"}
    req = await asyncio.create_subprocess_exec(str(BIN / "s2uc"), "prod-req", "--insecure", "--num-conn", "1",
                                               "--mock", env=env, stdout=asyncio.subprocess.PIPE,
                                               stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(req.communicate(), 60)
    assert req.returncode == 0, err.decode()
    uid = out.decode().splitlines()[1].split()[0]     # "uid; s2cs; access_token; role", then the values
    listed = await asyncio.create_subprocess_exec(str(BIN / "s2uc"), "list", "--json", "--insecure", env=env,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lout, lerr = await asyncio.wait_for(listed.communicate(), 60)
    rows = [d for d in json.loads(lout) if d["uid"] == uid]
    assert len(rows) == 1 and rows[0]["node"] in ("dtn1", "dtn2"), lerr.decode()
    assert rows[0]["instance"].endswith(f":{f.instances[1].port}")
    rel = await asyncio.create_subprocess_exec(str(BIN / "s2uc"), "release", uid, "--insecure", env=env,
                                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(rel.communicate(), 60)
    assert rel.returncode == 0
    assert await live_rows(f.url) == []


async def test_node_frozen_then_back_stops_what_the_store_no_longer_lists(facility, client_for, echo_server):
    """A node cut off (frozen with SIGSTOP: it neither beats nor answers) past --node-timeout:
    its sessions fail; when it comes back (SIGCONT) it removes them by itself, and takes new
    sessions again."""
    f = facility(nodes=1, instances=1, node_timeout=2.0)
    a = client_for(f.instances[0].target)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    made = [await prod_session(a, a, ep) for _ in range(3)]
    node = f.nodes[0]
    os.killpg(node.proc.pid, signal.SIGSTOP)
    try:
        async def failed() -> bool:
            rows = await sql(f.url, "SELECT state FROM fsessions WHERE node = 'dtn1'")
            return len(rows) == 3 and all(r["state"] == "failed" for r in rows)
        await async_wait_until(failed, 15, "the frozen node's sessions failed")
        listeners = [listener for _, prod in made for listener in prod.listeners]
        assert len(await still_listening(listeners)) == 3   # frozen, its sockets still open
    finally:
        os.killpg(node.proc.pid, signal.SIGCONT)
    await async_wait_until(lambda: _node_state(f.url, "dtn1", "up"), 15, "the node beating again")
    await async_wait_until(lambda: _nothing_listening(listeners), 15, "the node removed what the store no longer lists")
    reply = json.loads(subprocess.run([str(BIN / "s2ds"), "status", "--json", "--socket",
                                       str(node.dir / "node.sock")], capture_output=True, text=True,
                                      timeout=30).stdout)
    assert reply["sessions"] == 0
    assert "is not live in the store any more; removing it" in (node.dir / "s2ds.log").read_text()
    uid, prod = await prod_session(a, a, ep)
    assert prod.listeners[0].startswith("127.0.0.2:")
    await a.release(uid)


async def _nothing_listening(listeners: list[str]) -> bool:
    return not await still_listening(listeners)


async def test_port_held_by_another_program_is_skipped(facility, client_for, echo_server):
    """A program holds ports of a node's range, for TCP or for UDP only (a session's port
    carries both): the node reports them at its beat, and no session is placed on them
    (none fails with 'address already in use')."""
    import socket
    f = facility(nodes=1, instances=1)
    a = client_for(f.instances[0].target)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    lo, hi = (int(x) for x in f.nodes[0].range.split("-"))
    held = []
    for port in range(lo, lo + 5):
        s = socket.socket(type=socket.SOCK_STREAM if port < lo + 3 else socket.SOCK_DGRAM)
        s.bind(("127.0.0.2", port))
        if port < lo + 3:
            s.listen(1)
        held.append(s)
    try:
        async def reported() -> bool:
            rows = await sql(f.url, "SELECT busy_ports FROM nodes WHERE name = 'dtn1'")
            return sorted(rows[0]["busy_ports"]) == list(range(lo, lo + 5))
        await async_wait_until(reported, 10, "the node reporting the held ports")
        made = [await prod_session(a, a, ep) for _ in range(hi - lo + 1 - 5)]   # every other port
        used = {int(listener.rsplit(":", 1)[1]) for _, prod in made for listener in prod.listeners}
        assert used == set(range(lo + 5, hi + 1))
        with pytest.raises(Exception, match=r"0 ports free .*\(5 held by other programs\)"):
            await a.req(new_uid(), "PROD", 1, 0)
        for uid, _ in made:
            await a.release(uid)
    finally:
        for s in held:
            s.close()
    await async_wait_until(lambda: _busy_cleared(f.url), 10, "the held ports free again")


async def _busy_cleared(url: str) -> bool:
    return (await sql(url, "SELECT busy_ports FROM nodes WHERE name = 'dtn1'"))[0]["busy_ports"] == []


async def test_node_bandwidth_and_session_caps(facility, client_for, echo_server):
    f = facility(nodes=1, instances=1, node_extra=("--max-rate", "10000", "--max-sessions", "3"))
    a = client_for(f.instances[0].target)
    ep = f"{echo_server[0]}:{echo_server[1]}"

    async def session(rate: int, num_conn: int = 4) -> str:
        uid = new_uid()
        req = asyncio.create_task(a.req(uid, "PROD", num_conn, rate))
        try:
            await a.hello(uid, "PROD", [ep])
        except BaseException:
            await asyncio.gather(req, return_exceptions=True)
            raise
        await req
        return uid
    first = await session(6000)                       # 4 listeners, 6000 kbit/s once
    with pytest.raises(Exception, match="4000 kbit/s left of 10000 kbit/s"):
        await a.req(new_uid(), "PROD", 1, 5000)
    with pytest.raises(Exception, match="every node of this facility caps bandwidth; ask for a rate"):
        await a.req(new_uid(), "PROD", 1, 0)
    second = await session(4000, num_conn=1)
    with pytest.raises(Exception, match="0 kbit/s left"):
        await a.req(new_uid(), "PROD", 1, 1)
    await a.release(second)
    more = [await session(1000, num_conn=1) for _ in range(2)]     # 3 sessions: the node's most
    with pytest.raises(Exception, match=r"3 sessions, its most \(--max-sessions\)"):
        await a.req(new_uid(), "PROD", 1, 1000)
    for uid in [first, *more]:
        await a.release(uid)
    assert await live_rows(f.url) == []


async def test_instance_gone_silent_mid_req(facility, client_for, echo_server):
    """The instance holding a req vanishes without a reset (frozen: a power cut or a cut
    cable looks the same to the client): the client's pings go unanswered, the call moves to
    the other instance, which has the same session."""
    from scistream.client import AsyncClient, ChannelOptions
    f = facility(nodes=1, instances=2)
    user = AsyncClient(",".join(p.target for p in f.instances), ChannelOptions(insecure=True, keepalive=1.0))
    app = client_for(f.instances[1].target)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()
    frozen = f.instances[0].proc
    try:
        req = asyncio.create_task(user.req(uid, "PROD", 1, 0))
        await async_wait_until(lambda: _has_row(f.url, uid), 10, "the req recorded on A")
        frozen.send_signal(signal.SIGSTOP)
        await app.hello(uid, "PROD", [ep])        # B takes the hello; A will never answer
        prod = await asyncio.wait_for(req, 20)     # without the pings: never
        assert [u.address for u in user.last_unreachable] == [f.instances[0].target]
        await user.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
        assert user.target == f.instances[1].target
        rows = await sql(f.url, "SELECT state FROM fsessions WHERE uid = $1", uid)
        assert [r["state"] for r in rows] == ["connected"]
        await user.release(uid)
    finally:
        frozen.send_signal(signal.SIGCONT)
        await user.close()


async def test_facility_node_restarted_in_place(facility, servers, client_for, echo_server):
    """`s2ds restart` of a facility node: the successor takes the sessions and listening
    sockets over, registers itself (same name, same certificate, its own pid), and the
    control servers drive it: the stream goes on through a new connection, release works."""
    f = facility(nodes=1, instances=1)
    a = client_for(f.instances[0].target)
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    uid, prod = await prod_session(a, a, ep)
    stream = (await cons_session(cons, uid, prod)).listeners[0]
    await roundtrip_ok(stream, 128 << 10)
    node = f.nodes[0]
    old = (await sql(f.url, "SELECT pid, cert FROM nodes WHERE name = 'dtn1'"))[0]
    async with restarted_node(f.url, node) as new_pid:
        now = (await sql(f.url, "SELECT pid, cert FROM nodes WHERE name = 'dtn1'"))[0]
        assert now["pid"] == new_pid != old["pid"] and now["cert"] == old["cert"]   # same certificate
        await roundtrip_ok(stream, 128 << 10)             # a new connection through the same listeners
        st = (await a.status(uid)).sessions[0]
        assert st.state == "connected" and st.node == "dtn1"
        uid2, prod2 = await prod_session(a, a, ep)          # and new sessions on the successor
        await roundtrip_ok((await cons_session(cons, uid2, prod2)).listeners[0], 64 << 10)
        for u in (uid, uid2):
            await a.release(u)
            await cons.release(u)
        assert await live_rows(f.url) == []
        reply = json.loads(subprocess.run([str(BIN / "s2ds"), "status", "--json", "--socket",
                                           str(node.dir / "node.sock")], capture_output=True, text=True,
                                          timeout=30).stdout)
        assert reply["pid"] == new_pid and reply["sessions"] == 0


async def test_original_tooling_client_against_a_facility(facility, echo_server, original_stubs):
    """A client of the original tooling (its stubs, its order: the hello before the req, the
    CONS-side hello saying PROD) against two instances of a facility that allows it a
    plaintext WAN leg: both halves on the facility's nodes, bytes verified by the client."""
    import sys
    gen_dir, fixtures = original_stubs
    f = facility(nodes=2, instances=2, extra=("--allow-legacy-plaintext",))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(fixtures / "original_client.py"), str(gen_dir), f.instances[1].target,
        f"{echo_server[0]}:{echo_server[1]}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 90))[0].decode()
    assert proc.returncode == 0, out
    # it released the uid itself at the end: both halves, with their WAN leg and rate as set up
    rows = await sql(f.url, "SELECT role, state, wan_security, rate_enforced, node FROM fsessions ORDER BY role")
    assert [(r["role"], r["state"], r["wan_security"]) for r in rows] == [
        ("CONS", "released", "plain"), ("PROD", "released", "plain")], [dict(r) for r in rows]
    assert not any(r["rate_enforced"] for r in rows)      # its rate=10000 is the original's unenforced default
    assert await live_rows(f.url) == []


async def test_status_carries_the_legs_from_the_node(facility, servers, client_for, echo_server):
    """A facility's status reads each connected session's per-hop telemetry from the node
    that carries it (its connections' TCP samples), as a single gateway's does."""
    from scistream.client import SessionStatus
    f = facility(nodes=1, instances=1)
    a, cons = client_for(f.instances[0].target), client_for((await servers()).target)
    uid, prod = await prod_session(a, a, f"{echo_server[0]}:{echo_server[1]}", num_conn=1)
    listeners = (await cons_session(cons, uid, prod)).listeners
    r, w = await asyncio.open_connection(*parse_listener(listeners[0]))
    try:
        async def sampled():
            block = os.urandom(1 << 16)
            w.write(block)
            await w.drain()
            assert await r.readexactly(len(block)) == block
            (s,) = [SessionStatus.from_pb(x) for x in (await a.status(uid)).sessions]
            ok = set(s.legs) == {"lan", "wan"} and all(leg["sampled"] for leg in s.legs.values())
            return s if ok else None
        s = await async_wait_until(sampled, 20, "the legs in the facility's status")
        assert s.node == "dtn1" and s.legs["wan"]["connections"] == 1 and s.legs["lan"]["rtt_ms"] > 0
        assert s.bottleneck
    finally:
        w.close()
    await a.release(uid)
    await cons.release(uid)


async def test_cons_hello_before_its_req_while_prod_is_connected_waits_for_the_req(
        facility, client_for, echo_server):
    """Both halves of a uid in one facility: the consumer's hello comes before the CONS req
    (the original tooling's order) while the PROD half is connected already. The hello waits
    for its req, as on a single gateway, instead of being refused as a repeated hello."""
    f = facility(nodes=2, instances=2)
    a, b = (client_for(p.target) for p in f.instances)
    uid, prod = await prod_session(a, b, f"{echo_server[0]}:{echo_server[1]}", num_conn=2)
    hello = asyncio.create_task(b.hello(uid, "CONS"))
    try:
        # a window for a refusal to come back before the req exists (a refusal takes
        # milliseconds; the hello may wait for its req up to --hello-grace)
        await asyncio.wait({hello}, timeout=1.0)
        assert not hello.done() or hello.exception() is None, hello.exception()
        cons = await a.req(uid, "CONS", len(prod.listeners), 0)
        said = await hello
    except BaseException:
        hello.cancel()
        await asyncio.gather(hello, return_exceptions=True)
        raise
    assert list(said.listeners) == list(cons.listeners)
    update = await b.update(uid, "CONS", prod.listeners, prod.wan_secret)
    await roundtrip_ok(update.listeners[0], 256 << 10)     # consumer -> CONS -> PROD -> producer
    await a.release(uid)
    assert await live_rows(f.url) == []
