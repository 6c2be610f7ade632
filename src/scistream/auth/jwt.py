"""``s2cs --auth jwt``: JSON Web Tokens checked against a JWKS file or URL.

A token is accepted when its signature verifies with a key of the JWKS (picked by the
token's ``kid``; a JWKS of one key needs none), its ``iss`` is the configured issuer, its
``aud`` contains the configured audience, and ``exp`` (and ``nbf``, if present) hold
within ``leeway`` seconds. The caller's identity is ``"<iss>|<sub>"``.

A JWKS *file* is re-read when it changes; a JWKS *URL* is fetched (off the event loop,
with a timeout) when first needed and then every ``jwks_ttl`` seconds, or sooner when a
token names a key it does not know (key rotation). Only asymmetric keys (RSA, EC, OKP)
are used.

    auth = JwtAuth.from_options(jwt_jwks="https://idp.example.org/jwks.json",
                                jwt_issuer="https://idp.example.org", jwt_audience="s2cs-anl")
    who = await auth.authenticate("Bearer eyJ...")     # Identity("https://idp.example.org|u123")
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from pathlib import Path
from typing import Any

import jwt as pyjwt
from jwt import PyJWK, PyJWKClient, PyJWKSet

from ..errors import Unauthenticated
from .base import AuthConfigError, AuthUnavailable, Authenticator, Identity, LOGIN_HINT, require_token

log = logging.getLogger(__name__)

ASYMMETRIC = {"RSA", "EC", "OKP"}


def _usable(keys: list[PyJWK], where: str, warn: bool = True) -> list[PyJWK]:
    """The asymmetric signing keys of ``keys`` (the others logged, if ``warn``)."""
    for k in keys:
        if warn and (kty := k._jwk_data.get("kty")) not in ASYMMETRIC:
            log.warning("JWKS %s: key %s of type %s ignored (only RSA, EC, OKP keys are used)",
                        where, k.key_id, kty)
    return [k for k in keys if k._jwk_data.get("kty") in ASYMMETRIC and k.public_key_use in (None, "sig")]


def _load_jwks_file(path: Path) -> list[PyJWK]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthConfigError(f"JWKS file {path} does not exist (--jwt-jwks)") from None
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"cannot read JWKS file {path}: {exc}") from None
    if isinstance(data, dict) and "keys" not in data and "kty" in data:
        data = {"keys": [data]}  # a single JWK
    try:
        keys = _usable(PyJWKSet.from_dict(data).keys, str(path))
    except (pyjwt.PyJWKError, pyjwt.PyJWKSetError, TypeError, AttributeError) as exc:
        raise AuthConfigError(f"JWKS file {path} holds no usable key: {exc}") from None
    if not keys:
        raise AuthConfigError(f"JWKS file {path} holds no RSA, EC or OKP signing key")
    return keys


class JwtAuth(Authenticator):
    name = "jwt"
    options = ("jwt_jwks", "jwt_issuer", "jwt_audience", "jwt_leeway", "auth_timeout", "auth_cache_ttl")

    def __init__(self, jwks: str, issuer: str, audience: str, *, leeway: float = 30.0,
                 timeout: float = 10.0, jwks_ttl: float = 300.0) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.timeout = timeout
        self._url = jwks.startswith(("http://", "https://"))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if self._url:
            self._client = PyJWKClient(jwks, cache_jwk_set=True, lifespan=jwks_ttl,
                                       timeout=timeout, cooldown_duration=min(30.0, jwks_ttl))
        else:
            self._path = Path(jwks)
            self._stamp: tuple[int, int, int] | None = None
            self._keys: list[PyJWK] = []
            self._reload(initial=True)

    @classmethod
    def from_options(cls, jwt_jwks: str | None = None, jwt_issuer: str | None = None,
                     jwt_audience: str | None = None, jwt_leeway: float | None = None,
                     auth_timeout: float | None = None, auth_cache_ttl: float | None = None) -> "JwtAuth":
        missing = [flag for flag, v in (("--jwt-jwks PATH_OR_URL", jwt_jwks), ("--jwt-issuer ISS", jwt_issuer),
                                        ("--jwt-audience AUD", jwt_audience)) if not v]
        if missing:
            raise AuthConfigError(f"--auth jwt needs {', '.join(missing)}")
        leeway = 30.0 if jwt_leeway is None else float(jwt_leeway)
        if leeway < 0 or leeway > 600:
            raise AuthConfigError("--jwt-leeway must be 0-600 seconds")
        timeout = 10.0 if auth_timeout is None else float(auth_timeout)
        if timeout <= 0:
            raise AuthConfigError("--auth-timeout must be > 0")
        ttl = 300.0 if auth_cache_ttl is None else max(1.0, float(auth_cache_ttl))
        return cls(str(jwt_jwks), str(jwt_issuer), str(jwt_audience), leeway=leeway,
                   timeout=timeout, jwks_ttl=ttl)

    # -- keys -------------------------------------------------------------------------
    def _reload(self, initial: bool = False) -> None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            if initial:
                _load_jwks_file(self._path)  # raises with the message
            return  # keep the keys we had
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._keys = _load_jwks_file(self._path)
        except AuthConfigError as exc:
            if initial:
                raise
            log.error("%s; keeping the %d keys read before", exc, len(self._keys))
        self._stamp = stamp

    @staticmethod
    def _match(keys: list[PyJWK], kid: str | None) -> PyJWK | None:
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)

    async def _key_for(self, kid: str | None) -> PyJWK:
        if not self._url:
            self._reload()
            key = self._match(self._keys, kid)
        else:
            cached = self._client.jwk_set_cache.get() if self._client.jwk_set_cache else None
            key = self._match(_usable(cached.keys, self.jwks, False), kid) if cached is not None else None
            if key is None:
                key = await self._fetch_key(kid)
        if key is None:
            raise Unauthenticated(f"the token was signed with a key (kid {kid!r}) that this S2CS "
                                  f"does not trust; {LOGIN_HINT}")
        return key

    async def _fetch_key(self, kid: str | None) -> PyJWK | None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jwks-fetch")
        loop = asyncio.get_running_loop()

        def fetch() -> PyJWK | None:
            if kid is None:
                return self._match(_usable(self._client.get_jwk_set().keys, self.jwks), None)
            try:
                return self._client.get_signing_key(kid)
            except pyjwt.PyJWKClientConnectionError:
                raise
            except pyjwt.PyJWKClientError:
                return None
        try:
            async with asyncio.timeout(self.timeout + 1):
                key = await loop.run_in_executor(self._pool, fetch)
        except (TimeoutError, pyjwt.PyJWKClientConnectionError, pyjwt.PyJWKSetError) as exc:
            log.warning("cannot fetch the JWKS from %s: %s", self.jwks, exc or "timeout")
            raise AuthUnavailable(f"this S2CS cannot fetch its signing keys ({self.jwks}) right now; "
                                  "retry later") from None
        return key if key is None or key._jwk_data.get("kty") in ASYMMETRIC else None

    # -- check ------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Identity:
        token = require_token(authorization)
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.DecodeError:
            raise Unauthenticated(f"the token is not a JWT; {LOGIN_HINT}") from None
        kid = header.get("kid")
        key = await self._key_for(kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token, key.key, algorithms=[key.algorithm_name], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway,
                options={"require": ["exp", "iss", "sub", "aud"]})
        except pyjwt.ExpiredSignatureError:
            raise Unauthenticated(f"the token has expired; {LOGIN_HINT}") from None
        except pyjwt.InvalidAudienceError:
            raise Unauthenticated(f"the token is not meant for this S2CS (audience is not "
                                  f"{self.audience!r}); {LOGIN_HINT}") from None
        except pyjwt.InvalidIssuerError:
            raise Unauthenticated(f"the token was not issued by {self.issuer}; {LOGIN_HINT}") from None
        except pyjwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (nbf/iat in the future); check the "
                                  "clocks, then retry") from None
        except pyjwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token lacks the {exc.claim!r} claim; {LOGIN_HINT}") from None
        except pyjwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the token was refused ({type(exc).__name__}); {LOGIN_HINT}") from None
        sub = claims["sub"]
        name = claims.get("preferred_username") or claims.get("email") or sub
        return Identity(f"{claims['iss']}|{sub}", str(name))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
