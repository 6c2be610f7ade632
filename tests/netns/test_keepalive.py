"""A peer that vanishes without a word (the WAN link is cut: no FIN, no reset) is found by
the built-in data server's TCP keepalive (a session in the node service on GW-A), and its
connection is closed on both sides; a quiet but live connection is kept."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

from conftest import port_block
from nshelpers import PY, needs_testbed, testbed, wait_for  # noqa: F401  (testbed is a fixture)
from scistream.data.node.client import ServiceError, call_once
from scistream.netns import spawn

pytestmark = needs_testbed

# Connects, checks one echo, then holds the connection open and quiet until killed.
HOLDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
s.sendall(b"hello")
got = b""
while len(got) < 5:
    got += s.recv(5 - len(got))
print("echoed" if got == b"hello" else "wrong echo %r" % got, flush=True)
time.sleep(600)
"""


async def _stats(control, sid: str) -> dict:
    return (await call_once(control, {"op": "stats", "sid": sid}))["stats"]


async def test_vanished_wan_peer_is_dropped_by_keepalive(testbed, tmp_path):
    tb = testbed
    stack = contextlib.AsyncExitStack()
    async with stack:
        # the producer's application: an echo server on A's LAN
        ready, report = tmp_path / "echo.ready", tmp_path / "echo.report"
        await stack.enter_async_context(spawn(
            tb.argv(tb.producer, PY, "-m", "scistream.netns.peer", "echo-server", "--bind", tb.producer.ip,
                    "--connections", "1", "--ready", str(ready), "--report", str(report)),
            log_path=tmp_path / "echo.log"))
        await wait_for(ready.exists, 20, "echo server")
        (endpoint,) = json.loads(ready.read_text())["endpoints"]

        # GW-A's node service, one session: a plain WAN listener, keepalive after 1 s idle,
        # 1 probe/s, 2 probes
        port = int(port_block(1).split("-")[0])
        control = tmp_path / "node.sock"
        await stack.enter_async_context(spawn(
            tb.argv(tb.gw_a, PY, "-m", "scistream.cli.s2ds", "serve", "--socket", str(control), "--workers", "1",
                    "--fresh"), log_path=tmp_path / "s2ds.log"))

        async def answers() -> bool:
            try:
                return bool((await call_once(control, {"op": "ping"}, 1.0)).get("ok"))
            except (OSError, ServiceError):
                return False
        await wait_for(answers, 20, "the node service's control socket")
        uid = str(uuid.uuid4())
        sid = f"{uid}/PROD"
        await call_once(control, {"op": "add", "sid": sid, "cfg": {
            "uid": uid, "role": "PROD", "listen_host": tb.gw_a.wan_ip, "ports": [port],
            "targets": [endpoint], "rate_kbps": 0, "tls": False, "keepalive": [1, 1, 2]}})

        # GW-B's side of the WAN holds one quiet connection through GW-A's listener
        holder = await stack.enter_async_context(spawn(
            tb.argv(tb.gw_b, PY, "-c", HOLDER, tb.gw_a.wan_ip, str(port)), stdout=asyncio.subprocess.PIPE))
        line = await asyncio.wait_for(holder.stdout.readline(), 20)
        assert line.strip() == b"echoed"

        # Quiet but alive: the probes are answered, and the connection stays for twice the
        # time a dead peer takes to be found (1 s + 2 x 1 s).
        deadline = asyncio.get_running_loop().time() + 6
        while asyncio.get_running_loop().time() < deadline:
            st = await _stats(control, sid)
            assert st["connections"] == 1 and st["failed_connections"] == 0, st
            await asyncio.sleep(0.5)

        # Cut the WAN link at GW-B: GW-A's probes go unanswered, nothing is ever sent back.
        tb.run(tb.gw_b, "ip", "link", "set", "wan0", "down")

        async def dropped() -> bool:
            st = await _stats(control, sid)
            return st["connections"] == 0 and st["failed_connections"] == 1
        await wait_for(dropped, 20, "the vanished peer's connection to be dropped")
        # ... and the producer's side of it was closed too
        await wait_for(report.exists, 10, "the echo server to see its connection end")
        (conn,) = json.loads(report.read_text())
        assert conn["bytes"] == 5
        log = (tmp_path / "s2ds.log").read_text()
        assert "timed out" in log.lower(), log[-2000:]
