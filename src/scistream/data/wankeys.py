"""Per-session WAN credentials, all derived from the session's random secret.

The PROD S2CS draws 32 random bytes per session (``new_secret``) and hands them only to
the session's owner, whose client passes them to the CONS S2CS. From that secret both
gateways derive, bit for bit, the same credentials:

* an Ed25519 key and a self-signed certificate (Ed25519 signatures are deterministic,
  so both sides build the identical certificate). Each S2DS presents it and trusts only
  it: the WAN leg is TLS 1.3 with *mutual* authentication, and a peer that lacks the
  secret cannot complete the handshake;
* a PSK identity and key for the stunnel backend.

Nothing here is derived from the uid alone: without the secret, knowing the uid is
worth nothing.

    files = write_credentials(secret, uid, workdir)   # cert.pem, key.pem, bundle.pem, psk.txt
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
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
_NOT_AFTER = datetime.datetime(2200, 1, 1, tzinfo=datetime.timezone.utc)


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


def secrets_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class Credentials:
    cert_pem: bytes
    key_pem: bytes
    psk_identity: str
    psk_key_hex: str
    fingerprint: str  # sha256 of the certificate (DER), hex


def derive_credentials(secret: bytes, uid: str) -> Credentials:
    key = Ed25519PrivateKey.from_private_bytes(_derive(secret, b"ed25519-key"))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scistream-session"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SciStream")])
    serial = int.from_bytes(_derive(secret, b"serial", 16), "big") >> 2 or 1
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_EPOCH).not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("scistream-session")]), critical=False)
        .sign(key, None)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return Credentials(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        psk_identity="scistream-" + _derive(secret, b"psk-identity", 8).hex(),
        psk_key_hex=_derive(secret, b"psk-key", 32).hex(),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


@dataclass(frozen=True)
class CredentialFiles:
    cert: Path     # certificate (PEM): present it, and trust only it
    key: Path      # private key (PEM), mode 0600
    bundle: Path   # key + certificate in one file (HAProxy's crt), mode 0600
    psk: Path      # stunnel PSKsecrets file "identity:key", mode 0600
    creds: Credentials


def write_credentials(secret: bytes, uid: str, workdir: Path, *, only_pem: bool = False) -> CredentialFiles:
    """The session's credentials as files in ``workdir`` (mode 0600); ``only_pem``: just the
    certificate and the key (what the built-in data servers read)."""
    creds = derive_credentials(secret, uid)
    workdir.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> Path:
        path = workdir / name
        if only_pem and name not in ("wan-cert.pem", "wan-key.pem"):
            return path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    return CredentialFiles(
        cert=put("wan-cert.pem", creds.cert_pem),
        key=put("wan-key.pem", creds.key_pem),
        bundle=put("wan-bundle.pem", creds.cert_pem + creds.key_pem),
        psk=put("wan-psk.txt", f"{creds.psk_identity}:{creds.psk_key_hex}\n".encode()),
        creds=creds,
    )


def ssl_context(files: CredentialFiles, *, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, mutual authentication against the session certificate alone."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=str(files.cert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx
