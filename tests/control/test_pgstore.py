"""The session store in a real PostgreSQL (Debian's postgresql-15), started by these tests.

One server for the module, in a temporary directory (unix socket there, TCP on a free
loopback port), run as the ``postgres`` system user when the tests run as root; each test
gets a database of its own. It is stopped at teardown, and restarted by the test that
takes the database away under a running s2cs.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (roundtrip_ok, async_wait_until, connect_session, free_port, new_uid, port_block)
from scistream.control.pgstore import SCHEMA_VERSION, PostgresStore, redact
from scistream.control.server import ConfigError, ControlServer, ServerConfig
from scistream.control.store import SessionRecord, StoreError
from scistream.errors import ScistreamError

asyncpg = pytest.importorskip("asyncpg")

from pghelpers import Postgres, pg_bin, running_postgres, sql  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    with running_postgres() as server:
        yield server


def record(state: str = "connected", **kw) -> SessionRecord:
    kw.setdefault("uid", new_uid())
    return SessionRecord(role=kw.pop("role", "PROD"), created=kw.pop("created", time.time()), state=state,
                         owner_id="alice", **kw)


# -- the store's contract -------------------------------------------------------------------
async def test_put_active_history_secret_erased_and_nodes_apart(pg):
    db = pg.createdb()
    url = pg.url(db)
    a, b = PostgresStore(url, node="n1"), PostgresStore(pg.url(db, tcp=True), node="n2")  # socket, TCP
    await a.open()
    await b.open()
    try:
        secret = os.urandom(32)
        live = record(wan_secret=secret, data={"ports": [5100, 5101], "note": "é"})
        await a.put(live)
        theirs = record(uid=live.uid, role="PROD", created=live.created, wan_secret=b"x" * 32)
        await b.put(theirs)  # same uid, role and time on another node: a record of its own
        (got,) = await a.active()
        assert (got.uid, got.state, got.wan_secret, got.data) == (live.uid, "connected", secret, live.data)
        assert [r.wan_secret for r in await b.active()] == [b"x" * 32]
        live.state, live.ended = "released", time.time()
        await a.put(live)
        assert await a.active() == []
        (ended,) = await a.history(10)
        assert ended.state == "released" and ended.wan_secret is None
        # erased in the table itself, not only in the answer; node n2's record untouched
        rows = await sql(url, "SELECT node, state, wan_secret FROM sessions ORDER BY node")
        assert [(r["node"], r["state"], r["wan_secret"]) for r in rows] == [
            ("n1", "released", None), ("n2", "connected", b"x" * 32)]
        assert await b.history(10) == []
        assert await b.prune(keep=0) == 0           # n2 has nothing ended: n1's record stays
        assert len(await a.history(10)) == 1
    finally:
        await a.close()
        await b.close()


async def test_group_commit_and_prune(pg):
    store = PostgresStore(pg.url(pg.createdb()), node="n1")
    await store.open()
    try:
        recs = [record("expired", role="CONS", created=time.time() + i, ended=1000.0 + i) for i in range(300)]
        await asyncio.gather(*(store.put(r) for r in recs))
        assert len(await store.history(1000)) == 300
        assert store.commits < 300  # concurrent writes share transactions
        assert await store.prune(keep=50) == 250
        assert [r.ended for r in await store.history(1000)] == [1000.0 + i for i in range(299, 249, -1)]
    finally:
        await store.close()


# -- migrations -----------------------------------------------------------------------------
async def test_fresh_database_migrated_then_newer_schema_refused(pg, tmp_path):
    url = pg.url(pg.createdb())
    store = PostgresStore(url, node="n1")
    await store.open()
    assert (await sql(url, "SELECT max(version) AS v FROM schema_version"))[0]["v"] == SCHEMA_VERSION == 4
    await store.close()
    again = PostgresStore(url, node="n1")   # a second start applies nothing twice
    await again.open()
    await again.close()
    assert [r["version"] for r in await sql(url, "SELECT version FROM schema_version")] == [1, 2, 3, 4]
    await sql(url, "INSERT INTO schema_version (version) VALUES (5)")
    newer = PostgresStore(url, node="n1")
    with pytest.raises(StoreError, match=r"has schema version 5, newer than this scistream knows \(4\)"):
        await newer.open()
    # s2cs itself: a ConfigError (exit 2, one line), nothing left started
    srv = ControlServer(ServerConfig(port=0, auth="none", insecure=True, store=url, port_range=port_block(),
                                    state_dir=tmp_path / "sd"))
    with pytest.raises(ConfigError, match="newer than this scistream knows"):
        await srv.start()


def test_bad_store_urls_are_one_line_errors(pg, tmp_path):
    with pytest.raises(ConfigError, match="give a postgresql://"):
        ControlServer(ServerConfig(port=0, auth="none", insecure=True, store="mysql://x/y"))
    assert redact("postgresql://u:hunter2@db/x") == "postgresql://u:***@db/x"
    # unreachable database: s2cs exits 2 saying so, without the password
    bad = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/nothing"
    proc = subprocess.run(["s2cs", "start", "--port", "0", "--auth", "none", "--insecure",
                           "--state-dir", str(tmp_path / "sd"), "--store", bad],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 2, proc.stderr
    assert "cannot open the session store postgresql://postgres:***@127.0.0.1" in proc.stderr
    assert "hunter2" not in proc.stderr


# -- a real s2cs on PostgreSQL --------------------------------------------------------------

async def test_session_on_postgres_survives_a_restart_of_s2cs(pg, servers, client_for, echo_server):
    url = pg.url(pg.createdb())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(store=url), await servers(store=url)  # two nodes, one database
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep)
    await roundtrip_ok(c.listeners[0])
    nodes = {r["node"] for r in await sql(url, "SELECT node FROM sessions")}
    assert len(nodes) == 2
    sd, rng = prod.state_dir, prod.config.port_range
    await prod.stop(release=False)
    await roundtrip_ok(c.listeners[1])
    prod2 = await servers(state_dir=sd, port_range=rng, store=url)
    assert list(prod2.registry.active) == [(uid, "PROD")]  # its own session, not the CONS one
    st = (await client_for(prod2).status(uid)).sessions[0]
    assert st.state == "connected" and list(st.listeners) == list(p.listeners)
    await roundtrip_ok(c.listeners[0])
    await client_for(prod2).release(uid)
    await client_for(cons).release(uid)
    rows = await sql(url, "SELECT state, wan_secret FROM sessions")
    assert sorted(r["state"] for r in rows) == ["released", "released"]
    assert all(r["wan_secret"] is None for r in rows)
    assert prod2.registry.ports.used == set() and cons.registry.ports.used == set()


def test_tls_to_the_database(tmp_path):
    """sslmode=verify-full with the server's CA works; without TLS, or with another CA, refused."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --system installs it)")
    from scistream.control.tlscert import make_self_signed
    pg = Postgres(bindir)
    try:
        pg.init()
        cert, key = pg.dir / "server.crt", pg.dir / "server.key"
        make_self_signed(cert, key, ["127.0.0.1"])
        make_self_signed(tmp_path / "other.crt", tmp_path / "other.key", ["127.0.0.1"])
        if pg.user is not None:
            os.chown(key, pg.user, -1)
        hba = pg.data / "pg_hba.conf"   # TCP without TLS is refused
        hba.write_text("hostnossl all all 127.0.0.1/32 reject\n" + hba.read_text())
        pg.options = ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
        pg.start()
        db = pg.createdb()
        tcp = pg.url(db, tcp=True)

        async def main() -> None:
            store = PostgresStore(f"{tcp}?sslmode=verify-full&sslrootcert={cert}", node="n1")
            await store.open()
            rec = record(wan_secret=b"s" * 32)
            await store.put(rec)
            assert [r.uid for r in await store.active()] == [rec.uid]
            await store.close()
            with pytest.raises(StoreError, match="cannot open the session store"):
                await PostgresStore(f"{tcp}?sslmode=disable", node="n1").open()
            with pytest.raises(StoreError, match="(?i)certificate"):
                await PostgresStore(f"{tcp}?sslmode=verify-full&sslrootcert={tmp_path / 'other.crt'}",
                                    node="n1").open()
        asyncio.run(main())
    finally:
        pg.close()


@pytest.fixture
def own_pg():
    """A PostgreSQL of the test's own (the test restarts it)."""
    with running_postgres(restartable=True) as server:
        yield server


async def test_database_restarted_under_a_running_s2cs(own_pg, servers, client_for, echo_server):
    pg = own_pg
    url = pg.url(pg.createdb())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    prod, cons = await servers(store=url), await servers(store=url)
    uid, p, c = await connect_session(client_for(prod), client_for(cons), ep)
    await asyncio.to_thread(pg.stop)
    try:
        # a new session cannot be recorded: refused clearly, nothing of it kept reserved
        with pytest.raises(ScistreamError) as info:
            await client_for(prod).req(new_uid(), "PROD", 2)
        assert info.value.status.name == "UNAVAILABLE"
        assert str(info.value).startswith("session store unavailable: cannot write postgresql://")
        assert prod.registry.ports.used == set(prod.registry.active[(uid, "PROD")].ports)
        # the running session keeps its bytes flowing; its release is answered and its end
        # recorded once the database is back
        await roundtrip_ok(c.listeners[0])
        await client_for(cons).release(uid)
        assert cons.registry.ports.used == set()
    finally:
        await asyncio.to_thread(pg.start)

    async def cons_end_recorded() -> bool:
        rows = await sql(url, "SELECT state FROM sessions WHERE uid = $1 AND role = 'CONS'", uid)
        return [r["state"] for r in rows] == ["released"]
    await async_wait_until(cons_end_recorded, timeout=15, what="the release written after the restart")
    # everything works again: a whole new session, bytes through it, all recorded
    uid2, p2, c2 = await connect_session(client_for(prod), client_for(cons), ep)
    await roundtrip_ok(c2.listeners[0])
    rows = await sql(url, "SELECT uid, role, state FROM sessions WHERE state = 'connected' ORDER BY uid, role")
    assert sorted((r["uid"], r["role"]) for r in rows) == sorted([(uid, "PROD"), (uid2, "CONS"), (uid2, "PROD")])
    await client_for(prod).release(uid)
    for cl in (client_for(prod), client_for(cons)):
        await cl.release(uid2)
    assert prod.registry.ports.used == set() and cons.registry.ports.used == set()
