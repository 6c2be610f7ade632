"""Who may do what, over the real gRPC server: the identity that made `req` owns the session.

Two identities (static tokens): the second can neither hello, update, release nor see the
first's session, and the session is untouched afterwards (same state, ports, targets, and
bytes still flow). An admin may release it. No log line of a full session holds a token."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import responses

from conftest import async_wait_until, new_uid, roundtrip_ok
from globus_sdk.testing import RegisteredResponse
from scistream.auth.globus import GlobusAuth
from scistream.auth.static import add_token
from scistream.client import AsyncClient
from scistream.control.sessions import SessionState
from scistream.errors import NotFound, PermissionDenied, Unauthenticated


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    return path, {who: add_token(path, who) for who in ("alice", "bob", "ops")}



async def test_stranger_cannot_touch_a_session_admin_can_release(servers, client_for, echo_server, tokens):
    path, tok = tokens
    srv = await servers(auth="static", auth_options={"token_file": path}, admins=("ops",),
                        wan_plaintext=True)
    alice, bob, ops = (client_for(srv, token=tok[w]) for w in ("alice", "bob", "ops"))
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()

    req = asyncio.create_task(alice.req(uid, "PROD", 2))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="the req")
    session = srv.registry.active[(uid, "PROD")]
    with pytest.raises(PermissionDenied, match="only its owner may hello"):
        await bob.hello(uid, "PROD", ["127.0.0.1:9"])
    assert session.state is SessionState.REQUESTED and not req.done()

    await alice.hello(uid, "PROD", [endpoint])
    prod = await req
    await alice.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
    before = (session.state, list(session.ports), list(session.targets), session.owner.id,
              set(srv.registry.ports.used))
    assert before[0] is SessionState.CONNECTED and before[3] == "alice"

    with pytest.raises(PermissionDenied, match="only its owner may update"):
        await bob.update(uid, "PROD", ["127.0.0.1:9"], prod.wan_secret)
    with pytest.raises(PermissionDenied, match="only its owner may release"):
        await bob.release(uid)
    with pytest.raises(NotFound):
        await bob.status(uid)
    with pytest.raises(PermissionDenied, match="only its owner may update"):
        await ops.update(uid, "PROD", ["127.0.0.1:9"], prod.wan_secret)   # admins only release
    with pytest.raises(Unauthenticated, match="s2uc login"):
        await client_for(srv).release(uid)                                 # no token at all
    with pytest.raises(Unauthenticated, match="s2uc login"):
        await client_for(srv, token="INVALID_TOKEN").release(uid)
    with pytest.raises(Unauthenticated, match="not known to this S2CS"):
        await client_for(srv, token="sst_guessed").release(uid)

    assert srv.registry.active[(uid, "PROD")] is session
    assert (session.state, list(session.ports), list(session.targets), session.owner.id,
            set(srv.registry.ports.used)) == before
    for listener in prod.listeners:
        await roundtrip_ok(listener, 256 << 10)
    assert [s.uid for s in (await alice.status(uid)).sessions] == [uid]

    await ops.release(uid)
    assert session.state is SessionState.RELEASED
    assert srv.registry.ports.used == set()


async def test_owner_may_release_and_a_new_owner_takes_the_uid(servers, client_for, tokens):
    path, tok = tokens
    srv = await servers(auth="static", auth_options={"token_file": path})
    alice, bob = client_for(srv, token=tok["alice"]), client_for(srv, token=tok["bob"])
    uid = new_uid()
    req = asyncio.create_task(alice.req(uid, "CONS", 1))
    await alice.hello(uid, "CONS")
    await req
    await alice.release(uid)
    req = asyncio.create_task(bob.req(uid, "CONS", 1))   # released uids may be reused
    await bob.hello(uid, "CONS")
    await req
    with pytest.raises(PermissionDenied):
        await alice.release(uid)
    await bob.release(uid)


async def test_no_token_in_a_full_session_log_of_an_s2cs_process(s2cs_process, echo_server, tokens):
    path, tok = tokens
    srv = s2cs_process("--token-file", str(path), "--verbose", "--wan-plaintext", "--admin", "ops",
                       auth="static")
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    uid = new_uid()
    async with AsyncClient(srv.target, insecure=True, token=tok["alice"]) as alice, \
            AsyncClient(srv.target, insecure=True, token=tok["bob"]) as bob, \
            AsyncClient(srv.target, insecure=True, token="sst_wrong-" + tok["alice"]) as wrong:
        req = asyncio.create_task(alice.req(uid, "PROD", 2))
        await alice.hello(uid, "PROD", [endpoint])
        prod = await req
        await alice.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
        await roundtrip_ok(prod.listeners[0], 256 << 10)
        with pytest.raises(PermissionDenied):
            await bob.release(uid)
        with pytest.raises(Unauthenticated):
            await wrong.release(uid)
        await alice.release(uid)
    assert srv.stop() == 0
    log = srv.log()
    assert "DEBUG" in log and uid in log and "PERMISSION_DENIED" in log and "UNAUTHENTICATED" in log
    for token in tok.values():
        assert token not in log
        assert token[4:20] not in log


async def test_no_token_or_secret_in_debug_log_with_globus_auth(servers, client_for, echo_server, caplog):
    cid, secret = "1b7c9a3e-0000-4000-8000-5c15714e0001", "globus-secret-made-here"
    scope = f"https://auth.globus.org/scopes/{cid}/scistream"
    token = "AgGlobusAccessToken" + os.urandom(12).hex()
    caplog.set_level(logging.DEBUG)
    with responses.RequestsMock() as rsps:
        now = int(time.time())
        RegisteredResponse(service="auth", path="/v2/oauth2/token/introspect", method="POST", json={
            "active": True, "scope": scope, "sub": "4e5f6a7b-0000-4000-8000-8f48a4710003",
            "username": "alice@uni.edu", "exp": now + 3600, "aud": [cid], "iss": "https://auth.globus.org",
        }).add(requests_mock=rsps)
        auth = GlobusAuth(cid, secret, scope, retries=0)
        srv = await servers(authenticator=auth, auth="globus", wan_plaintext=True)
        c = client_for(srv, token=token)
        uid = new_uid()
        req = asyncio.create_task(c.req(uid, "PROD", 1))
        await c.hello(uid, "PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        prod = await req
        await c.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
        await roundtrip_ok(prod.listeners[0], 256 << 10)
        await c.release(uid)
        assert len(rsps.calls) == 1                       # one introspection for five calls
        assert srv.registry.sessions()[0].owner.id.endswith("|4e5f6a7b-0000-4000-8000-8f48a4710003")
    text = caplog.text
    assert "globus_sdk" in text or "introspect" in text   # the SDK's debug lines were captured
    assert token not in text and secret not in text
