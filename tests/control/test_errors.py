"""Every bad input of the walking skeleton gets its status code, frees what it reserved,
and leaves the server serving."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from conftest import async_wait_until, new_uid
from scistream import errors


async def _assert_code(coro, code: grpc.StatusCode) -> str:
    with pytest.raises(errors.ScistreamError) as info:
        await coro
    assert info.value.status.name == code.name, f"{info.value.status} != {code}: {info.value}"
    assert str(info.value)  # a message that says something
    return str(info.value)


async def _still_serves(c, srv, echo) -> None:
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo[0]}:{echo[1]}"])
    await req
    await c.release(uid)
    assert srv.registry.ports.used == set()
    assert srv.registry.active == {}


async def test_unknown_uid(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    await _assert_code(c.update(new_uid(), "PROD", ["127.0.0.1:9"]), grpc.StatusCode.NOT_FOUND)
    await _assert_code(c.release(new_uid()), grpc.StatusCode.NOT_FOUND)
    await _still_serves(c, srv, echo_server)


async def test_hello_without_req_fails_after_grace(servers, client_for, echo_server):
    srv = await servers(hello_grace=0.3)
    c = client_for(srv)
    msg = await _assert_code(c.hello(new_uid(), "PROD", ["127.0.0.1:7000"]), grpc.StatusCode.NOT_FOUND)
    assert "prod-req" in msg
    await _still_serves(c, srv, echo_server)


async def test_duplicate_req_already_exists(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    first = asyncio.create_task(c.req(uid, "PROD", 2))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="first req")
    await _assert_code(c.req(uid, "PROD", 2), grpc.StatusCode.ALREADY_EXISTS)
    assert len(srv.registry.ports.used) == 2  # the refused req reserved nothing
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await first
    await c.release(uid)
    await _still_serves(c, srv, echo_server)


@pytest.mark.parametrize("uid,role,num_conn,rate", [
    ("not-a-uuid", "PROD", 1, 0),
    ("", "PROD", 1, 0),
    ("x" * 100_000, "PROD", 1, 0),
    (None, "BOTH", 1, 0),
    (None, "", 1, 0),
    (None, "prod", 1, 0),
    (None, "PROD", 0, 0),
    (None, "PROD", -3, 0),
    (None, "PROD", 65, 0),
    (None, "PROD", 1, -1),
])
async def test_bad_req_invalid_argument(servers, client_for, echo_server, uid, role, num_conn, rate):
    srv = await servers(max_conn=64)
    c = client_for(srv)
    await _assert_code(c.req(uid if uid is not None else new_uid(), role, num_conn, rate),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert srv.registry.ports.used == set()
    await _still_serves(c, srv, echo_server)


@pytest.mark.parametrize("listener", ["nonsense", "1.2.3.4:99999", "", "1.2.3.4:", ":80", "::1:80",
                                      "[::1]", "host name:80", "1.2.3.4:0", "a" * 400 + ":80"])
async def test_malformed_listeners_invalid_argument(servers, client_for, echo_server, listener):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="req")
    await _assert_code(c.hello(uid, "PROD", [listener]), grpc.StatusCode.INVALID_ARGUMENT)
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await _assert_code(c.update(uid, "PROD", [listener], resp.wan_secret), grpc.StatusCode.INVALID_ARGUMENT)
    await _assert_code(c.update(uid, "PROD", [], resp.wan_secret), grpc.StatusCode.INVALID_ARGUMENT)
    # the session is untouched by the bad calls and still works
    await c.update(uid, "PROD", list(resp.prod_listeners), resp.wan_secret)
    await c.release(uid)
    await _still_serves(c, srv, echo_server)


async def test_no_free_ports_resource_exhausted(servers, client_for, echo_server):
    srv = await servers(port_range="0-0".replace("0-0", _tiny_range()))
    c = client_for(srv)
    uid = new_uid()
    held = asyncio.create_task(c.req(uid, "PROD", 2))
    await async_wait_until(lambda: len(srv.registry.ports.used) == 2, what="2 ports held")
    msg = await _assert_code(c.req(new_uid(), "PROD", 2), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "port" in msg
    assert len(srv.registry.ports.used) == 2  # nothing more reserved
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await held
    await c.release(uid)
    assert srv.registry.ports.used == set()
    await _still_serves(c, srv, echo_server)


def _tiny_range() -> str:
    from conftest import port_block
    start = int(port_block(3).split("-")[0])
    return f"{start}-{start + 2}"


async def test_update_before_hello_failed_precondition(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="req")
    await _assert_code(c.update(uid, "PROD", ["127.0.0.1:7000"]), grpc.StatusCode.FAILED_PRECONDITION)
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    await req
    await c.release(uid)
    await _still_serves(c, srv, echo_server)


async def test_hello_timeout_frees_everything(servers, client_for, echo_server):
    srv = await servers(hello_timeout=0.5)
    c = client_for(srv)
    uid = new_uid()
    msg = await _assert_code(c.req(uid, "PROD", 3), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "freed" in msg
    assert srv.registry.ports.used == set()
    assert srv.registry.active == {}
    st = await c.status(uid)
    assert st.sessions[0].state == "expired"
    await _still_serves(c, srv, echo_server)


async def test_cancelled_req_frees_everything(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 3))
    await async_wait_until(lambda: len(srv.registry.ports.used) == 3, what="ports reserved")
    req.cancel()  # the user pressed Ctrl-C
    await async_wait_until(lambda: not srv.registry.ports.used and not srv.registry.active,
                           what="ports freed after cancel")
    await _still_serves(c, srv, echo_server)


async def test_wrong_wan_secret_permission_denied(servers, client_for, echo_server):
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    await _assert_code(c.update(uid, "PROD", list(resp.prod_listeners), b"x" * 32),
                       grpc.StatusCode.PERMISSION_DENIED)
    await _assert_code(c.update(uid, "PROD", list(resp.prod_listeners), b"short"),
                       grpc.StatusCode.INVALID_ARGUMENT)
    await c.update(uid, "PROD", list(resp.prod_listeners), resp.wan_secret)
    await c.release(uid)


async def test_original_client_without_secret(servers, client_for, echo_server):
    """A client of the original tooling sends no wan_secret: refused on Builtin unless the
    operator allows plaintext, with a message that says so."""
    srv = await servers()
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 1))
    await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
    resp = await req
    msg = await _assert_code(c.update(uid, "PROD", list(resp.prod_listeners)),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert "--allow-legacy-plaintext" in msg
    await c.release(uid)


async def test_two_hundred_pending_reqs(servers, client_for, echo_server):
    srv = await servers(port_range=_range(400), max_conn=4)
    c = client_for(srv)
    uids = [new_uid() for _ in range(200)]
    reqs = [asyncio.create_task(c.req(u, "PROD", 1)) for u in uids]
    await async_wait_until(lambda: len(srv.registry.active) == 200, timeout=60, what="200 pending reqs")
    assert not any(r.done() for r in reqs)  # all 200 are waiting at once
    ep = [f"{echo_server[0]}:{echo_server[1]}"]
    hellos = await asyncio.gather(*(c.hello(u, "PROD", ep) for u in uids))
    resps = await asyncio.gather(*reqs)
    assert all(list(h.listeners) == list(r.listeners) for h, r in zip(hellos, resps))
    assert len({r.listeners[0] for r in resps}) == 200
    await asyncio.gather(*(c.release(u) for u in uids))
    assert srv.registry.ports.used == set()


def _range(n: int) -> str:
    from conftest import port_block
    return port_block(n)


async def test_original_client_interoperates(servers, echo_server, original_stubs):
    """A client built from the original definition completes the exchange against our
    server (run as its own process, so its generated code has its own descriptor pool)."""
    import sys
    gen_dir, fixtures = original_stubs
    script = fixtures / "original_client.py"
    srv = await servers(allow_legacy_plaintext=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(gen_dir), srv.target, f"{echo_server[0]}:{echo_server[1]}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert b"exchange complete" in out
    assert srv.registry.ports.used == set()
    assert all(s.wan_security == "plain" for s in srv.registry.ended.values())
