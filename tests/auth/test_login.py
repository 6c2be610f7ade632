"""s2uc login / logout / check-auth and the token store, against canned Globus Auth answers.

The commands run in-process (click's CliRunner) so that `responses` can stand in for
Globus Auth; everything else is real: the PKCE flow of globus-sdk, the JSON token store on
disk, the refresh, the revocation, and (check-auth) a real S2CS process."""
from __future__ import annotations

import base64
import hashlib
import json
import stat
import time
import urllib.parse

import pytest
import responses
from click.testing import CliRunner

from globus_sdk.testing import RegisteredResponse
from scistream.auth import tokens
from scistream.auth.static import add_token
from scistream.cli.common import resolve_token
from scistream.cli.s2uc_auth import auth_commands, check_auth, login, logout

NATIVE = "2c8d0b4f-0000-4000-8000-6d26825f0002"
RS = "1b7c9a3e-0000-4000-8000-5c15714e0001"
SCOPE = f"https://auth.globus.org/scopes/{RS}/scistream"
S2CS = "127.0.0.1:5000"
TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    monkeypatch.setenv("SCISTREAM_CONFIG_DIR", str(cfg))
    for var in ("SCISTREAM_TOKEN", "SCISTREAM_CLIENT_ID", "SCISTREAM_SCOPE", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tokens, "RETRIES", 0)
    return cfg


@pytest.fixture
def globus():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def token_reply(access: str, refresh: str | None = "rt-1", expires_in: int = 172800, **kw) -> dict:
    body = {"access_token": access, "scope": SCOPE, "resource_server": RS, "expires_in": expires_in,
            "token_type": "Bearer", "state": "_default", "other_tokens": []}
    if refresh:
        body["refresh_token"] = refresh
    body.update(kw)
    return body


def reply(rsps, body: dict, status: int = 200, path: str = "/v2/oauth2/token") -> None:
    RegisteredResponse(service="auth", path=path, method="POST", json=body, status=status).add(requests_mock=rsps)


def form(call) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(call.request.body).items()}


def do_login(*args: str, code: str = "code-123"):
    result = CliRunner().invoke(login, ["--no-browser", *args], input=f"{code}\n")
    return result


def test_login_runs_the_pkce_flow_and_keeps_tokens_0600(globus, user_home):
    reply(globus, token_reply("at-1"))
    result = do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", S2CS)
    assert result.exit_code == 0, result.output
    url = next(l for l in result.output.splitlines() if l.startswith("https://auth.globus.org/"))
    query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    assert query["client_id"] == [NATIVE] and query["scope"] == [SCOPE]
    assert query["access_type"] == ["offline"]           # a refresh token is asked for
    sent = form(globus.calls[0])
    assert sent["grant_type"] == "authorization_code" and sent["code"] == "code-123"
    assert sent["client_id"] == NATIVE
    challenge = base64.urlsafe_b64encode(hashlib.sha256(sent["code_verifier"].encode()).digest())
    assert query["code_challenge"] == [challenge.rstrip(b"=").decode()]
    assert "at-1" not in result.output and "rt-1" not in result.output
    path = user_home / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(user_home.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())["data"][f"s2cs:{S2CS}"][RS]
    assert saved["access_token"] == "at-1" and saved["client_id"] == NATIVE
    assert tokens.stored_token(S2CS) == "at-1"
    assert resolve_token(None, S2CS) == "at-1"
    assert resolve_token("INVALID_TOKEN", S2CS) == "at-1"
    assert resolve_token("explicit", S2CS) == "explicit"
    assert len(globus.calls) == 1                       # a fresh token is not refreshed


def test_settings_file_gives_client_id_and_per_server_scope(globus, user_home):
    user_home.mkdir()
    other = "https://auth.globus.org/scopes/other/scistream"
    (user_home / "auth.toml").write_text(
        f'client_id = "{NATIVE}"\nscope = "{other}"\n[s2cs."{S2CS}"]\nscope = "{SCOPE}"\n')
    reply(globus, token_reply("at-cfg"))
    result = do_login("--s2cs", S2CS)
    assert result.exit_code == 0, result.output
    assert urllib.parse.quote(SCOPE, safe="") in result.output
    assert tokens.stored_token(S2CS) == "at-cfg"
    # another S2CS whose configured scope is the default one: this login does not fit it
    assert tokens.stored_token("127.0.0.1:6000") is None


def test_login_without_scope_or_client_id_is_a_usage_error():
    result = do_login("--scope", SCOPE)
    assert result.exit_code == 2 and "--client-id" in result.output
    result = do_login("--client-id", NATIVE)
    assert result.exit_code == 2 and "--scope" in result.output


def test_refused_code_exits_login(globus):
    reply(globus, {"error": "invalid_grant"}, status=401)
    result = do_login("--client-id", NATIVE, "--scope", SCOPE)
    assert result.exit_code == 3 and "refused the code" in result.output
    assert tokens.stored_token(None) is None


def test_a_reply_for_another_scope_is_refused(globus):
    reply(globus, token_reply("at-x", scope="urn:globus:auth:scope:transfer.api.globus.org:all",
                              resource_server="transfer.api.globus.org"))
    result = do_login("--client-id", NATIVE, "--scope", SCOPE)
    assert result.exit_code == 3 and "no token for scope" in result.output
    assert "at-x" not in result.output


def test_browser_is_opened_unless_no_browser(globus, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url, new=0: opened.append(url) or True)
    monkeypatch.setenv("DISPLAY", ":99")
    reply(globus, token_reply("at-b"))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    assert opened == []                                  # do_login passes --no-browser
    result = CliRunner().invoke(login, ["--client-id", NATIVE, "--scope", SCOPE], input="c\n")
    assert result.exit_code == 0 and len(opened) == 1 and opened[0].startswith("https://auth.globus.org/")


def test_expiring_token_is_refreshed_and_stored(globus, user_home):
    reply(globus, token_reply("at-old", refresh="rt-1", expires_in=30))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    reply(globus, token_reply("at-new", refresh=None))
    assert tokens.stored_token(S2CS) == "at-new"          # the default login serves any S2CS
    sent = form(globus.calls[1])
    assert sent == {"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": NATIVE}
    data = tokens.TokenStore("default").primary()
    assert (data.access_token, data.refresh_token) == ("at-new", "rt-1")
    assert data.expires_at_seconds > time.time() + 3600
    assert stat.S_IMODE((user_home / "tokens.json").stat().st_mode) == 0o600
    assert tokens.stored_token(S2CS) == "at-new" and len(globus.calls) == 2


def test_refused_refresh_means_log_in_again(globus, caplog):
    reply(globus, token_reply("at-old", refresh="rt-1", expires_in=0))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    reply(globus, {"error": "invalid_grant"}, status=400)
    assert tokens.stored_token(S2CS) is None
    assert "run `s2uc login` again" in caplog.text
    assert "rt-1" not in caplog.text and "at-old" not in caplog.text


def test_expired_without_refresh_token(globus, caplog):
    reply(globus, token_reply("at-old", refresh=None, expires_in=0))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    assert tokens.stored_token(None) is None
    assert "has expired" in caplog.text and len(globus.calls) == 1


def test_logout_revokes_both_tokens_then_forgets_them(globus):
    reply(globus, token_reply("at-1", refresh="rt-1"))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", S2CS).exit_code == 0
    reply(globus, {"active": False}, path="/v2/oauth2/token/revoke")
    result = CliRunner().invoke(logout, [])
    assert result.exit_code == 0 and "2 tokens revoked" in result.output
    revoked = [form(c) for c in globus.calls if c.request.url.endswith("/revoke")]
    assert revoked == [{"token": "at-1", "client_id": NATIVE}, {"token": "rt-1", "client_id": NATIVE}]
    assert tokens.stored_token(S2CS) is None and tokens.namespaces() == []
    assert "Not logged in" in CliRunner().invoke(logout, []).output


def test_logout_deletes_locally_when_revocation_fails(globus):
    reply(globus, token_reply("at-1", refresh="rt-1"))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", S2CS).exit_code == 0
    reply(globus, {"error": "boom"}, status=500, path="/v2/oauth2/token/revoke")
    result = CliRunner().invoke(logout, ["--s2cs", S2CS])
    assert result.exit_code == 0
    assert "could not revoke access token" in result.output and "deleted locally" in result.output
    assert "at-1" not in result.output and tokens.namespaces() == []


def test_login_again_replaces_and_revokes_the_old_tokens(globus):
    reply(globus, token_reply("at-1", refresh="rt-1"))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    globus.replace("POST", TOKEN_URL, json=token_reply("at-2", refresh="rt-2"))
    reply(globus, {"active": False}, path="/v2/oauth2/token/revoke")
    assert do_login("--client-id", NATIVE, "--scope", SCOPE).exit_code == 0
    assert tokens.stored_token(None) == "at-2"
    revoked = [form(c)["token"] for c in globus.calls if c.request.url.endswith("/revoke")]
    assert revoked == ["at-1", "rt-1"]


def test_check_auth_lists_logins_without_tokens(globus):
    result = CliRunner().invoke(check_auth, [])
    assert result.exit_code == 3 and "s2uc login" in result.output
    reply(globus, token_reply("at-1"))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", S2CS).exit_code == 0
    result = CliRunner().invoke(check_auth, [])
    assert result.exit_code == 0, result.output
    assert f"s2cs:{S2CS}" in result.output and "yes" in result.output and "at-1" not in result.output


def test_check_auth_asks_a_real_s2cs(globus, s2cs_process, tmp_path):
    token_file = tmp_path / "server-tokens"
    good = add_token(token_file, "alice")
    srv = s2cs_process("--token-file", str(token_file), auth="static")
    reply(globus, token_reply(good))                      # Globus hands out the token the S2CS knows
    assert do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", srv.target).exit_code == 0
    result = CliRunner().invoke(check_auth, ["--s2cs", srv.target, "--insecure"])
    assert result.exit_code == 0, result.output
    assert f"S2CS {srv.target} accepts the token" in result.output and good not in result.output
    result = CliRunner().invoke(check_auth, ["--s2cs", srv.target, "--insecure", "--token", "sst_wrong"])
    assert result.exit_code == 3 and "not known to this S2CS" in result.output
    result = CliRunner().invoke(check_auth, ["--s2cs", "127.0.0.1:1", "--insecure"])
    assert result.exit_code == 3 and "no token for 127.0.0.1:1" in result.output
    assert good not in srv.log()


def test_auth_commands_are_exported():
    assert [c.name for c in auth_commands] == ["login", "logout", "check-auth"]


def test_other_s2uc_commands_send_the_stored_token(globus, s2cs_process, tmp_path):
    from scistream.cli.s2uc import cli as s2uc
    token_file = tmp_path / "server-tokens"
    good = add_token(token_file, "alice")
    srv = s2cs_process("--token-file", str(token_file), auth="static")
    uid = "6f1c2b8e-1d2a-4c1e-9f0a-0b1c2d3e4f50"
    before = CliRunner().invoke(s2uc, ["release", uid, "--s2cs", srv.target, "--insecure"])
    assert before.exit_code == 3, before.output                 # not logged in
    reply(globus, token_reply(good))
    assert do_login("--client-id", NATIVE, "--scope", SCOPE, "--s2cs", srv.target).exit_code == 0
    after = CliRunner().invoke(s2uc, ["release", uid, "--s2cs", srv.target, "--insecure"])
    assert after.exit_code == 1 and "NOT_FOUND" in after.output, after.output   # authenticated
