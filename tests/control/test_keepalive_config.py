"""--tcp-keepalive: parsed and checked at start, and handed to every data server."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from conftest import new_uid
from scistream.data.spec import KEEPALIVE, parse_keepalive


def test_parse_keepalive():
    assert parse_keepalive("60,15,4") == (60, 15, 4) == KEEPALIVE
    assert parse_keepalive(" 5, 2 ,3") == (5, 2, 3)
    assert parse_keepalive("system") == parse_keepalive("0") == (0, 0, 0)
    for bad in ("60,15", "a,b,c", "0,1,1", "60,15,0", "40000,1,1", ""):
        with pytest.raises(ValueError, match="keepalive"):
            parse_keepalive(bad)


def test_s2cs_refuses_a_bad_keepalive(tmp_path):
    p = subprocess.run([sys.executable, "-m", "scistream.cli.s2cs", "--auth", "none", "--port", "0",
                        "--state-dir", str(tmp_path), "--tcp-keepalive", "60,15"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--tcp-keepalive" in p.stderr and "IDLE,INTERVAL,COUNT" in p.stderr


@pytest.mark.parametrize("setting", [(30, 5, 3), (0, 0, 0)], ids=["30,5,3", "system"])
async def test_data_servers_get_the_servers_keepalive(servers, client_for, echo_server, setting):
    srv = await servers(tcp_keepalive=setting, wan_plaintext=True)
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await c.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
    session = srv.registry.active[(uid, "PROD")]
    cfg = await session.server.config()      # what the node service holds for the session
    assert tuple(cfg["keepalive"]) == setting
    await c.release(uid)
