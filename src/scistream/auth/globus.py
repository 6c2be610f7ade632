"""``s2cs --auth globus``: Globus Auth tokens, checked by token introspection.

The S2CS is a Globus *confidential client* (a resource server with its own scope).
Each new token is introspected with that client's credentials; it is accepted when it is
active, unexpired, carries the configured scope and names the configured audience (by
default the S2CS's own client id). Results, good and bad, are cached for ``cache_ttl``
seconds (never past the token's expiry) under the token's SHA-256; concurrent calls with
the same token share one introspection. globus-sdk is blocking: its calls run on a small
thread pool, bounded by ``timeout``. An unreachable Globus Auth is UNAVAILABLE (retry),
not UNAUTHENTICATED.

Credentials come from the environment (SCISTREAM_GLOBUS_CLIENT_ID,
SCISTREAM_GLOBUS_CLIENT_SECRET) or a TOML file (``--globus-config``), never from the
command line:

    # /etc/scistream/globus.toml (mode 0600)
    client_id = "6ac4fb2c-...-..."
    client_secret = "..."
    scope = "https://auth.globus.org/scopes/6ac4fb2c-...-.../scistream"
    # audience = "6ac4fb2c-..."        # default: client_id

    auth = GlobusAuth.from_options(globus_config="/etc/scistream/globus.toml")
    who = await auth.authenticate("Bearer AgX...")   # Identity("https://auth.globus.org|<sub>", "u@uni.edu")
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryConfig

from ..errors import Unauthenticated
from .base import AuthConfigError, AuthUnavailable, Authenticator, Identity, LOGIN_HINT, require_token

log = logging.getLogger(__name__)

ENV_ID = "SCISTREAM_GLOBUS_CLIENT_ID"
ENV_SECRET = "SCISTREAM_GLOBUS_CLIENT_SECRET"
ENV_SCOPE = "SCISTREAM_GLOBUS_SCOPE"
ENV_AUDIENCE = "SCISTREAM_GLOBUS_AUDIENCE"
CACHE_MAX = 4096


def read_globus_config(path: Path) -> dict[str, str]:
    try:
        st = path.stat()
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthConfigError(f"Globus config {path} does not exist (--globus-config)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuthConfigError(f"cannot read Globus config {path}: {exc}") from None
    if unknown := sorted(set(data) - {"client_id", "client_secret", "scope", "audience"}):
        raise AuthConfigError(f"{path}: unknown keys {', '.join(unknown)} (known: client_id, "
                              "client_secret, scope, audience)")
    if "client_secret" in data and st.st_mode & 0o077:
        log.warning("%s holds a client secret and is readable by others; chmod 600 it", path)
    return {k: str(v) for k, v in data.items()}


@dataclasses.dataclass
class _Cached:
    until: float                      # time.monotonic() after which the entry is stale
    identity: Identity | None = None
    refusal: str = ""                 # the Unauthenticated message when identity is None


class GlobusAuth(Authenticator):
    name = "globus"
    options = ("globus_config", "client_id", "globus_scope", "globus_audience",
               "auth_cache_ttl", "auth_timeout")

    def __init__(self, client_id: str, client_secret: str, scope: str, audience: str | None = None,
                 *, cache_ttl: float = 60.0, timeout: float = 10.0, retries: int = 1,
                 workers: int = 4) -> None:
        self.client_id = client_id
        self.scope = scope
        self.audience = audience or client_id
        self.cache_ttl = cache_ttl
        self.timeout = timeout
        self._client = globus_sdk.ConfidentialAppAuthClient(
            client_id, client_secret, app_name="scistream-s2cs",
            transport=RequestsTransport(http_timeout=timeout),
            retry_config=RetryConfig(max_retries=retries, max_sleep=min(2.0, timeout)))
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}
        self.introspections = 0   # how many calls reached Globus Auth (for status and tests)

    @classmethod
    def from_options(cls, globus_config: str | Path | None = None, client_id: str | None = None,
                     globus_scope: str | None = None, globus_audience: str | None = None,
                     auth_cache_ttl: float | None = None, auth_timeout: float | None = None,
                     **kw: Any) -> "GlobusAuth":
        file = read_globus_config(Path(globus_config)) if globus_config else {}
        env = os.environ
        cid = client_id or env.get(ENV_ID) or file.get("client_id")
        secret = env.get(ENV_SECRET) or file.get("client_secret")
        scope = globus_scope or env.get(ENV_SCOPE) or file.get("scope")
        audience = globus_audience or env.get(ENV_AUDIENCE) or file.get("audience")
        if not cid or not secret:
            raise AuthConfigError(
                f"--auth globus needs the S2CS's Globus client id and secret: set {ENV_ID} and "
                f"{ENV_SECRET}, or give --globus-config FILE with client_id and client_secret "
                "(the secret is never taken from the command line)")
        if not scope:
            raise AuthConfigError(
                "--auth globus needs the scope users log in with: --globus-scope, "
                f"{ENV_SCOPE} or `scope` in --globus-config (typically "
                f"https://auth.globus.org/scopes/{cid}/<name>)")
        ttl = 60.0 if auth_cache_ttl is None else float(auth_cache_ttl)
        timeout = 10.0 if auth_timeout is None else float(auth_timeout)
        if ttl < 0 or timeout <= 0:
            raise AuthConfigError("--auth-cache-ttl must be >= 0 and --auth-timeout > 0")
        return cls(cid, secret, scope, audience, cache_ttl=ttl, timeout=timeout, **kw)

    # -- the check --------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Identity:
        token = require_token(authorization)
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(key)
        if hit is not None and hit.until > time.monotonic():
            return self._answer(hit)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._introspect(token, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return self._answer(await asyncio.shield(task))

    def _done(self, key: str, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller went away

    @staticmethod
    def _answer(entry: _Cached) -> Identity:
        if entry.identity is None:
            raise Unauthenticated(entry.refusal)
        return entry.identity

    async def _introspect(self, token: str, key: str) -> _Cached:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers,
                                                               thread_name_prefix="globus-introspect")
        loop = asyncio.get_running_loop()
        self.introspections += 1
        try:
            async with asyncio.timeout(self.timeout + 1):
                data = await loop.run_in_executor(self._pool, self._call, token)
        except TimeoutError:
            log.warning("token introspection took longer than %g s", self.timeout)
            raise AuthUnavailable("Globus Auth did not answer in time; retry later") from None
        except globus_sdk.GlobusAPIError as exc:
            log.error("Globus Auth refused this S2CS's introspection call (HTTP %s %s); check "
                      "its client id and secret", exc.http_status, exc.code)
            raise AuthUnavailable("this S2CS cannot check tokens with Globus Auth right now "
                                  "(its operator must check its client credentials); retry later") from None
        except globus_sdk.NetworkError as exc:
            log.warning("cannot reach Globus Auth: %s", type(exc).__name__)
            raise AuthUnavailable("this S2CS cannot reach Globus Auth to check the token; "
                                  "retry later") from None
        entry = self._judge(data)
        self._remember(key, entry)
        return entry

    def _call(self, token: str) -> dict[str, Any]:
        return dict(self._client.oauth2_token_introspect(token).data)

    def _judge(self, data: dict[str, Any]) -> _Cached:
        now_wall, now = time.time(), time.monotonic()
        until = now + self.cache_ttl

        def refuse(why: str) -> _Cached:
            log.info("token refused: %s", why)
            return _Cached(until, refusal=why)

        if not data.get("active"):
            return refuse(f"the token is not active (expired or revoked); {LOGIN_HINT}")
        exp = data.get("exp")
        if not isinstance(exp, (int, float)) or exp <= now_wall:
            return refuse(f"the token has expired; {LOGIN_HINT}")
        scopes = str(data.get("scope") or "").split()
        if self.scope not in scopes:
            return refuse(f"the token does not carry this S2CS's scope {self.scope}; run "
                          f"`s2uc login --scope {self.scope}` and try again")
        aud = data.get("aud") or []
        aud = [aud] if isinstance(aud, str) else list(aud)
        if self.audience not in aud:
            return refuse(f"the token is not meant for this S2CS (audience {self.audience} "
                          f"missing); run `s2uc login --scope {self.scope}` and try again")
        if not (sub := data.get("sub")):
            return refuse(f"Globus Auth returned no subject for the token; {LOGIN_HINT}")
        iss = data.get("iss") or "https://auth.globus.org"
        ident = Identity(f"{iss}|{sub}", str(data.get("username") or sub))
        return _Cached(min(until, now + (exp - now_wall)), identity=ident)

    def _remember(self, key: str, entry: _Cached) -> None:
        if self.cache_ttl <= 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_MAX:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._client.close()
