"""Per-session WAN credentials: derived from the secret alone, identical on both gateways,
different for every secret, private on disk, and good for a mutual TLS 1.3 handshake."""
from __future__ import annotations

import ssl
import stat

import pytest

from scistream.data import wankeys


def test_both_gateways_derive_the_same_credentials():
    secret = wankeys.new_secret()
    a = wankeys.derive_credentials(secret, "uid-1")
    b = wankeys.derive_credentials(bytes(secret), "uid-1")
    assert a == b
    assert a.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert len(a.psk_key_hex) == 64 and a.psk_identity.startswith("scistream-")


def test_another_secret_gives_other_credentials_and_the_uid_gives_nothing():
    a = wankeys.derive_credentials(wankeys.new_secret(), "same-uid")
    b = wankeys.derive_credentials(wankeys.new_secret(), "same-uid")
    assert a.fingerprint != b.fingerprint
    assert a.key_pem != b.key_pem
    assert a.psk_key_hex != b.psk_key_hex and a.psk_identity != b.psk_identity


def test_short_secret_is_refused():
    with pytest.raises(ValueError, match="too short"):
        wankeys.derive_credentials(b"0123456789", "u")


def test_files_are_private(tmp_path):
    files = wankeys.write_credentials(wankeys.new_secret(), "u", tmp_path / "w")
    for path in (files.cert, files.key, files.bundle, files.psk):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert files.psk.read_text().strip() == f"{files.creds.psk_identity}:{files.creds.psk_key_hex}"
    assert files.bundle.read_bytes() == files.cert.read_bytes() + files.key.read_bytes()


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory; raises ssl.SSLError if either side refuses."""
    sbio = (ssl.MemoryBIO(), ssl.MemoryBIO())
    cbio = (ssl.MemoryBIO(), ssl.MemoryBIO())
    srv = server_ctx.wrap_bio(*sbio, server_side=True)
    cli = client_ctx.wrap_bio(*cbio, server_side=False, server_hostname="scistream-session")
    for _ in range(10):
        done = 0
        for obj in (cli, srv):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if cbio[1].pending:
            sbio[0].write(cbio[1].read())
        if sbio[1].pending:
            cbio[0].write(sbio[1].read())
        if done == 2:
            # the server learns the client's verdict only with the next read
            try:
                srv.read(1)
            except ssl.SSLWantReadError:
                pass
            return srv, cli
    raise AssertionError("handshake did not finish")


def test_same_secret_handshakes_mutually_in_tls13(tmp_path):
    files = wankeys.write_credentials(wankeys.new_secret(), "u", tmp_path / "w")
    srv, cli = _handshake(wankeys.ssl_context(files, server=True), wankeys.ssl_context(files, server=False))
    assert cli.version() == srv.version() == "TLSv1.3"
    assert srv.getpeercert() and cli.getpeercert()


@pytest.mark.parametrize("side", ["server", "client"])
def test_other_secret_fails_the_handshake(tmp_path, side):
    mine = wankeys.write_credentials(wankeys.new_secret(), "u", tmp_path / "mine")
    theirs = wankeys.write_credentials(wankeys.new_secret(), "u", tmp_path / "theirs")
    # "server": the server holds another secret; "client": the client does
    server = wankeys.ssl_context(theirs if side == "server" else mine, server=True)
    client = wankeys.ssl_context(theirs if side == "client" else mine, server=False)
    with pytest.raises(ssl.SSLError):
        _handshake(server, client)
