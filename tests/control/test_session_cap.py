"""The per-session connection cap set on a real control server (``--max-session-conns``):
the data servers of a session refuse connections over it, and the refusals show in the
Prometheus metrics."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from conftest import async_wait_until, echo_roundtrip, new_uid, parse_listener, port_block
from scistream.data.base import BackendUnavailable, get_backend
from test_metrics import scrape, val
from test_status import s2uc


def _capping(name: str):
    cls = get_backend(name)
    try:
        cls.check_available()
    except BackendUnavailable as exc:
        return pytest.param(name, marks=pytest.mark.skip(reason=str(exc)))
    if not cls.caps_conns:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"{name} does not cap connections"))
    return name


@pytest.mark.parametrize("kind", [_capping(n) for n in ("Builtin", "Haproxy", "Nginx")])
async def test_max_session_conns_refuses_and_counts(kind, servers, client_for, echo_server):
    srv = await servers(server_type=kind, max_session_conns=2, metrics_port=0, wan_plaintext=True,
                        port_range=port_block(4))
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 2))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="req arrived")
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await c.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
    held = []
    try:
        for listener in resp.listeners:   # one held stream per listener: the cap is reached
            r, w = await asyncio.open_connection(*parse_listener(listener))
            held.append(w)
            w.write(b"ping")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(4), 15) == b"ping"
        payload = os.urandom(100_000)
        for listener in resp.listeners:
            try:
                back = await echo_roundtrip(*parse_listener(listener), payload, timeout=15)
            except (ConnectionError, OSError):
                back = b""
            assert back == b"", "a third connection got through a cap of 2"

        async def refused() -> bool:
            _, m = await scrape(srv.metrics_port)
            return val(m, "scistream_connections_refused_total") == 2
        await async_wait_until(refused, 15, "2 refusals in the metrics")
        rc, out, err = await s2uc("status", uid, "--s2cs", srv.target, "--insecure", "--json")
        assert rc == 0, err
        (row,) = json.loads(out)
        assert row["refused_connections"] == 2
        rc, out, err = await s2uc("status", uid, "--s2cs", srv.target, "--insecure")
        assert rc == 0 and "2 refused (over the cap)" in out, out + err
        held.pop().close()   # the last listener's: a place there (Builtin splits the cap over workers)

        async def through() -> bool:
            try:
                return await echo_roundtrip(*parse_listener(resp.listeners[-1]), payload, timeout=15) == payload
            except (ConnectionError, OSError):
                return False
        await async_wait_until(through, 15, "a place freed by a closed stream")
    finally:
        for w in held:
            w.close()
    await c.release(uid)
    _, m = await scrape(srv.metrics_port)
    assert val(m, "scistream_connections_refused_total") >= 2   # ended sessions stay counted


def test_max_session_conns_in_the_config_file(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('auth = "none"\nmax-session-conns = 256\n')
    bad.write_text('auth = "none"\nmax-session-conns = -1\n')
    run = [sys.executable, "-m", "scistream.cli.s2cs", "check-config"]
    p = subprocess.run([*run, str(good)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "max-session-conns" in p.stdout
    p = subprocess.run([*run, str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{bad}:2: max-session-conns: -1 is not in the range" in p.stdout + p.stderr
