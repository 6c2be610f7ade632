"""UDP across two facilities in network namespaces (Builtin, WAN leg encrypted or plain): before the
session the consumer's datagrams cannot reach the producer; during it, numbered datagrams
go through GW-B and GW-A and come back, the producer sees them from GW-A only, and the WAN
capture never shows their bytes in clear when the leg is encrypted (and does when it is
plain); after release nothing answers on the port."""
from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import secrets

import pytest

from nshelpers import (BIN, PY, capture, cli_env, needs_testbed, read_line_matching, run_in, spawn, start_s2cs,
                       testbed, wait_for)  # noqa: F401  (testbed is a fixture)

pytestmark = [pytest.mark.root, needs_testbed]

ECHO = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
seen = set()
while True:
    data, addr = s.recvfrom(65536)
    if addr[0] not in seen:
        seen.add(addr[0])
        print(json.dumps({"source": addr[0]}), flush=True)
    s.sendto(b"echo" + data, addr)
"""

CLIENT = r"""
import json, socket, sys, time
host, port, marker, count = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
ok, error = 0, ""
for seq in range(count):
    msg = b"%d:" % seq + marker * 20
    for _ in range(5):
        try:
            s.sendto(msg, (host, port))
            data, _ = s.recvfrom(65536)
        except OSError as exc:
            error = type(exc).__name__ + ": " + str(exc)
            continue
        if data == b"echo" + msg:
            ok += 1
            break
print(json.dumps({"ok": ok, "error": error}), flush=True)
"""


@pytest.mark.parametrize("wan", ["tls", "plain"])
async def test_udp_crosses_only_through_the_session(testbed, tmp_path, wan):
    tb = testbed
    extra = ("--wan-plaintext",) if wan == "plain" else ()
    env = cli_env(tmp_path)
    marker = f"SCISTREAM-UDP-{secrets.token_hex(6)}"
    s2uc, appctrl = str(BIN / "s2uc"), str(BIN / "appctrl")
    async with contextlib.AsyncExitStack() as stack:
        echo = await stack.enter_async_context(spawn(tb.argv(tb.producer, PY, "-c", ECHO, tb.producer.ip),
                                                     stdout=asyncio.subprocess.PIPE))
        port = json.loads(await asyncio.wait_for(echo.stdout.readline(), 20))["port"]
        endpoint = f"{tb.producer.ip}:{port}"
        prod, cons = await asyncio.gather(
            start_s2cs(stack, tb, tb.gw_a, tmp_path, listener_ip=tb.gw_a.wan_ip, server_type="Builtin", extra=extra),
            start_s2cs(stack, tb, tb.gw_b, tmp_path, listener_ip=tb.gw_b.lan_ip, server_type="Builtin", extra=extra))

        # Before any session the consumer's datagrams do not reach the producer.
        rc, out = await run_in(tb, tb.consumer, PY, "-c", CLIENT, tb.producer.ip, str(port), marker, "1")
        assert json.loads(out.splitlines()[-1])["ok"] == 0, out

        preq = await stack.enter_async_context(spawn(tb.argv(
            tb.user, s2uc, "prod-req", "--s2cs", prod.target, "--server-cert", str(prod.cert), "--num-conn", "1"),
            env=env, stdout=asyncio.subprocess.PIPE))
        seen: list[str] = []
        uid = (await read_line_matching(preq.stdout, r"^([0-9a-f-]{36}) \S+ - PROD$", 30, seen)).group(1)
        rc, out = await run_in(tb, tb.producer, appctrl, "create-appctrl", uid, prod.target, "-", "PROD",
                               tb.producer.ip, "--app", "none", "--server-cert", str(prod.cert),
                               "--endpoint", endpoint, env=env)
        assert rc == 0, out
        rest = (await asyncio.wait_for(preq.stdout.read(), 30)).decode()
        assert await preq.wait() == 0, rest + prod.log_text()
        prod_listeners = [l.split('"')[1] for l in rest.splitlines() if l.startswith("listeners:")]
        creq = await stack.enter_async_context(spawn(tb.argv(
            tb.user, s2uc, "cons-req", "--s2cs", cons.target, "--server-cert", str(cons.cert),
            uid, ",".join(prod_listeners)), env=env, stdout=asyncio.subprocess.PIPE))
        await read_line_matching(creq.stdout, r"waiting for hello", 30, seen)
        rc, out = await run_in(tb, tb.consumer, appctrl, "create-appctrl", uid, cons.target, "-", "CONS",
                               "--app", "none", "--server-cert", str(cons.cert), env=env)
        assert rc == 0, out
        rest = (await asyncio.wait_for(creq.stdout.read(), 30)).decode()
        assert await creq.wait() == 0, rest + cons.log_text()
        (listener,) = ast.literal_eval(rest.split("Listeners:")[1].strip())
        host, _, lport = listener.rpartition(":")

        pcap = tmp_path / "wan.pcap"
        async with capture(tb, tb.gw_a, "wan0", pcap):
            rc, out = await run_in(tb, tb.consumer, PY, "-c", CLIENT, host, lport, marker, "50", timeout=120)
            await wait_for(lambda: pcap.stat().st_size > 50 * len(marker) * 20, 10, "the capture written")
        assert json.loads(out.splitlines()[-1])["ok"] == 50, out + prod.log_text() + cons.log_text()
        source = json.loads(await asyncio.wait_for(echo.stdout.readline(), 10))["source"]
        assert source == tb.gw_a.lan_ip              # the producer heard GW-A's data server only
        data = pcap.read_bytes()
        assert len(data) > 50 * len(marker) * 20, "the datagrams did not cross the WAN"
        if wan == "tls":
            assert marker.encode() not in data, "the marker crossed the WAN in clear"
        else:       # the capture does show datagrams that cross in the clear
            assert marker.encode() in data, "plain WAN leg, yet the marker is not in the capture"

        rc, out = await run_in(tb, tb.user, s2uc, "status", uid, "--s2cs", cons.target,
                               "--server-cert", str(cons.cert), env=env)
        assert rc == 0 and ("encrypted on the WAN leg" if wan == "tls" else "plain (as the WAN leg)") in out, out
        for srv in (prod, cons):
            rc, out = await run_in(tb, tb.user, s2uc, "release", uid, "--s2cs", srv.target,
                                   "--server-cert", str(srv.cert), env=env)
            assert rc == 0 and "Release completed" in out, out
        rc, out = await run_in(tb, tb.consumer, PY, "-c", CLIENT, host, lport, marker, "1")
        assert json.loads(out.splitlines()[-1])["ok"] == 0, out
