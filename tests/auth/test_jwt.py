"""--auth jwt: keys made here, JWKS from a file and from a URL served on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from scistream.auth.base import AuthConfigError, AuthUnavailable, make_authenticator
from scistream.auth.jwt import JwtAuth
from scistream.errors import Unauthenticated

ISS = "https://idp.test.example"
AUD = "s2cs-test"


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private, kid: str) -> dict:
    if isinstance(private, rsa.RSAPrivateKey):
        d = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        d = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    d["kid"] = kid
    d["use"] = "sig"
    return d


def make_token(private, kid: str | None = "k1", **claims) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "u123", "exp": now + 300, "iat": now,
            "preferred_username": "alice@idp"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    headers = {"kid": kid} if kid else {}
    return jwt.encode(body, private, algorithm=alg, headers=headers)


@pytest.fixture(scope="module")
def keys():
    return {"k1": rsa_key(), "k2": ec.generate_private_key(ec.SECP256R1()), "other": rsa_key()}


@pytest.fixture
def jwks_file(tmp_path, keys):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(keys["k1"], "k1"), jwk(keys["k2"], "k2"),
                                         {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}]}))
    return path


def auth_for(jwks, **kw) -> JwtAuth:
    opts = dict(jwt_jwks=str(jwks), jwt_issuer=ISS, jwt_audience=AUD)
    opts.update(kw)
    return make_authenticator("jwt", **opts)  # type: ignore[return-value]


async def test_good_tokens_rsa_and_ec(jwks_file, keys):
    auth = auth_for(jwks_file)
    who = await auth.authenticate("Bearer " + make_token(keys["k1"]))
    assert who.id == f"{ISS}|u123" and who.name == "alice@idp"
    who = await auth.authenticate(make_token(keys["k2"], kid="k2", sub="u9", preferred_username=None))
    assert who.id == f"{ISS}|u9" and who.name == "u9"
    await auth.close()


@pytest.mark.parametrize("case, claims, kid, signer, message", [
    ("expired", {"exp": int(time.time()) - 3600}, "k1", "k1", "expired"),
    ("wrong issuer", {"iss": "https://evil.example"}, "k1", "k1", "not issued by"),
    ("wrong audience", {"aud": "another-s2cs"}, "k1", "k1", "not meant for this S2CS"),
    ("no audience", {"aud": None}, "k1", "k1", "aud"),
    ("no exp", {"exp": None}, "k1", "k1", "exp"),
    ("wrong key", {}, "k1", "other", "InvalidSignatureError"),
    ("unknown kid", {}, "nope", "other", "does not trust"),
    ("kid names the symmetric key", {}, "sym", "k1", "does not trust"),
    ("not yet valid", {"nbf": int(time.time()) + 3600}, "k1", "k1", "not valid yet"),
])
async def test_bad_tokens_are_refused(jwks_file, keys, case, claims, kid, signer, message):
    auth = auth_for(jwks_file)
    token = make_token(keys[signer], kid=kid, **claims)
    with pytest.raises(Unauthenticated, match=message) as info:
        await auth.authenticate(f"Bearer {token}")
    assert token not in str(info.value)


async def test_alg_none_and_garbage_are_refused(jwks_file):
    auth = auth_for(jwks_file)
    unsigned = jwt.encode({"iss": ISS, "aud": AUD, "sub": "x", "exp": int(time.time()) + 60}, None,
                          algorithm="none", headers={"kid": "k1"})
    with pytest.raises(Unauthenticated, match="refused"):
        await auth.authenticate(unsigned)
    with pytest.raises(Unauthenticated, match="not a JWT"):
        await auth.authenticate("Bearer not.a.jwt")
    with pytest.raises(Unauthenticated, match="s2uc login"):
        await auth.authenticate("INVALID_TOKEN")


async def test_leeway(jwks_file, keys):
    token = make_token(keys["k1"], exp=int(time.time()) - 20)
    assert (await auth_for(jwks_file, jwt_leeway=60).authenticate(token)).id == f"{ISS}|u123"
    with pytest.raises(Unauthenticated, match="expired"):
        await auth_for(jwks_file, jwt_leeway=0).authenticate(token)


async def test_single_key_needs_no_kid_and_file_is_reread(tmp_path, keys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(jwk(keys["k1"], "k1")))  # a bare JWK
    auth = auth_for(path)
    assert (await auth.authenticate(make_token(keys["k1"], kid=None))).id == f"{ISS}|u123"
    # rotation: the file now holds k2 only
    path.write_text(json.dumps({"keys": [jwk(keys["k2"], "k2")]}))
    with pytest.raises(Unauthenticated, match="does not trust"):
        await auth.authenticate(make_token(keys["k1"]))
    assert (await auth.authenticate(make_token(keys["k2"], kid="k2"))).id == f"{ISS}|u123"


def test_start_errors(tmp_path):
    with pytest.raises(AuthConfigError, match="--jwt-jwks PATH_OR_URL"):
        make_authenticator("jwt", jwt_issuer=ISS, jwt_audience=AUD)
    with pytest.raises(AuthConfigError, match="--jwt-issuer ISS, --jwt-audience AUD"):
        make_authenticator("jwt", jwt_jwks="x.json")
    with pytest.raises(AuthConfigError, match="does not exist"):
        auth_for(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(AuthConfigError, match="no RSA, EC or OKP"):
        auth_for(bad)
    bad.write_text("{not json")
    with pytest.raises(AuthConfigError, match="cannot read JWKS"):
        auth_for(bad)
    with pytest.raises(AuthConfigError, match="leeway"):
        auth_for(tmp_path / "x", jwt_leeway=-1)


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 that counts its fetches; can be told to stall."""

    def __init__(self, jwks: dict) -> None:
        self.jwks = jwks
        self.fetches = 0
        self.stall = asyncio.Event()   # set: hold requests until released
        self.release = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            self.fetches += 1
            if self.stall.is_set():
                await self.release.wait()
            body = json.dumps(self.jwks).encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


@pytest.fixture
async def jwks_url(keys):
    srv = JwksServer({"keys": [jwk(keys["k1"], "k1")]})
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    srv.url = f"http://127.0.0.1:{port}/jwks.json"
    async with server:
        yield srv
        srv.release.set()


async def test_jwks_from_url_is_fetched_once_and_follows_rotation(jwks_url, keys):
    auth = auth_for(jwks_url.url)
    try:
        for _ in range(3):
            assert (await auth.authenticate(make_token(keys["k1"]))).id == f"{ISS}|u123"
        assert jwks_url.fetches == 1
        # the identity provider adds k2; a token naming it makes the S2CS fetch again
        jwks_url.jwks = {"keys": [jwk(keys["k1"], "k1"), jwk(keys["k2"], "k2")]}
        auth._client.cooldown_duration = 0
        assert (await auth.authenticate(make_token(keys["k2"], kid="k2"))).id == f"{ISS}|u123"
        assert jwks_url.fetches == 2
        with pytest.raises(Unauthenticated, match="InvalidSignatureError"):
            await auth.authenticate(make_token(keys["other"], kid="k1"))
    finally:
        await auth.close()


async def test_jwks_url_unreachable_or_slow_is_unavailable(jwks_url, keys):
    closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    auth = auth_for(f"http://127.0.0.1:{port}/jwks.json", auth_timeout=2)
    with pytest.raises(AuthUnavailable, match="retry later"):
        await auth.authenticate(make_token(keys["k1"]))
    await auth.close()
    jwks_url.stall.set()
    auth = auth_for(jwks_url.url, auth_timeout=0.5)
    with pytest.raises(AuthUnavailable, match="retry later"):
        await auth.authenticate(make_token(keys["k1"]))
    jwks_url.release.set()
    await auth.close()
