"""--auth globus: token introspection through globus-sdk against canned Globus Auth answers.

Only Globus is faked (globus_sdk.testing + responses); no test reaches the network."""
from __future__ import annotations

import asyncio
import base64
import threading
import time
import urllib.parse

import pytest
import responses
from responses import matchers

from conftest import async_wait_until
from globus_sdk.testing import RegisteredResponse
from scistream.auth.base import AuthConfigError, AuthUnavailable, make_authenticator
from scistream.auth.globus import GlobusAuth
from scistream.errors import Unauthenticated

CID = "1b7c9a3e-0000-4000-8000-5c15714e0001"         # the S2CS's confidential client
SECRET = "test-secret-made-here"
SCOPE = f"https://auth.globus.org/scopes/{CID}/scistream"
NATIVE = "2c8d0b4f-0000-4000-8000-6d26825f0002"      # the user's native app
SUB = "4e5f6a7b-0000-4000-8000-8f48a4710003"
INTROSPECT = "/v2/oauth2/token/introspect"


def introspection(**over) -> dict:
    now = int(time.time())
    data = {"active": True, "token_type": "Bearer", "scope": f"{SCOPE} openid",
            "client_id": NATIVE, "username": "alice@uni.edu", "name": "Alice", "sub": SUB,
            "exp": now + 3600, "iat": now, "nbf": now, "aud": [CID, "auth.globus.org"],
            "iss": "https://auth.globus.org"}
    data.update(over)
    return data


@pytest.fixture
def globus():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        def answer(token: str, status: int = 200, **over) -> None:
            RegisteredResponse(service="auth", path=INTROSPECT, method="POST", status=status,
                               json=introspection(**over) if status == 200 else {"error": "x"},
                               match=[matchers.urlencoded_params_matcher({"token": token})]
                               ).add(requests_mock=rsps)
        rsps.answer = answer
        yield rsps


def introspected(rsps) -> list[str]:
    """The tokens sent to the introspection endpoint, in order."""
    return [urllib.parse.parse_qs(c.request.body)["token"][0] for c in rsps.calls
            if c.request.url.endswith(INTROSPECT)]


@pytest.fixture
async def auth():
    a = GlobusAuth(CID, SECRET, SCOPE, retries=0, timeout=2)
    yield a
    await a.close()


async def test_good_token_is_introspected_once_then_cached(globus, auth):
    globus.answer("tok-good")
    who = await auth.authenticate("Bearer tok-good")
    assert who.id == f"https://auth.globus.org|{SUB}" and who.name == "alice@uni.edu"
    assert (await auth.authenticate("tok-good")) == who
    assert introspected(globus) == ["tok-good"]
    basic = globus.calls[0].request.headers["Authorization"]
    assert base64.b64decode(basic.split()[1]).decode() == f"{CID}:{SECRET}"


@pytest.mark.parametrize("over, message", [
    ({"active": False}, "not active"),
    ({"exp": int(time.time()) - 10}, "expired"),
    ({"scope": "urn:globus:auth:scope:transfer.api.globus.org:all"}, "does not carry this S2CS's scope"),
    ({"aud": ["transfer.api.globus.org"]}, "not meant for this S2CS"),
    ({"aud": CID, "sub": None}, "no subject"),
])
async def test_refused_tokens_say_what_to_do_and_are_cached(globus, auth, over, message):
    globus.answer("tok-bad", **over)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match=message) as info:
            await auth.authenticate("Bearer tok-bad")
        assert "s2uc login" in str(info.value) and "tok-bad" not in str(info.value)
    assert introspected(globus) == ["tok-bad"]


async def test_missing_token_never_reaches_globus(globus, auth):
    for value in (None, "", "INVALID_TOKEN", "Bearer INVALID_TOKEN"):
        with pytest.raises(Unauthenticated, match="no access token sent; run `s2uc login`"):
            await auth.authenticate(value)
    assert introspected(globus) == []


async def test_configured_audience(globus):
    a = GlobusAuth(CID, SECRET, SCOPE, audience="s2cs-resource", retries=0)
    try:
        globus.answer("t1", aud=[CID])
        globus.answer("t2", aud=["s2cs-resource"])
        with pytest.raises(Unauthenticated, match="audience s2cs-resource"):
            await a.authenticate("t1")
        assert (await a.authenticate("t2")).name == "alice@uni.edu"
    finally:
        await a.close()


async def test_globus_errors_are_unavailable_and_not_cached(globus, auth):
    globus.answer("tok-500", status=500)
    for _ in range(2):
        with pytest.raises(AuthUnavailable, match="retry later"):
            await auth.authenticate("tok-500")
    assert introspected(globus) == ["tok-500", "tok-500"]
    # nothing registered for this token: responses refuses the connection
    with pytest.raises(AuthUnavailable, match="cannot reach Globus Auth"):
        await auth.authenticate("tok-unreachable")


async def test_concurrent_calls_share_one_introspection(globus, auth):
    globus.answer("tok-many")
    who = await asyncio.gather(*(auth.authenticate("Bearer tok-many") for _ in range(20)))
    assert {w.id for w in who} == {f"https://auth.globus.org|{SUB}"}
    assert introspected(globus) == ["tok-many"]
    assert auth.introspections == 1


async def test_slow_globus_is_bounded_by_the_timeout(globus):
    gate = threading.Event()

    def slow(request):
        gate.wait(30)
        return 200, {}, "{}"

    globus.add_callback("POST", "https://auth.globus.org" + INTROSPECT, callback=slow)
    a = GlobusAuth(CID, SECRET, SCOPE, retries=0, timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(AuthUnavailable, match="did not answer in time"):
            await a.authenticate("tok-slow")
        assert time.monotonic() - t0 < 10
    finally:
        gate.set()
        await a.close()


async def test_ttl_zero_checks_every_time(globus):
    a = GlobusAuth(CID, SECRET, SCOPE, retries=0, cache_ttl=0)
    try:
        globus.answer("tok-ttl")
        await a.authenticate("tok-ttl")
        await a.authenticate("tok-ttl")
        assert introspected(globus) == ["tok-ttl", "tok-ttl"]
    finally:
        await a.close()


def test_options_from_environment_and_file(tmp_path, monkeypatch, caplog):
    for var in ("ID", "SECRET", "SCOPE", "AUDIENCE"):
        monkeypatch.delenv(f"SCISTREAM_GLOBUS_CLIENT_{var}", raising=False)
        monkeypatch.delenv(f"SCISTREAM_GLOBUS_{var}", raising=False)
    with pytest.raises(AuthConfigError, match="SCISTREAM_GLOBUS_CLIENT_SECRET"):
        make_authenticator("globus", client_id=CID)
    monkeypatch.setenv("SCISTREAM_GLOBUS_CLIENT_ID", CID)
    monkeypatch.setenv("SCISTREAM_GLOBUS_CLIENT_SECRET", SECRET)
    with pytest.raises(AuthConfigError, match=f"--globus-scope.*scopes/{CID}/"):
        make_authenticator("globus")
    a = make_authenticator("globus", globus_scope=SCOPE, auth_cache_ttl=5)
    assert (a.client_id, a.scope, a.audience, a.cache_ttl) == (CID, SCOPE, CID, 5)
    monkeypatch.delenv("SCISTREAM_GLOBUS_CLIENT_ID")
    monkeypatch.delenv("SCISTREAM_GLOBUS_CLIENT_SECRET")
    conf = tmp_path / "globus.toml"
    conf.write_text(f'client_id = "{CID}"\nclient_secret = "{SECRET}"\nscope = "{SCOPE}"\n'
                    'audience = "aud-x"\n')
    conf.chmod(0o644)
    a = make_authenticator("globus", globus_config=conf)
    assert (a.client_id, a.scope, a.audience) == (CID, SCOPE, "aud-x")
    assert "readable by others" in caplog.text
    assert SECRET not in caplog.text
    conf.write_text('client_id = "x"\nsecret = "typo"\n')
    with pytest.raises(AuthConfigError, match="unknown keys secret"):
        make_authenticator("globus", globus_config=conf)
    with pytest.raises(AuthConfigError, match="does not exist"):
        make_authenticator("globus", globus_config=tmp_path / "nope.toml")


async def test_a_caller_that_goes_away_does_not_waste_the_introspection(globus):
    gate, entered = threading.Event(), threading.Event()

    def held(request):
        entered.set()
        gate.wait(30)
        return 200, {}, '{"active": false}'

    globus.add_callback("POST", "https://auth.globus.org" + INTROSPECT, callback=held)
    a = GlobusAuth(CID, SECRET, SCOPE, retries=0, timeout=5)
    try:
        caller = asyncio.create_task(a.authenticate("tok-gone"))
        await async_wait_until(entered.is_set, what="the introspection to start")
        caller.cancel()
        gate.set()
        await async_wait_until(lambda: not a._inflight, what="the introspection to finish")
        with pytest.raises(Unauthenticated, match="not active"):
            await a.authenticate("tok-gone")
        assert len(globus.calls) == 1
    finally:
        gate.set()
        await a.close()
