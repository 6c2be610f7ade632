"""Names in an update's remote listeners are looked up by the control server, without
blocking it, before anything changes; the data servers only ever get addresses.

The lookups that must fail use a small name table in place of the system resolver (a
real lookup of an unknown name would query the machine's DNS server, which no test may
reach); ``localhost`` goes through the real resolver (/etc/hosts)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import grpc
import pytest

from conftest import echo_roundtrip, new_uid, parse_listener
from scistream import addr, errors


@pytest.fixture
async def name_table(monkeypatch):
    """``*.example.test`` names resolve from a table; ``slow.example.test`` never answers."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    table = {"prod-gw.example.test": "127.0.0.1"}

    async def getaddrinfo(host, port, *args, **kw):
        if not str(host).endswith(".example.test"):
            return await real(host, port, *args, **kw)
        if host == "slow.example.test":
            await asyncio.Event().wait()
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (table[host], port))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(addr, "RESOLVE_TIMEOUT", 0.5)
    return table


async def _code(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(errors.ScistreamError) as info:
        await coro
    return grpc.StatusCode[info.value.status.name], str(info.value)


async def _roundtrip_ok(listener: str) -> None:
    payload = os.urandom(1 << 20)
    got = await echo_roundtrip(*parse_listener(listener), payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_update_names_resolved_refused_before_any_change(servers, client_for, echo_server, name_table):
    srv = await servers(wan_plaintext=True)
    c = client_for(srv)
    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "CONS", 2))
    await c.hello(uid, "CONS")
    resp = await req

    # Unknown name: INVALID_ARGUMENT, the session stays ready, no data server started.
    code, msg = await _code(c.update(uid, "CONS", ["nowhere.example.test:5000"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot resolve" in msg and "nowhere" in msg
    info = (await c.status(uid)).sessions[0]
    assert info.state == "ready"
    assert srv.registry.active[(uid, "CONS")].server is None

    # A resolver that never answers: the update fails after the deadline; the server
    # went on serving meanwhile.
    slow = asyncio.create_task(_code(c.update(uid, "CONS", ["slow.example.test:5000"])))
    assert (await c.status(uid)).sessions[0].state == "ready"
    code, msg = await slow
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no answer within" in msg

    # Names that resolve: the data server gets the address and bytes flow.
    echo_port = echo_server[1]
    await c.update(uid, "CONS", [f"localhost:{echo_port}"])
    info = (await c.status(uid)).sessions[0]
    assert info.state == "connected"
    assert all(t in (f"127.0.0.1:{echo_port}", f"[::1]:{echo_port}") for t in info.targets), info.targets
    for listener in resp.listeners:
        await _roundtrip_ok(listener)

    # A retarget to a bad name changes nothing: still connected, same targets, still flowing.
    before = list(info.targets)
    code, msg = await _code(c.update(uid, "CONS", ["nowhere.example.test:5000"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    info = (await c.status(uid)).sessions[0]
    assert info.state == "connected" and list(info.targets) == before
    await _roundtrip_ok(resp.listeners[0])

    # A retarget to a table name: new connections go to its address.
    await c.update(uid, "CONS", [f"prod-gw.example.test:{echo_port}"])
    info = (await c.status(uid)).sessions[0]
    assert list(info.targets) == [f"127.0.0.1:{echo_port}"] * 2
    await _roundtrip_ok(resp.listeners[1])

    await c.release(uid)
    assert srv.registry.ports.used == set()


async def test_resolve_listener_gives_addresses():
    assert await addr.resolve_listener("127.0.0.1:80") == "127.0.0.1:80"
    assert await addr.resolve_listener("[::1]:80") == "[::1]:80"
    assert await addr.resolve_listener("localhost:5000") in ("127.0.0.1:5000", "[::1]:5000")
    with pytest.raises(errors.InvalidArgument):
        await addr.resolve_listener("no port")


async def test_scoped_link_local_addresses_keep_their_interface():
    assert await addr.resolve_listener("[fe80::1%lo]:5000") == "[fe80::1%lo]:5000"
    with pytest.raises(errors.InvalidArgument, match="cannot resolve"):
        await addr.resolve_listener("[fe80::1%nosuchif]:5000")


def test_the_suite_never_asks_a_dns_server():
    """conftest's guard: a name that is not in /etc/hosts fails at once, nothing is sent."""
    with pytest.raises(socket.gaierror, match="would query DNS"):
        socket.getaddrinfo("no-such-host.invalid", 80)
    assert socket.getaddrinfo("localhost", 80)       # /etc/hosts: allowed
    assert socket.getaddrinfo("127.0.0.1", 80)
