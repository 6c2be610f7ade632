"""The user's side of Globus login: settings, the token store, the token for an S2CS.

Settings live in ``~/.config/scistream/auth.toml`` (``$XDG_CONFIG_HOME`` and
``$SCISTREAM_CONFIG_DIR`` move it); tokens in ``tokens.json`` beside it (a globus-sdk
``JSONTokenStorage``, mode 0600, directory 0700). Each login is kept under its own
namespace: ``s2cs:HOST:PORT`` for ``s2uc login --s2cs HOST:PORT``, ``default`` otherwise.

    # ~/.config/scistream/auth.toml
    client_id = "<the native app's client id>"       # or --client-id / SCISTREAM_CLIENT_ID
    scope = "https://auth.globus.org/scopes/<S2CS client id>/scistream"   # default scope
    [s2cs."10.133.137.2:5000"]
    scope = "https://auth.globus.org/scopes/<another S2CS client id>/scistream"

    token = stored_token("10.133.137.2:5000")   # refreshed first if it is about to expire
"""
from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import globus_sdk
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData
from globus_sdk.transport import RequestsTransport, RetryConfig

from ..config import config_dir
from .base import AuthConfigError

log = logging.getLogger(__name__)

DEFAULT_NS = "default"
REFRESH_MARGIN = 60.0      # refresh a token that expires within this many seconds
HTTP_TIMEOUT = 20.0
RETRIES = 2                # globus-sdk retries for transient errors (tests set 0)
APP_NAME = "scistream-s2uc"


def settings_path() -> Path:
    return config_dir() / "auth.toml"


def store_path() -> Path:
    return config_dir() / "tokens.json"


def load_settings() -> dict[str, Any]:
    path = settings_path()
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuthConfigError(f"cannot read {path}: {exc}") from None


def resolve_client_id(explicit: str | None) -> str:
    cid = explicit or os.environ.get("SCISTREAM_CLIENT_ID") or load_settings().get("client_id")
    if not cid:
        raise AuthConfigError(
            "no Globus client id for s2uc: pass --client-id, set SCISTREAM_CLIENT_ID, or put "
            f"client_id = \"...\" in {settings_path()} (your facility gives you this id)")
    return str(cid)


def resolve_scope(explicit: str | None, s2cs: str | None) -> str:
    if explicit:
        return explicit
    settings = load_settings()
    per_server = (settings.get("s2cs") or {}).get(s2cs or "", {}) if s2cs else {}
    scope = per_server.get("scope") or os.environ.get("SCISTREAM_SCOPE") or settings.get("scope")
    if not scope:
        where = f'[s2cs."{s2cs}"] scope = "..."' if s2cs else 'scope = "..."'
        raise AuthConfigError(
            "no scope to log in with: pass --scope (your facility publishes its S2CS's scope), "
            f"set SCISTREAM_SCOPE, or put {where} in {settings_path()}")
    return str(scope)


def namespace_for(s2cs: str | None) -> str:
    return f"s2cs:{s2cs}" if s2cs else DEFAULT_NS


def native_client(client_id: str) -> globus_sdk.NativeAppAuthClient:
    return globus_sdk.NativeAppAuthClient(
        client_id, app_name=APP_NAME, transport=RequestsTransport(http_timeout=HTTP_TIMEOUT),
        retry_config=RetryConfig(max_retries=RETRIES, max_sleep=5))


class _Data(TokenStorageData):
    """Token data that keeps its ``extra`` fields (client id, scope, S2CS) in the file."""

    def to_dict(self, include_extra: bool = True) -> dict[str, Any]:
        return super().to_dict(include_extra=True)


class TokenStore(JSONTokenStorage):
    """``JSONTokenStorage`` that keeps its directory 0700 and its file 0600, always."""

    def __init__(self, namespace: str = DEFAULT_NS, path: Path | None = None) -> None:
        path = Path(path or store_path())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        super().__init__(path, namespace=namespace)

    def _fix_mode(self) -> None:
        if os.path.exists(self.filepath):
            os.chmod(self.filepath, 0o600)

    def store_token_data_by_resource_server(self, data) -> None:  # type: ignore[override]
        keep = {rs: _Data.from_dict(d.to_dict(include_extra=True)) for rs, d in data.items()}
        with self.user_only_umask():
            super().store_token_data_by_resource_server(keep)
        self._fix_mode()

    def remove_token_data(self, resource_server: str) -> bool:
        with self.user_only_umask():
            removed = super().remove_token_data(resource_server)
        self._fix_mode()
        return removed

    def clear(self) -> None:
        for rs in list(self.get_token_data_by_resource_server()):
            self.remove_token_data(rs)

    def primary(self) -> TokenStorageData | None:
        """The token this login was made for (the one for the requested scope)."""
        data = list(self.get_token_data_by_resource_server().values())
        return next((d for d in data if d.extra.get("primary")), data[0] if data else None)


def namespaces(path: Path | None = None) -> list[str]:
    """Every login in the store, by namespace."""
    path = Path(path or store_path())
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"token store {path} is unreadable ({exc}); delete it and log in "
                              "again") from None
    return sorted(ns for ns, by_rs in (raw.get("data") or {}).items() if by_rs)


def store_response(store: TokenStore, response: globus_sdk.OAuthTokenResponse, *,
                   client_id: str, scope: str, s2cs: str | None,
                   previous: dict[str, TokenStorageData] | None = None) -> TokenStorageData:
    """Keep the tokens of a code exchange or refresh; return the one for ``scope``."""
    wanted = set(scope.split())
    chosen: TokenStorageData | None = None
    by_rs = response.by_resource_server
    out: dict[str, TokenStorageData] = {}
    for rs, tok in by_rs.items():
        old = (previous or {}).get(rs)
        primary = bool(wanted & set(str(tok.get("scope", "")).split()))
        out[rs] = TokenStorageData(
            resource_server=rs, identity_id=None, scope=tok.get("scope", ""),
            access_token=tok["access_token"],
            refresh_token=tok.get("refresh_token") or (old.refresh_token if old else None),
            expires_at_seconds=int(tok["expires_at_seconds"]), token_type=tok.get("token_type"),
            extra={"client_id": client_id, "requested_scope": scope, "s2cs": s2cs,
                   "primary": primary})
        if primary:
            chosen = out[rs]
    if chosen is None:
        got = ", ".join(f"{rs} ({t.get('scope', '')})" for rs, t in by_rs.items()) or "nothing"
        raise AuthConfigError(f"Globus Auth returned no token for scope {scope} (got {got}); "
                              "check the scope your facility gave you")
    store.store_token_data_by_resource_server(out)
    return chosen


def refresh(store: TokenStore, data: TokenStorageData) -> TokenStorageData:
    """Trade the refresh token for a new access token and store it."""
    client_id = data.extra.get("client_id") or resolve_client_id(None)
    client = native_client(client_id)
    try:
        response = client.oauth2_refresh_token(data.refresh_token or "")
    finally:
        client.close()
    return store_response(store, response, client_id=client_id,
                          scope=data.extra.get("requested_scope") or data.scope,
                          s2cs=data.extra.get("s2cs"),
                          previous=store.get_token_data_by_resource_server())


def _pick_namespace(s2cs: str | None) -> str | None:
    """The login for ``s2cs``: its own, else one made for the scope configured for it, else
    (no scope configured) the default login. A login made for one S2CS is never sent to
    another one unless the settings give both the same scope."""
    if not (have := namespaces()):
        return None
    if s2cs:
        if namespace_for(s2cs) in have:
            return namespace_for(s2cs)
        try:
            scope = resolve_scope(None, s2cs)
        except AuthConfigError:
            scope = None
        if scope:
            for ns in sorted(have, key=lambda n: n != DEFAULT_NS):
                data = TokenStore(ns).primary()
                if data is not None and data.extra.get("requested_scope") == scope:
                    return ns
            return None
    return DEFAULT_NS if DEFAULT_NS in have else None


def stored_token(s2cs: str | None = None) -> str | None:
    """The access token ``s2uc login`` stored for ``s2cs`` (refreshed if about to expire),
    or None when there is none that fits: the caller then sends no token, and a server that
    checks tokens answers UNAUTHENTICATED with what to do."""
    try:
        ns = _pick_namespace(s2cs)
    except AuthConfigError as exc:
        log.warning("%s", exc)
        return None
    if ns is None:
        return None
    store = TokenStore(ns)
    if (data := store.primary()) is None:
        return None
    if data.expires_at_seconds - time.time() > REFRESH_MARGIN:
        return data.access_token
    if not data.refresh_token:
        log.warning("your Globus login (%s) has expired; run `s2uc login` again", ns)
        return None
    try:
        data = refresh(store, data)
    except globus_sdk.GlobusAPIError as exc:
        log.warning("your Globus login (%s) could not be refreshed (Globus Auth said %s %s); "
                    "run `s2uc login` again", ns, exc.http_status, exc.code)
        return None
    except (globus_sdk.NetworkError, AuthConfigError) as exc:
        log.warning("your Globus login (%s) expired and could not be refreshed (%s); retry, "
                    "or run `s2uc login` again", ns, type(exc).__name__)
        return None
    log.info("refreshed the Globus token of login %s", ns)
    return data.access_token
