"""Per-session WAN credentials: derived from the secret alone (the same anchor, leaf key and
PSK on both gateways), different for every secret, private on disk, a leaf that lives no
longer than the session's lease plus a margin, and good for a mutual TLS 1.3 handshake."""
from __future__ import annotations

import datetime
import ssl
import stat
import time

import pytest
from tlsmemory import handshake
from cryptography import x509

from scistream.data import wankeys

UTC = datetime.timezone.utc


def test_both_gateways_derive_the_same_credentials():
    secret = wankeys.new_secret()
    a = wankeys.derive_credentials(secret, "uid-1")
    b = wankeys.derive_credentials(bytes(secret), "uid-1")
    assert (a.ca_pem, a.key_pem, a.fingerprint, a.psk_identity, a.psk_key_hex) == \
           (b.ca_pem, b.key_pem, b.fingerprint, b.psk_identity, b.psk_key_hex)
    assert a.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert len(a.psk_key_hex) == 64 and a.psk_identity.startswith("scistream-")
    # each side's leaf is its own, for the same key, from the same anchor
    la, lb = (x509.load_pem_x509_certificate(c.cert_pem) for c in (a, b))
    anchor = x509.load_pem_x509_certificate(a.ca_pem)
    assert la.public_key() == lb.public_key() and la.issuer == lb.issuer == anchor.subject
    la.verify_directly_issued_by(anchor)
    lb.verify_directly_issued_by(anchor)


def test_the_leaf_lives_as_long_as_the_lease_plus_a_margin():
    secret = wankeys.new_secret()
    lease_end = time.time() + 3600
    leaf = x509.load_pem_x509_certificate(
        wankeys.derive_credentials(secret, "u", not_after=wankeys.leaf_until(lease_end)).cert_pem)
    want = datetime.datetime.fromtimestamp(lease_end, UTC) + wankeys.MARGIN
    assert abs((leaf.not_valid_after_utc - want).total_seconds()) <= 1
    assert leaf.not_valid_before_utc <= datetime.datetime.now(UTC) - wankeys.SKEW + datetime.timedelta(seconds=2)
    assert wankeys.renew_at(leaf.not_valid_after_utc, lease_end) == 0     # it outlives the lease
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # no lease: a bounded lifetime, issued again once less than RENEW_BEFORE is left
    free = wankeys.derive_credentials(secret, "u")
    life = free.not_after - datetime.datetime.now(UTC)
    assert wankeys.LIFETIME - datetime.timedelta(minutes=1) < life <= wankeys.LIFETIME
    assert wankeys.renew_at(free.not_after) == (free.not_after - wankeys.RENEW_BEFORE).timestamp()


def test_each_gateways_own_leaf_verifies_under_strict_x509_flags(tmp_path):
    """PROD and CONS issue their leaves at different times, for different leases: each
    verifies the other's, also under OpenSSL's strict X.509 checks."""
    secret = wankeys.new_secret()
    prod = wankeys.write_credentials(secret, "u", tmp_path / "prod", not_after=wankeys.leaf_until(time.time() + 60))
    cons = wankeys.write_credentials(secret, "u", tmp_path / "cons")
    assert prod.cert.read_bytes() != cons.cert.read_bytes()
    srv = wankeys.ssl_context(prod, server=True)
    cli = wankeys.ssl_context(cons, server=False)
    srv.verify_flags |= ssl.VERIFY_X509_STRICT
    cli.verify_flags |= ssl.VERIFY_X509_STRICT
    s, c = _handshake(srv, cli)
    assert s.getpeercert() and c.getpeercert()


def test_an_expired_leaf_is_refused(tmp_path):
    secret = wankeys.new_secret()
    good = wankeys.write_credentials(secret, "u", tmp_path / "good")
    old = wankeys.write_credentials(secret, "u", tmp_path / "old",
                                    not_after=datetime.datetime.now(UTC) - datetime.timedelta(minutes=1))
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(wankeys.ssl_context(old, server=True), wankeys.ssl_context(good, server=False))


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
    assert stat.S_IMODE(files.ca.stat().st_mode) == 0o600 and files.ca.read_bytes() == files.creds.ca_pem


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory; raises ssl.SSLError if either side refuses."""
    t = handshake(server_ctx, client_ctx)
    return t.server, t.client


def test_same_secret_handshakes_mutually_in_tls13(tmp_path):
    files = wankeys.write_credentials(wankeys.new_secret(), "u", tmp_path / "w")
    srv, cli = _handshake(wankeys.ssl_context(files, server=True), wankeys.ssl_context(files, server=False))
    assert cli.version() == srv.version() == "TLSv1.3"
    assert cli.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
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
