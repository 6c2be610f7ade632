"""--auth static: the token-hash file, the commands that edit it, and the authenticator."""
from __future__ import annotations

import hashlib
import stat
import subprocess

import pytest

from conftest import BIN
from scistream.auth.base import AuthConfigError, make_authenticator
from scistream.auth.static import StaticAuth, add_token, list_identities, parse_token_file, remove_identity
from scistream.errors import Unauthenticated


async def test_added_token_authenticates_and_only_its_hash_is_stored(tmp_path):
    path = tmp_path / "tokens"
    alice = add_token(path, "alice@uni.edu")
    bob = add_token(path, "bob")
    text = path.read_text()
    assert alice not in text and bob not in text
    assert f"sha256:{hashlib.sha256(alice.encode()).hexdigest()} alice@uni.edu" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    auth = make_authenticator("static", token_file=path)
    assert (await auth.authenticate(f"Bearer {alice}")).id == "alice@uni.edu"
    assert (await auth.authenticate(bob)).id == "bob"          # bare token
    assert (await auth.authenticate(f"bearer   {bob} ")).id == "bob"


@pytest.mark.parametrize("value", [None, "", "Bearer ", "INVALID_TOKEN", "Bearer INVALID_TOKEN"])
async def test_missing_token_says_run_login(tmp_path, value):
    path = tmp_path / "tokens"
    add_token(path, "alice")
    with pytest.raises(Unauthenticated, match="s2uc login"):
        await StaticAuth(path).authenticate(value)


async def test_unknown_token_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "tokens"
    add_token(path, "alice")
    with pytest.raises(Unauthenticated) as info:
        await StaticAuth(path).authenticate("Bearer sst_not-a-real-token")
    assert "sst_not-a-real-token" not in str(info.value)
    assert "s2uc login" in str(info.value)


async def test_file_changes_take_effect_without_restart(tmp_path, caplog):
    path = tmp_path / "tokens"
    alice = add_token(path, "alice")
    auth = StaticAuth(path)
    carol = add_token(path, "carol")
    assert (await auth.authenticate(carol)).id == "carol"
    assert sorted(i for i, _ in list_identities(path)) == ["alice", "carol"]
    assert remove_identity(path, "carol") == 1
    assert [i for i, _ in list_identities(path)] == ["alice"]
    with pytest.raises(Unauthenticated):
        await auth.authenticate(carol)
    # a broken edit keeps the tokens read before, and the server log says why
    path.write_text(path.read_text() + "this line is wrong\n")
    assert (await auth.authenticate(alice)).id == "alice"
    assert "keeping the 1 tokens read before" in caplog.text


def test_bad_files_name_the_line(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nsha256:abc alice\n")
    with pytest.raises(AuthConfigError, match=r"tokens:3: the first field must be sha256"):
        parse_token_file(path)
    path.write_text("sha256:" + "a" * 64 + " alice extra\n")
    with pytest.raises(AuthConfigError, match=r"tokens:1: expected"):
        parse_token_file(path)
    path.write_text(("sha256:" + "b" * 64 + " alice\n") * 2)
    with pytest.raises(AuthConfigError, match=r"tokens:2: the same token hash"):
        parse_token_file(path)
    with pytest.raises(AuthConfigError, match="s2cs token add"):
        StaticAuth(tmp_path / "missing")
    with pytest.raises(AuthConfigError, match="--token-file"):
        make_authenticator("static")
    with pytest.raises(AuthConfigError, match="without spaces"):
        add_token(path.with_name("t2"), "two words")


def test_token_commands(tmp_path):
    path = tmp_path / "sub" / "tokens"
    run = lambda *a: subprocess.run([str(BIN / "s2cs"), "token", *a, "--token-file", str(path)],
                                    capture_output=True, text=True, timeout=60)
    added = run("add", "alice@uni.edu")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("sst_") and len(token) > 40
    assert "not stored" in added.stderr and token not in added.stderr
    assert token not in path.read_text()
    assert parse_token_file(path) == {hashlib.sha256(token.encode()).hexdigest(): "alice@uni.edu"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = run("list")
    assert listed.returncode == 0 and listed.stdout.startswith("alice@uni.edu\tsha256:")
    assert token not in listed.stdout
    assert run("remove", "nobody").returncode == 1
    assert run("remove", "alice@uni.edu").returncode == 0
    assert parse_token_file(path) == {}
