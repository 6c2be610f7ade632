"""Globus native-app login and logout for ``s2uc`` (no click here; see cli/s2uc_auth.py).

Login is the PKCE native-app flow: ``start_login`` gives the URL the user opens,
``finish_login`` trades the code pasted back for tokens (with a refresh token) and keeps
them in the token store. ``logout`` revokes every token of a login at Globus Auth, then
deletes it locally.

    flow = start_login(client_id, scope, label="my-laptop")
    print(flow.url)
    data = finish_login(flow, input("code: "), s2cs="10.0.0.2:5000")
    logout("10.0.0.2:5000")
"""
from __future__ import annotations

import dataclasses
import logging
import time

import globus_sdk
from globus_sdk.token_storage import TokenStorageData

from .tokens import TokenStore, namespace_for, namespaces, native_client, store_response

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoginFlow:
    client: globus_sdk.NativeAppAuthClient
    client_id: str
    scope: str
    url: str


def start_login(client_id: str, scope: str, *, label: str | None = None) -> LoginFlow:
    client = native_client(client_id)
    kw = {"prefill_named_grant": label} if label else {}
    client.oauth2_start_flow(requested_scopes=scope, refresh_tokens=True, **kw)
    return LoginFlow(client, client_id, scope, client.oauth2_get_authorize_url())


def finish_login(flow: LoginFlow, code: str, *, s2cs: str | None) -> TokenStorageData:
    """Exchange the code; replace this login's tokens (revoking the old ones, best effort)."""
    try:
        response = flow.client.oauth2_exchange_code_for_tokens(code.strip())
    finally:
        flow.client.close()
    store = TokenStore(namespace_for(s2cs))
    old = store.get_token_data_by_resource_server()
    store.clear()
    data = store_response(store, response, client_id=flow.client_id, scope=flow.scope, s2cs=s2cs)
    fresh = {d.access_token for d in store.get_token_data_by_resource_server().values()}
    if stale := [d for d in old.values() if d.access_token not in fresh]:
        _revoke(stale)
    return data


@dataclasses.dataclass
class LogoutResult:
    namespace: str
    revoked: int
    failures: list[str]


def _revoke(tokens: list[TokenStorageData]) -> tuple[int, list[str]]:
    """Revoke the access and refresh tokens of ``tokens`` with the client that got them."""
    revoked, failures = 0, []
    for d in tokens:
        client = native_client(d.extra.get("client_id") or "")
        try:
            for kind, tok in (("access", d.access_token), ("refresh", d.refresh_token)):
                if not tok:
                    continue
                try:
                    client.oauth2_revoke_token(tok)
                    revoked += 1
                except globus_sdk.GlobusAPIError as exc:
                    failures.append(f"{kind} token for {d.resource_server}: Globus Auth said "
                                    f"{exc.http_status} {exc.code}")
                except globus_sdk.NetworkError as exc:
                    failures.append(f"{kind} token for {d.resource_server}: {type(exc).__name__}")
        finally:
            client.close()
    return revoked, failures


def logout(s2cs: str | None = None) -> list[LogoutResult]:
    """Revoke and delete one login (``s2cs``) or all of them. Local copies are deleted even
    when revocation fails (the failures are returned)."""
    targets = [namespace_for(s2cs)] if s2cs else namespaces()
    results = []
    for ns in targets:
        store = TokenStore(ns)
        data = list(store.get_token_data_by_resource_server().values())
        if not data:
            continue
        revoked, failures = _revoke(data)
        store.clear()
        log.info("logged out of %s: %d tokens revoked, %d failures", ns, revoked, len(failures))
        results.append(LogoutResult(ns, revoked, failures))
    return results


@dataclasses.dataclass
class LoginInfo:
    namespace: str
    s2cs: str | None
    resource_server: str
    scope: str
    expires_in: float          # seconds; negative when expired
    refreshable: bool


def logins() -> list[LoginInfo]:
    """What is in the store (never the tokens themselves)."""
    out = []
    now = time.time()
    for ns in namespaces():
        if (d := TokenStore(ns).primary()) is None:
            continue
        out.append(LoginInfo(ns, d.extra.get("s2cs"), d.resource_server,
                             d.extra.get("requested_scope") or d.scope,
                             d.expires_at_seconds - now, bool(d.refresh_token)))
    return out
