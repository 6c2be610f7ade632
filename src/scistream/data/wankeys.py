"""Per-session WAN credentials, all derived from the session's random secret.

The PROD S2CS draws 32 random bytes per session (``new_secret``) and hands them only to
the session's owner, whose client passes them to the CONS S2CS. From that secret both
gateways derive, bit for bit, the same:

* **session anchor**: an Ed25519 key and a self-signed CA certificate (Ed25519 signatures
  are deterministic, so both sides build the identical one). Each S2DS trusts it, and
  only it (it goes after the leaf, completing the chain: it is no secret; its key,
  derived from the secret, signs nothing but the session's leaves);
* **leaf key**: an Ed25519 key. Each side issues its own leaf certificate for that key,
  signed by the anchor, valid from a few minutes ago until ``not_after``: the session's
  lease end plus ``MARGIN``, or ``LIFETIME`` from now for a session without a lease
  (``leaf_until``). That leaf is what a WAN listener shows: the WAN leg is TLS 1.3 with
  *mutual* authentication, and a peer that lacks the secret cannot complete the handshake;
* a PSK identity and key for the stunnel backend.

Nothing here is derived from the uid alone: without the secret, knowing the uid is
worth nothing.

    files = write_credentials(secret, uid, workdir, not_after=leaf_until(lease_end))
    # wan-cert.pem (leaf), wan-key.pem, wan-ca.pem (anchor), wan-bundle.pem, wan-psk.txt
"""
from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

SECRET_BYTES = 32
_EPOCH = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(2200, 1, 1, tzinfo=datetime.timezone.utc)   # the anchor's: it lives as long as its secret
#: A leaf lives until the session's lease ends plus this (the lease loop's delay, clock skew).
MARGIN = datetime.timedelta(hours=1)
#: A session without a lease: its leaf lives this long, and is issued again before it ends.
LIFETIME = datetime.timedelta(days=30)
#: A facility's session without a lease (its leaf is not issued again): Mozilla's longest.
FACILITY_LIFETIME = datetime.timedelta(days=365)
#: A leaf with less than this left is issued again (a session without a lease).
RENEW_BEFORE = datetime.timedelta(days=7)
#: Its start: a few minutes back, for the peer gateway's clock.
SKEW = datetime.timedelta(minutes=5)
SESSION_NAME = "scistream-session"


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _derive(secret: bytes, label: bytes, n: int = 32) -> bytes:
    if len(secret) < 16:
        raise ValueError("WAN secret too short")
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=b"scistream-wan-v1", info=label).derive(secret)


def ticket_keys(secret: bytes) -> bytes:
    """The session-ticket keys of the session's PROD listeners (80 bytes: name, HMAC secret,
    AES key): every worker and node that serves the session resumes the others' tickets."""
    return _derive(secret, b"tls-ticket-keys", 80)


def leaf_until(lease_end: float = 0.0) -> datetime.datetime:
    """When a leaf issued now ends: the lease's end (epoch seconds) plus ``MARGIN``, or
    ``LIFETIME`` from now without a lease (0)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if lease_end > 0:
        return max(datetime.datetime.fromtimestamp(lease_end, datetime.timezone.utc), now) + MARGIN
    return now + LIFETIME


def renew_at(not_after: datetime.datetime, lease_end: float = 0.0) -> float:
    """When a leaf ending at ``not_after`` must be issued again (epoch s): ``RENEW_BEFORE``
    before its end without a lease; 0 (never) with one, which it outlives."""
    return 0.0 if lease_end > 0 else (not_after - RENEW_BEFORE).timestamp()


def leaf_end(path: Path) -> datetime.datetime | None:
    """When the leaf in the PEM file ``path`` ends; None if there is none to read."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Credentials:
    cert_pem: bytes   # this side's leaf certificate, signed by the anchor, then the anchor (its chain)
    key_pem: bytes    # the leaf's private key
    ca_pem: bytes     # the session anchor: the one trusted certificate
    psk_identity: str
    psk_key_hex: str
    fingerprint: str  # sha256 of the anchor (DER), hex: the same on both gateways
    not_after: datetime.datetime   # the leaf's end


def derive_credentials(secret: bytes, uid: str, *, not_after: datetime.datetime | None = None) -> Credentials:
    """The session's credentials; the leaf ends at ``not_after`` (default ``leaf_until()``)."""
    ca_key = Ed25519PrivateKey.from_private_bytes(_derive(secret, b"ed25519-ca"))
    key = Ed25519PrivateKey.from_private_bytes(_derive(secret, b"ed25519-key"))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scistream-session anchor"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SciStream")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SESSION_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SciStream")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    serial = int.from_bytes(_derive(secret, b"serial", 16), "big") >> 2 or 1
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(serial)
        .not_valid_before(_EPOCH).not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, None)
    )
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    end = (not_after or leaf_until()).replace(microsecond=0)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SESSION_NAME)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, None)
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    return Credentials(
        # the whole chain: OpenSSL sends it as it is, instead of building it again from the
        # trust store at every handshake (measured: 0.3 ms of CPU less per handshake pair)
        cert_pem=leaf.public_bytes(serialization.Encoding.PEM) + ca_pem,
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        ca_pem=ca_pem,
        psk_identity="scistream-" + _derive(secret, b"psk-identity", 8).hex(),
        psk_key_hex=_derive(secret, b"psk-key", 32).hex(),
        fingerprint=hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest(),
        not_after=end,
    )


@dataclass(frozen=True)
class CredentialFiles:
    cert: Path     # the leaf certificate and the anchor after it (PEM): present it
    key: Path      # its private key (PEM), mode 0600
    ca: Path       # the session anchor (PEM): trust only it
    bundle: Path   # key + certificate in one file (HAProxy's crt), mode 0600
    psk: Path      # stunnel PSKsecrets file "identity:key", mode 0600
    creds: Credentials


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path``, mode 0600, replaced whole (a reader sees the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_credentials(secret: bytes, uid: str, workdir: Path, *, only_pem: bool = False,
                      not_after: datetime.datetime | None = None) -> CredentialFiles:
    """The session's credentials as files in ``workdir`` (mode 0600; written again, with a
    new leaf, to renew it); ``only_pem``: just the leaf, its key and the anchor (what the
    built-in data servers read)."""
    creds = derive_credentials(secret, uid, not_after=not_after)

    def put(name: str, data: bytes) -> Path:
        if not only_pem or name in ("wan-cert.pem", "wan-key.pem", "wan-ca.pem"):
            write_private(workdir / name, data)      # replaced whole: a reader sees old or new
        return workdir / name

    return CredentialFiles(
        cert=put("wan-cert.pem", creds.cert_pem),
        key=put("wan-key.pem", creds.key_pem),
        ca=put("wan-ca.pem", creds.ca_pem),
        bundle=put("wan-bundle.pem", creds.cert_pem + creds.key_pem),
        psk=put("wan-psk.txt", f"{creds.psk_identity}:{creds.psk_key_hex}\n".encode()),
        creds=creds,
    )


#: The WAN leg's key exchange: both ends are ours, so one group, the profile's first.
WAN_GROUP = "X25519"


def ssl_context(files: CredentialFiles, *, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, X25519 only, mutual authentication against the session anchor alone."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve(WAN_GROUP)   # OpenSSL 3: the whole list of groups, this one alone
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx
