"""A facility of several nodes in network namespaces.

Facility A is five hosts (``FacilityTestbed``): two control hosts running ``s2cs --facility``,
two data-transfer nodes running ``s2ds serve --store``, and a database host running
PostgreSQL; facility B is one gateway (a single-gateway ``s2cs`` with its own data plane)
and the consumer. Each program runs where it would: the user's ``s2uc`` in the user's
namespace, the application controllers next to the producer and the consumer, the
producer and consumer applications on their LANs. No namespace forwards: the bytes cross
from B's LAN to A's LAN only through GW-B and a DTN.

The test process reads the facility's database over PostgreSQL's unix socket (a file,
not the network) to see where sessions were placed and in which state they are.
"""
from __future__ import annotations

import asyncio
import ast
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_until
from nshelpers import (BIN, PY, S2cs, built, cli_env, needs_testbed, probes, read_line_matching, run_in, spawn,
                       start_s2cs, wait_for)
from scistream.netns import FacilityTestbed
from scistream.netns.testbed import _NAME_RE, Host, namespace_pids

asyncpg = pytest.importorskip("asyncpg")

from pghelpers import Postgres, pg_bin  # noqa: E402

pytestmark = [pytest.mark.root, needs_testbed]

LIVE = "('requested', 'ready', 'connected')"
NODE_TIMEOUT = 3
HEARTBEAT = 0.5
NUM_CONN = 2
SIZE = 256 << 10  # per connection, each way


@pytest.fixture
def ftb():
    """A fresh facility testbed; afterwards no namespace of it remains."""
    with built(FacilityTestbed()) as tb:
        yield tb


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


class NsPostgres(Postgres):
    """The tests' PostgreSQL (tests/pghelpers.py) run inside the database host's namespace,
    listening on its address (TCP for the facility) and on a unix socket (for the test)."""

    def __init__(self, bindir: Path, tb: FacilityTestbed) -> None:
        super().__init__(bindir)
        self.tb = tb

    def init(self) -> None:
        super().init()
        with open(self.data / "pg_hba.conf", "a") as f:  # a throwaway database: trust A's management LAN
            f.write("host all all 192.0.2.128/25 trust\n")

    def start(self) -> None:
        argv = self.tb.argv(self.tb.db_a, *self._as_user(
            [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.dir), "-h", self.tb.db_a.ip,
             "-p", str(self.port), "-c", "fsync=off", "-c", "logging_collector=off"]))
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)

        def ready() -> bool:
            assert self.proc.poll() is None, (self.dir / "server.log").read_text()[-2000:]
            return subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", str(self.dir), "-p",
                                   str(self.port)]).returncode == 0
        wait_until(ready, timeout=30, what="postgres ready in DB-A")

    def net_url(self, db: str) -> str:
        return f"postgresql://postgres@{self.tb.db_a.ip}:{self.port}/{db}"


@dataclasses.dataclass
class DtnNode:
    host: Host
    name: str
    proc: asyncio.subprocess.Process
    sock: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclasses.dataclass
class Facility:
    tb: FacilityTestbed
    tmp: Path
    env: dict
    stack: contextlib.AsyncExitStack
    pg: NsPostgres
    url: str              # over the unix socket: the test's view
    net_url: str          # over DB-A's address: the facility's
    nodes: dict[str, DtnNode]
    ctl: dict[str, S2cs]
    cons: S2cs

    async def sql(self, query: str, *args):
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def live_rows(self):
        return await self.sql(f"SELECT uid, role, node, state, ports FROM fsessions WHERE state IN {LIVE}")

    def logs(self) -> str:
        return "\n".join([f"--- {n}\n{d.log_text()}" for n, d in self.nodes.items()]
                         + [f"--- {n}\n{c.log_text()}" for n, c in self.ctl.items()]
                         + [f"--- gw-b\n{self.cons.log_text()}"])


async def start_node(stack, tb: FacilityTestbed, host: Host, url: str, token: Path, sockdir: Path,
                     tmp: Path) -> DtnNode:
    """``s2ds serve --store`` on a DTN: listeners on its WAN address, control on its management one."""
    name = host.name
    sock, log = sockdir / f"{name}.sock", tmp / f"{name}.log"
    argv = tb.argv(host, str(BIN / "s2ds"), "serve", "--socket", str(sock), "--fresh", "--workers", "1",
                   "--store", url, "--node-name", name, "--address", host.wan_ip,
                   "--control", f"{host.addr('mgt0')}:0", "--port-range", "5100-5119", "--token-file", str(token),
                   "--heartbeat", str(HEARTBEAT), "--state-dir", str(tmp / f"{name}-state"))
    proc = await stack.enter_async_context(spawn(argv, log_path=log))
    return DtnNode(host, name, proc, sock, log)


@contextlib.asynccontextmanager
async def facility(tb: FacilityTestbed, tmp: Path):
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --system installs it)")
    async with contextlib.AsyncExitStack() as stack:
        pg = NsPostgres(bindir, tb)
        stack.callback(pg.close)         # stopped after everything that uses it (the stack unwinds)
        pg.init()
        pg.start()
        db = pg.createdb()
        url, net_url = pg.url(db), pg.net_url(db)
        token = tmp / "node.token"
        token.write_text(os.urandom(24).hex())
        token.chmod(0o600)
        sockdir = Path(pg.dir) / "sock"   # short: a unix socket path has 108 bytes at most
        sockdir.mkdir()
        nodes = {}
        for h in (tb.dtn_a1, tb.dtn_a2):  # one after the other: the first migrates the schema
            nodes[h.name] = await start_node(stack, tb, h, net_url, token, sockdir, tmp)
            await wait_for(lambda: _registered(url, nodes[h.name]), 30, f"node {h.name} registered")
        ctl = dict(zip(("ctl-a1", "ctl-a2"), await asyncio.gather(*(
            start_s2cs(stack, tb, h, tmp, listener_ip=h.control_ip,
                       extra=("--facility", "--store", net_url, "--node-token-file", str(token),
                              "--node-timeout", str(NODE_TIMEOUT)))
            for h in (tb.ctl_a1, tb.ctl_a2)))))
        cons = await start_s2cs(stack, tb, tb.gw_b, tmp, listener_ip=tb.gw_b.lan_ip)
        yield Facility(tb, tmp, cli_env(tmp), stack, pg, url, net_url, nodes, ctl, cons)
    # A test that passed stopped every process it started (PostgreSQL too) and left no session
    # live: nothing for the testbed's destroy() to kill.
    left = {ns: pids for ns in tb.namespaces if (pids := namespace_pids(ns))}
    assert not left, "processes left in the namespaces: " + "; ".join(
        f"{ns}: {pid} {_cmdline(pid)}" for ns, pids in left.items() for pid in pids)


async def _registered(url: str, node: DtnNode) -> bool:
    assert node.proc.returncode is None, node.log_text()
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT state FROM nodes WHERE name = $1", node.name)
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    return bool(rows) and rows[0]["state"] == "up"


@dataclasses.dataclass
class Session:
    uid: str
    node: str = ""
    prod_listeners: list[str] = dataclasses.field(default_factory=list)
    cons_listeners: list[str] = dataclasses.field(default_factory=list)
    endpoints: list[str] = dataclasses.field(default_factory=list)
    report: Path | None = None


async def producer_app(f: Facility, tag: str) -> tuple[list[str], Path]:
    """An echo server on the producer host (one per session): its endpoints and report file."""
    tb = f.tb
    ready, report = f.tmp / f"echo-{tag}.ready", f.tmp / f"echo-{tag}.json"
    echo = await f.stack.enter_async_context(spawn(tb.argv(
        tb.producer, PY, "-m", "scistream.netns.peer", "echo-server", "--bind", tb.producer.ip,
        "--ports", str(NUM_CONN), "--connections", str(NUM_CONN), "--ready", str(ready),
        "--report", str(report)), log_path=f.tmp / f"echo-{tag}.log"))
    await wait_for(lambda: ready.exists() or echo.returncode is not None, 20, "the echo server")
    return json.loads(ready.read_text())["endpoints"], report


async def hello(f: Facility, uid: str, ctl: S2cs, endpoints: list[str]) -> None:
    """The producer's application controller says hello to the control instance ``ctl``."""
    rc, out = await run_in(f.tb, f.tb.producer, str(BIN / "appctrl"), "create-appctrl", uid, ctl.target, "-",
                           "PROD", f.tb.producer.ip, "--app", "none", "--server-cert", str(ctl.cert),
                           *[a for e in endpoints for a in ("--endpoint", e)], env=f.env)
    assert rc == 0, out + f.logs()


async def prod_half(f: Facility, req_on: S2cs, hello_on: S2cs, tag: str) -> Session:
    """s2uc prod-req on one control instance, the producer's hello on the other."""
    tb = f.tb
    endpoints, report = await producer_app(f, tag)
    async with spawn(tb.argv(tb.user, str(BIN / "s2uc"), "prod-req", "--s2cs", req_on.target, "--server-cert",
                             str(req_on.cert), "--num-conn", str(NUM_CONN)),
                     env=f.env, stdout=asyncio.subprocess.PIPE) as preq:
        seen: list[str] = []
        uid = (await read_line_matching(preq.stdout, r"^([0-9a-f-]{36}) \S+ - PROD$", 30, seen)).group(1)
        await hello(f, uid, hello_on, endpoints)
        rest = (await asyncio.wait_for(preq.stdout.read(), 30)).decode()
        assert await preq.wait() == 0, "\n".join(seen) + rest + f.logs()
    listeners = [line.split('"')[1] for line in rest.splitlines() if line.startswith("listeners:")]
    assert len(listeners) == NUM_CONN, rest
    return Session(uid, prod_listeners=listeners, endpoints=endpoints, report=report)


async def cons_half(f: Facility, s: Session) -> None:
    """s2uc cons-req on GW-B and the consumer's hello: GW-B connects to the DTN's listeners."""
    tb = f.tb
    async with spawn(tb.argv(tb.user, str(BIN / "s2uc"), "cons-req", "--s2cs", f.cons.target, "--server-cert",
                             str(f.cons.cert), s.uid, ",".join(s.prod_listeners)),
                     env=f.env, stdout=asyncio.subprocess.PIPE) as creq:
        seen: list[str] = []
        await read_line_matching(creq.stdout, r"waiting for hello", 30, seen)
        rc, out = await run_in(tb, tb.consumer, str(BIN / "appctrl"), "create-appctrl", s.uid, f.cons.target, "-",
                               "CONS", "--app", "none", "--server-cert", str(f.cons.cert), env=f.env)
        assert rc == 0, out
        rest = (await asyncio.wait_for(creq.stdout.read(), 30)).decode()
        assert await creq.wait() == 0, rest + f.logs()
    s.cons_listeners = ast.literal_eval(rest.split("Listeners:")[1].strip())
    assert all(listener.startswith(tb.gw_b.lan_ip + ":") for listener in s.cons_listeners)


async def bytes_through(f: Facility, s: Session, dtn: Host) -> None:
    """The consumer sends through GW-B and ``dtn`` to the producer's echo: every byte back,
    the producer saw the same bytes, coming from the DTN's LAN address."""
    tb = f.tb
    out_report = f.tmp / f"client-{s.uid}.json"
    rc, out = await run_in(tb, tb.consumer, PY, "-m", "scistream.netns.peer", "echo-client", "--size", str(SIZE),
                           "--report", str(out_report), *s.cons_listeners, timeout=60)
    assert rc == 0, out + (out_report.read_text() if out_report.exists() else "") + f.logs()
    await wait_for(lambda: s.report.exists(), 20, "the echo server's report")
    sent, received = json.loads(out_report.read_text()), json.loads(s.report.read_text())
    assert all(r["echo_ok"] and r["received"] == SIZE for r in sent)
    assert sorted(r["sha256"] for r in sent) == sorted(r["sha256"] for r in received)
    assert {r["endpoint"] for r in received} == set(s.endpoints)
    assert all(r["peer"].startswith(dtn.lan_ip + ":") for r in received), received  # through this DTN


async def placed(f: Facility, s: Session) -> Host:
    """The DTN the facility placed the session's PROD half on; its listeners carry its WAN address."""
    rows = await f.sql("SELECT node, state FROM fsessions WHERE uid = $1 AND role = 'PROD'", s.uid)
    assert len(rows) == 1, rows
    s.node = rows[0]["node"]
    dtn = f.tb.hosts[s.node]
    assert all(listener.startswith(dtn.wan_ip + ":") for listener in s.prod_listeners), (s.node, s.prod_listeners)
    return dtn


async def release(f: Facility, uid: str, ctl: S2cs) -> None:
    for srv in (ctl, f.cons):
        rc, out = await run_in(f.tb, f.tb.user, str(BIN / "s2uc"), "release", uid, "--s2cs", srv.target,
                               "--server-cert", str(srv.cert), env=f.env)
        assert rc == 0 and "Release completed" in out, out


async def status(f: Facility, uid: str, ctl: S2cs) -> list[dict]:
    """``s2uc status --json`` from the user's host on one control instance."""
    rc, out = await run_in(f.tb, f.tb.user, str(BIN / "s2uc"), "status", uid, "--json", "--s2cs", ctl.target,
                           "--server-cert", str(ctl.cert), env=f.env)
    assert rc == 0, out
    return json.loads(out)


def node_sessions(node: DtnNode) -> int:
    out = subprocess.run([str(BIN / "s2ds"), "status", "--json", "--socket", str(node.sock)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["sessions"]


# -- the topology ----------------------------------------------------------------------
async def test_facility_topology_reaches_only_what_it_needs(ftb):
    """Who reaches whom (a refused connection: the host answered; ENETUNREACH: no route)."""
    tb = ftb
    reach = {
        "producer": [tb.dtn_a1.lan_ip, tb.dtn_a2.lan_ip, tb.ctl_a1.control_ip, tb.ctl_a2.control_ip],
        "ctl-a1": [tb.db_a.ip, tb.dtn_a1.addr("mgt0"), tb.dtn_a2.addr("mgt0")],
        "ctl-a2": [tb.db_a.ip, tb.dtn_a1.addr("mgt0"), tb.dtn_a2.addr("mgt0")],
        "dtn-a1": [tb.producer.ip, tb.db_a.ip, tb.gw_b.wan_ip],
        "dtn-a2": [tb.producer.ip, tb.db_a.ip, tb.gw_b.wan_ip],
        "gw-b": [tb.dtn_a1.wan_ip, tb.dtn_a2.wan_ip, tb.consumer.ip],
        "user": [tb.ctl_a1.control_ip, tb.ctl_a2.control_ip, tb.gw_b.control_ip],
        "consumer": [tb.gw_b.control_ip],
    }
    unreachable = {
        "producer": [tb.consumer.ip, tb.gw_b.wan_ip, tb.db_a.ip],
        "ctl-a1": [tb.gw_b.wan_ip, tb.consumer.ip],
        "gw-b": [tb.producer.ip, tb.db_a.ip, tb.ctl_a1.control_ip],
        "user": [tb.producer.ip, tb.consumer.ip, tb.db_a.ip, tb.dtn_a1.wan_ip, tb.dtn_a1.addr("mgt0")],
        "consumer": [tb.producer.ip, tb.dtn_a1.wan_ip, tb.ctl_a1.control_ip],
        "db-a": [tb.producer.ip, tb.gw_b.wan_ip, tb.user.addr("ctl0")],
    }
    want: dict[str, dict[str, str]] = {}
    for src, dsts in reach.items():
        for d in dsts:
            want.setdefault(src, {})[f"{d}:9"] = "ECONNREFUSED"
    for src, dsts in unreachable.items():
        for d in dsts:
            want.setdefault(src, {})[f"{d}:9"] = "ENETUNREACH"
    got = await asyncio.gather(*(probes(tb, tb.hosts[src], list(w)) for src, w in want.items()))
    for (src, w), answers in zip(want.items(), got):
        for listener, expected in w.items():
            assert answers[listener]["error"] == expected, (src, listener, answers[listener])
    for ns in tb.namespaces:
        assert tb.run(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0", ns
        assert _NAME_RE.match(ns), ns   # a crashed run's namespaces are recognised (cleanup_leftovers)


# -- a: sessions spread over both DTNs -------------------------------------------------
async def test_sessions_spread_over_both_dtns_req_and_hello_on_different_instances(ftb, tmp_path):
    async with facility(ftb, tmp_path) as f:
        a, b = f.ctl["ctl-a1"], f.ctl["ctl-a2"]
        sessions = []
        for i, (req_on, hello_on) in enumerate(((a, b), (b, a))):
            s = await prod_half(f, req_on, hello_on, f"s{i}")
            dtn = await placed(f, s)
            await cons_half(f, s)
            sessions.append((s, dtn, req_on, hello_on))
        assert {s.node for s, *_ in sessions} == {"dtn-a1", "dtn-a2"}   # one on each DTN
        for s, dtn, *_ in sessions:
            await bytes_through(f, s, dtn)
        # Either instance tells the user the same: connected, with the node's byte counters.
        for s, *_ in sessions:
            rows = await f.sql("SELECT state FROM fsessions WHERE uid = $1", s.uid)
            assert [r["state"] for r in rows] == ["connected"]
            for ctl in (a, b):
                (d,) = await status(f, s.uid, ctl)
                assert d["state"] == "connected" and d["listeners"] == s.prod_listeners, d
                assert d["bytes_to_consumer"] >= NUM_CONN * SIZE and d["bytes_to_producer"] >= NUM_CONN * SIZE, d
        assert {n: node_sessions(d) for n, d in f.nodes.items()} == {"dtn-a1": 1, "dtn-a2": 1}
        # Released on the instance that took the hello: nothing stays reserved anywhere.
        for s, _, _, hello_on in sessions:
            await release(f, s.uid, hello_on)
        assert await f.live_rows() == []
        await wait_for(lambda: all(node_sessions(d) == 0 for d in f.nodes.values()), 10,
                       "the DTNs to carry nothing")
        for dtn in (ftb.dtn_a1, ftb.dtn_a2):    # no listener on a DTN's WAN address is left
            assert not [p for p in ftb.listening_ports(dtn) if 5100 <= p <= 5119]


# -- b: a control instance killed between req and update ------------------------------
RETRY_CLIENT = """
import asyncio, json, sys
from scistream.client import sessionfile
from scistream.client.api import AsyncClient

async def main(first, first_cert, second, second_cert, uid, n):
    try:
        async with AsyncClient(first, server_cert=first_cert) as c:
            await c.req(uid, "PROD", n, 0)
        print("first answered", flush=True)
        return 1
    except Exception as exc:
        print("first failed:", exc, flush=True)
    async with AsyncClient(second, server_cert=second_cert) as c:
        print("retrying on", second, flush=True)
        r = await c.req(uid, "PROD", n, 0)
        sessionfile.save(uid, role="PROD", s2cs=second, wan_secret=r.wan_secret, listeners=list(r.listeners))
        await c.update(uid, "PROD", list(r.prod_listeners), r.wan_secret)
        print("listeners " + json.dumps(list(r.listeners)), flush=True)
    return 0

sys.exit(asyncio.run(main(*sys.argv[1:6], int(sys.argv[6]))))
"""


async def test_control_instance_killed_between_req_and_update(ftb, tmp_path):
    """The user's client sends the req to CTL-A1, which is killed -9 while the req waits for
    the hello; the client retries the req (same uid) on CTL-A2, the producer's hello goes
    there, the update too: one session, its bytes through its DTN."""
    import uuid
    async with facility(ftb, tmp_path) as f:
        a, b = f.ctl["ctl-a1"], f.ctl["ctl-a2"]
        tb = f.tb
        endpoints, report = await producer_app(f, "b")
        uid = str(uuid.uuid4())
        script = tmp_path / "retry_client.py"
        script.write_text(RETRY_CLIENT)
        async with spawn(tb.argv(tb.user, PY, str(script), a.target, str(a.cert), b.target, str(b.cert), uid,
                                 str(NUM_CONN)), env=f.env, stdout=asyncio.subprocess.PIPE) as client:
            rows = await wait_for(lambda: f.sql("SELECT state, node FROM fsessions WHERE uid = $1", uid), 20,
                                  "the req recorded")
            assert rows[0]["state"] == "requested"
            os.killpg(a.proc.pid, signal.SIGKILL)          # kill -9 of the control instance
            await a.proc.wait()
            seen: list[str] = []
            m = await read_line_matching(client.stdout, r"^first (failed|answered)(.*)$", 30, seen)
            assert m.group(1) == "failed" and "cannot reach the S2CS" in m.group(2), seen
            await read_line_matching(client.stdout, r"^retrying on ", 30, seen)
            await hello(f, uid, b, endpoints)
            got = await read_line_matching(client.stdout, r"^listeners (.*)$", 30, seen)
            assert await asyncio.wait_for(client.wait(), 30) == 0, "\n".join(seen) + f.logs()
        listeners = json.loads(got.group(1))
        rows = await f.sql("SELECT state, node, ports FROM fsessions WHERE uid = $1", uid)
        assert [r["state"] for r in rows] == ["connected"]            # one session, not two
        dtn = tb.hosts[rows[0]["node"]]
        assert listeners == [f"{dtn.wan_ip}:{p}" for p in rows[0]["ports"]]
        s = Session(uid, prod_listeners=listeners, endpoints=endpoints, report=report)
        await cons_half(f, s)
        await bytes_through(f, s, dtn)
        await release(f, uid, b)
        assert await f.live_rows() == []


# -- c: a DTN's node service killed ---------------------------------------------------
async def test_dtn_killed_sessions_fail_new_one_on_the_survivor(ftb, tmp_path):
    async with facility(ftb, tmp_path) as f:
        a, b = f.ctl["ctl-a1"], f.ctl["ctl-a2"]
        tb = f.tb
        sessions = []
        for i in range(2):
            s = await prod_half(f, a, b, f"c{i}")
            await placed(f, s)
            await cons_half(f, s)
            sessions.append(s)
        assert {s.node for s in sessions} == {"dtn-a1", "dtn-a2"}
        victim = f.nodes[sessions[0].node]
        survivor = tb.hosts[sessions[1].node]
        on_victim = [s.uid for s in sessions if s.node == victim.name]
        killed_at = time.time()
        os.killpg(victim.proc.pid, signal.SIGKILL)      # kill -9 of the node service and its workers
        await victim.proc.wait()

        async def failed():
            got = await f.sql("SELECT state, last_error, ended FROM fsessions WHERE uid = ANY($1::text[])",
                              on_victim)
            return got if got and all(r["state"] == "failed" for r in got) else None
        got = await wait_for(failed, NODE_TIMEOUT + 10, "the lost node's sessions failed")
        for r in got:
            assert f"node {victim.name} lost: no heartbeat for {NODE_TIMEOUT} s" in r["last_error"], r
            # after the timeout, within it + one heartbeat + a timer tick (+ slack for a loaded machine)
            assert NODE_TIMEOUT - HEARTBEAT - 0.5 < r["ended"] - killed_at < NODE_TIMEOUT + HEARTBEAT + 3.0, \
                r["ended"] - killed_at
        node_row = (await f.sql("SELECT state FROM nodes WHERE name = $1", victim.name))[0]
        assert node_row["state"] == "lost"
        # nothing of the lost node stays reserved; the survivor's session is still live
        live = await f.live_rows()
        assert {r["node"] for r in live} == {survivor.name}, live
        # a new session goes to the survivor, its bytes through it
        s = await prod_half(f, b, a, "new")
        assert (await placed(f, s)) == survivor
        await cons_half(f, s)
        await bytes_through(f, s, survivor)
        # the user is told why, on either instance
        for ctl in (a, b):
            (d,) = await status(f, on_victim[0], ctl)
            assert d["state"] == "failed" and f"node {victim.name} lost" in d["last_error"], d
        # the operator's view, from a control host over the management LAN
        rc, out = await run_in(tb, tb.ctl_a2, str(BIN / "s2cs"), "nodes", "list", "--json", "--store", f.net_url)
        assert rc == 0, out
        by = {n["name"]: n for n in json.loads(out)["nodes"]}
        assert by[victim.name]["state"] == "lost" and by[victim.name]["sessions"] == 0, by
        assert by[victim.name]["ports_used"] == 0, by
        assert by[survivor.name]["state"] == "up" and by[survivor.name]["sessions"] == 2, by
        for uid in [sessions[1].uid, s.uid]:
            await release(f, uid, a)
        assert await f.live_rows() == []
        # the failed session's CONS half on GW-B is the user's to release (GW-B's data service
        # keeps a live session across a restart of its s2cs, so it must not be left live)
        rc, out = await run_in(tb, tb.user, str(BIN / "s2uc"), "release", on_victim[0], "--s2cs", f.cons.target,
                               "--server-cert", str(f.cons.cert), env=f.env)
        assert rc == 0 and "Release completed" in out, out
