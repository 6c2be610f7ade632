"""The audit log: one JSON line per event, who did what to which session and the result,
failures too, in the state directory, mode 0600, apart from the debug log, no secrets."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat

import pytest

from conftest import async_wait_until, new_uid
from scistream import errors
from scistream.client import AsyncClient


def read_audit(srv) -> list[dict]:
    return [json.loads(line) for line in (srv.state_dir / "audit.log").read_text().splitlines()]


async def test_audit_lines_for_a_full_session(servers, tmp_path, echo_server):
    from scistream.auth.static import add_token
    tokens = tmp_path / "tokens"
    alice, bob = add_token(tokens, "alice"), add_token(tokens, "bob")
    srv = await servers(auth="static", auth_options={"token_file": tokens}, hello_timeout=0.5)
    a = AsyncClient(srv.target, insecure=True, token=alice)
    b = AsyncClient(srv.target, insecure=True, token=bob)
    anon = AsyncClient(srv.target, insecure=True)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    try:
        uid = new_uid()
        req = asyncio.create_task(a.req(uid, "PROD", 2))
        await a.hello(uid, "PROD", [ep])
        resp = await req
        await a.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
        await a.status(uid)
        with pytest.raises(errors.PermissionDenied):
            await b.release(uid)
        with pytest.raises(errors.Unauthenticated):
            await anon.release(uid)
        await a.release(uid)
        with pytest.raises(errors.NotFound):
            await a.release(uid)
        late = new_uid()
        with pytest.raises(errors.DeadlineExceeded):
            await a.req(late, "CONS", 1)   # no hello: the server expires it
    finally:
        for c in (a, b, anon):
            await c.close()

    path = srv.state_dir / "audit.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = read_audit(srv)
    for line in lines:
        assert set(line) >= {"time", "who", "peer", "what", "uid", "role", "result", "detail"}
        assert line["time"].endswith("Z") and "T" in line["time"]
    mine = [(l["who"], l["what"], l["role"], l["result"]) for l in lines if l["uid"] == uid]
    # req and hello end together, in either order
    assert sorted(mine[:2]) == [("alice", "hello", "PROD", "OK"), ("alice", "req", "PROD", "OK")]
    assert mine[2:] == [
        ("alice", "update", "PROD", "OK"),
        ("alice", "status", "", "OK"),
        ("bob", "release", "", "PERMISSION_DENIED"),
        ("", "release", "", "UNAUTHENTICATED"),
        ("alice", "release", "PROD", "OK"),
        ("alice", "release", "", "NOT_FOUND"),
    ]
    assert all(l["peer"].startswith("ipv4:127.0.0.1:") for l in lines if l["uid"] == uid)
    denied = next(l for l in lines if l["result"] == "PERMISSION_DENIED")
    assert "belongs to another identity" in denied["detail"]
    late_lines = [(l["who"], l["what"], l["result"]) for l in lines if l["uid"] == late]
    assert ("s2cs", "expired", "EXPIRED") in late_lines
    assert ("alice", "req", "DEADLINE_EXCEEDED") in late_lines
    text = path.read_text()
    for secret in (alice, bob, resp.wan_secret.hex(), base64.b64encode(resp.wan_secret).decode()):
        assert secret not in text
    # apart from the debug log: nothing of it goes through logging
    assert not any("audit" in getattr(h, "baseFilename", "") for h in __import__("logging").root.handlers)


async def test_audit_logs_restarts_and_hostile_input(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await req
    huge = "\x00\u202e" + "x" * 5000
    with pytest.raises(errors.InvalidArgument):
        await c.release(huge)
    await srv.stop(release=False)
    srv2 = await servers(state_dir=srv.state_dir, port_range=srv.config.port_range)
    await client_for(srv2).release(uid)
    lines = read_audit(srv2)
    assert ("s2cs", "kept", "OK") in [(l["who"], l["what"], l["result"]) for l in lines if l["uid"] == uid]
    assert ("s2cs", "adopted", "OK") in [(l["who"], l["what"], l["result"]) for l in lines if l["uid"] == uid]
    bad = next(l for l in lines if l["result"] == "INVALID_ARGUMENT")
    assert len(bad["uid"]) < 600 and bad["uid"].startswith("\x00\u202e")  # clipped, escaped, one line
    raw = (srv2.state_dir / "audit.log").read_bytes()
    assert raw.count(b"\n") == len(lines) and b"\x00" not in raw and os.path.getsize(
        srv2.state_dir / "audit.log") == len(raw)


async def test_sighup_reopens_the_audit_log_for_rotation(s2cs_process):
    """logrotate moves audit.log away and sends SIGHUP (deploy/logrotate.conf): the server
    keeps running and writes on in a fresh audit.log (0600)."""
    srv = await asyncio.to_thread(s2cs_process)
    audit = srv.state_dir / "audit.log"
    async with AsyncClient(srv.target, insecure=True) as c:
        with pytest.raises(errors.NotFound):
            await c.release(new_uid())
        await async_wait_until(lambda: audit.exists() and "release" in audit.read_text(), what="a line")
        rotated = audit.with_name("audit.log.1")
        audit.rename(rotated)
        os.kill(srv.proc.pid, signal.SIGHUP)
        await async_wait_until(audit.exists, what="a fresh audit.log")
        uid = new_uid()
        with pytest.raises(errors.NotFound):
            await c.release(uid)
        await async_wait_until(lambda: uid in audit.read_text(), what="the new line in the new file")
    assert uid not in rotated.read_text() and "release" in rotated.read_text()
    assert audit.stat().st_mode & 0o777 == 0o600
    assert srv.proc.poll() is None          # SIGHUP did not stop it
