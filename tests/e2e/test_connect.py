"""`s2uc connect` end to end: real `s2cs` processes, real application controllers (started
by connect with --start-apps, or separately from the lines it prints), bytes verified,
human and --json output, and Ctrl-C / SIGTERM releasing everything."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import threading

import pytest

from conftest import BIN, new_uid, port_block, processes_mentioning, wait_until
from scistream.client import Gateway, status
from scistream.errors import NotFound, ResourceExhausted


class Proc:
    """A CLI process with stdout and stderr read line by line in the background."""

    def __init__(self, *args: str, env: dict, group: bool = False) -> None:
        self.proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
                                     start_new_session=group)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                         for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def text(self) -> str:
        return "\n".join(self.out) + "\n--- stderr ---\n" + "\n".join(self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args: str, env: dict, group: bool = False) -> Proc:
        p = Proc(*args, env=env, group=group)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


@pytest.fixture
def gateways(s2cs_process):
    """Two TLS control servers, each with its own self-signed certificate."""
    prod, cons = s2cs_process(insecure=False), s2cs_process(insecure=False)
    pcert, ccert = str(prod.state_dir / "server.crt"), str(cons.state_dir / "server.crt")
    args = ["--prod-s2cs", prod.target, "--cons-s2cs", cons.target,
            "--prod-server-cert", pcert, "--cons-server-cert", ccert]
    return prod, cons, args, Gateway(prod.target, server_cert=pcert), Gateway(cons.target, server_cert=ccert)


def run(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def sessions(g: Gateway, uid: str) -> list:
    return asyncio.run(status(g, uid))


def states_so_far(g: Gateway, uid: str) -> list[str]:
    """The uid's states on g; none yet while its req is still on the way."""
    try:
        return [s.state for s in sessions(g, uid)]
    except NotFound:
        return []


def assert_released(g: Gateway, uid: str) -> None:
    states = [s.state for s in sessions(g, uid)]
    assert states and set(states) == {"released"}, f"{g.address}: {states}"
    assert not [s for s in asyncio.run(status(g)) if s.active], "a session is still active"


# -- --start-apps ----------------------------------------------------------------------
def test_start_apps_streams_verifies_and_releases(gateways, cli_env):
    prod, cons, args, pg, cg = gateways
    p = run("s2uc", "connect", *args, "--num-conn", "2", "--start-apps", "--size", "32M", env=cli_env)
    assert p.returncode == 0, p.stdout + p.stderr
    uid = re.search(r"^session (\S+): PROD S2CS", p.stdout, re.M).group(1)
    assert "consumer verified 33554432 bytes over 2 connection(s)" in p.stdout
    assert re.search(r"^consumer listeners: 127\.0\.0\.1:\d+ 127\.0\.0\.1:\d+$", p.stdout, re.M)
    assert "connected in" in p.stdout and "(WAN leg tls)" in p.stdout
    assert "released PROD and CONS" in p.stdout
    for step in ("requested", "prod-hello", "cons-hello", "prod-connected", "connected"):
        assert f"] {step}: " in p.stderr
    assert_released(pg, uid)
    assert_released(cg, uid)
    [st] = sessions(pg, uid)
    assert st.bytes_out >= 32 << 20, "the bytes went through the PROD data server"


def test_start_apps_json(gateways, cli_env):
    prod, cons, args, pg, cg = gateways
    p = run("s2uc", "connect", *args, "--num_conn", "3", "--start-apps", "--size", "3M", "--json", env=cli_env)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)  # the whole of stdout is one document
    assert doc["transfer"]["bytes"] == 3 << 20 and doc["transfer"]["streams"] == 3
    assert doc["transfer"]["released"] == {"uid": doc["uid"], "prod": True, "cons": True}
    assert len(doc["consumer_listeners"]) == len(doc["wan_listeners"]) == len(doc["producer_endpoints"]) == 3
    assert doc["wan_security"] == "tls" and doc["num_conn"] == 3
    assert [s["step"] for s in doc["steps"]][-1] == "connected"
    assert "secret" not in p.stdout
    assert_released(pg, doc["uid"])
    assert_released(cg, doc["uid"])


# -- application controllers started separately -------------------------------------------
def _appctrl_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    found = [shlex.split(l.strip()) for l in lines if l.strip().startswith("appctrl create-appctrl")]
    prod = next(a for a in found if "PROD" in a)
    cons = next(a for a in found if "CONS" in a)
    return prod, cons


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_separate_apps_from_the_printed_lines(gateways, cli_env, procs, as_json):
    prod, cons, args, pg, cg = gateways
    conn = procs("s2uc", "connect", *args, "--num-conn", "2", *(["--json"] if as_json else []), env=cli_env)
    where = conn.err if as_json else conn.out
    wait_until(lambda: sum("appctrl create-appctrl" in l for l in where) == 2, 30, "the appctrl lines")
    pargv, cargv = _appctrl_lines(where)
    assert pargv[4:6] == ["-", "PROD"] and ["--num-conn", "2"] == pargv[7:9]
    assert pargv[pargv.index("--server-cert") + 1] == str(prod.state_dir / "server.crt")
    assert cargv[cargv.index("--server-cert") + 1] == str(cons.state_dir / "server.crt")
    producer = procs(*pargv, "--size", "16M", "--connections", "2", env=cli_env)
    consumer = procs(*cargv, "--size", "16M", env=cli_env)
    assert consumer.wait(120) == 0, consumer.text()
    assert "consumer verified 16777216 bytes over 2 connection(s)" in "\n".join(consumer.out)  # --size: in all
    assert producer.wait(60) == 0, producer.text()
    assert conn.wait(60) == 0, conn.text()
    hello = re.search(r"consumer listeners: \[(.*)\]", "\n".join(consumer.out)).group(1)
    from_hello = [s.strip(" '") for s in hello.split(",")]
    uid = pargv[2]
    if as_json:
        doc = json.loads("\n".join(conn.out))
        assert doc["uid"] == uid and doc["consumer_listeners"] == from_hello
        assert "transfer" not in doc
    else:
        line = next(l for l in conn.out if l.startswith("consumer listeners: "))
        assert line.split(": ")[1].split() == from_hello
    # the session stays up after connect exits; the release line it printed releases both
    # sides as printed (with the certificates); with --json, `s2uc disconnect UID` alone
    # finds both sides and their certificates in the session file
    assert {s.state for s in sessions(pg, uid)} == {"connected"}
    if as_json:
        argv = ["s2uc", "disconnect", uid]
    else:
        printed = next(l for l in conn.out if l.startswith("release with: "))
        argv = shlex.split(printed.removeprefix("release with: "))
        assert argv[:3] == ["s2uc", "disconnect", uid] and "--prod-server-cert" in argv
    d = run(*argv, env=cli_env)
    assert d.returncode == 0 and d.stdout.strip() == "Release completed: PROD and CONS", d.stdout + d.stderr
    assert_released(pg, uid)
    assert_released(cg, uid)
    again = run("s2uc", "disconnect", uid, *args, env=cli_env)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr and len(again.stderr.strip().splitlines()) == 1


# -- interruption --------------------------------------------------------------------------
def test_sigint_while_waiting_releases_everything(s2cs_process, cli_env, procs):
    """Ctrl-C during the wait for the hellos: both sessions released, every port free again."""
    block_p, block_c = port_block(3), port_block(3)
    prod = s2cs_process("--port-range", block_p)
    cons = s2cs_process("--port-range", block_c)
    pg, cg = Gateway(prod.target, insecure=True), Gateway(cons.target, insecure=True)
    conn = procs("s2uc", "connect", "--prod-s2cs", prod.target, "--cons-s2cs", cons.target, "--insecure",
                 "--num-conn", "3", env=cli_env)
    wait_until(lambda: any("] requested:" in l for l in conn.err), 30, "the reqs")
    uid = re.search(r"^session (\S+):", conn.out[0]).group(1)
    wait_until(lambda: states_so_far(pg, uid) == ["requested"] and states_so_far(cg, uid) == ["requested"],
               30, "both sessions waiting")
    conn.proc.send_signal(signal.SIGINT)
    assert conn.wait(60) == 130, conn.text()
    assert any("connect interrupted (SIGINT)" in l for l in conn.err)
    assert_released(pg, uid)
    assert_released(cg, uid)
    # every reserved port is free: a new session can take the whole range on each side
    for g in (pg, cg):
        wait_until(lambda: _can_take_all_ports(g, 3), 10, f"all 3 ports of {g.address} to be free")


def _can_take_all_ports(g: Gateway, n: int) -> bool:
    try:
        return asyncio.run(_take_all_ports(g, n)) == n
    except ResourceExhausted:
        return False


async def _take_all_ports(g: Gateway, n: int) -> int:
    uid = new_uid()
    async with g.client() as c:
        req = asyncio.create_task(c.req(uid, "PROD", n))
        await c.hello(uid, "PROD", ["127.0.0.1:9"])
        resp = await req
        await c.release(uid)
    return len(resp.listeners)


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_signal_during_transfer_stops_apps_and_releases(gateways, cli_env, procs, how):
    """SIGTERM to s2uc, or Ctrl-C at a terminal (SIGINT to its whole process group)."""
    prod, cons, args, pg, cg = gateways
    conn = procs("s2uc", "connect", *args, "--num-conn", "2", "--start-apps", "--size", "64G", env=cli_env,
                 group=True)
    wait_until(lambda: any("] connected:" in l for l in conn.err), 60, "the session to connect")
    uid = re.search(r"^session (\S+):", conn.out[0]).group(1)
    apps = [p for p in processes_mentioning(uid).values() if "appctrl create-appctrl" in p]
    assert len(apps) == 2, "the two appctrl processes should be running"
    if how == "SIGTERM":
        conn.proc.send_signal(signal.SIGTERM)
        assert conn.wait(60) == 143, conn.text()
    else:
        os.killpg(conn.proc.pid, signal.SIGINT)
        assert conn.wait(60) == 130, conn.text()
    sig = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    assert any(f"connect interrupted ({sig})" in l and "apps it started were stopped" in l for l in conn.err)
    wait_until(lambda: not processes_mentioning(uid), 10, "the appctrl and data server processes to stop")
    assert_released(pg, uid)
    assert_released(cg, uid)


def test_hold_releases_on_sigterm(gateways, cli_env, procs):
    prod, cons, args, pg, cg = gateways
    conn = procs("s2uc", "connect", *args, "--hold", "--json", env=cli_env)
    wait_until(lambda: sum("appctrl create-appctrl" in l for l in conn.err) == 2, 30, "the appctrl lines")
    pargv, cargv = _appctrl_lines(conn.err)
    producer = procs(*pargv, "--app", "none", "--endpoint", "127.0.0.1:9", env=cli_env)
    consumer = procs(*cargv, "--app", "none", env=cli_env)
    assert producer.wait(60) == 0 and consumer.wait(60) == 0, producer.text() + consumer.text()
    wait_until(lambda: conn.out and conn.out[-1] == "}", 60, "the JSON document")
    doc = json.loads("\n".join(conn.out))
    assert {s.state for s in sessions(cg, doc["uid"])} == {"connected"}
    conn.proc.send_signal(signal.SIGTERM)
    assert conn.wait(60) == 0, conn.text()
    assert any(f"session {doc['uid']} released (SIGTERM): PROD freed, CONS freed" in l for l in conn.err)
    assert_released(pg, doc["uid"])
    assert_released(cg, doc["uid"])


# -- errors ----------------------------------------------------------------------------
def test_errors_are_one_line_with_the_fix(s2cs_process, cli_env):
    prod = s2cs_process()
    cons = s2cs_process()
    base = ["s2uc", "connect", "--prod-s2cs", prod.target, "--cons-s2cs", cons.target, "--insecure"]
    p = run(*base, "--hello-timeout", "0.5", env=cli_env)
    assert p.returncode == 4, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("connect failed (DEADLINE_EXCEEDED): ") and "start it with the uid" in last
    uid = re.search(r"^session (\S+):", p.stdout).group(1)
    assert_released(Gateway(prod.target, insecure=True), uid)
    j = run(*base, "--hello-timeout", "0.5", "--json", env=cli_env)
    doc = json.loads(j.stdout)
    assert j.returncode == 4 and doc["error"]["code"] == "DEADLINE_EXCEEDED" and doc["error"]["exit"] == 4
    # nothing listens there: UNAVAILABLE, retry (4), saying what to check
    dead = run("s2uc", "connect", "--prod-s2cs", "127.0.0.1:9", "--cons-s2cs", cons.target, "--insecure",
               "--hello-timeout", "20", env=cli_env)
    assert dead.returncode == 4 and "cannot reach the S2CS at 127.0.0.1:9" in dead.stderr
    # mistakes found before anything is sent: usage (2), said as local
    bad = run(*base, "--uid", "not-a-uuid", env=cli_env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "is not a UUID" in bad.stderr
    assert "(local mistake)" in bad.stderr
    usage = run(*base, "--num-conn", "0", env=cli_env)
    assert usage.returncode == 2
    both = run(*base, "--start-apps", "--hold", env=cli_env)
    assert both.returncode == 2 and "--hold and --start-apps" in both.stderr
