"""The control channel's certificate: given by the operator, or a self-signed one of ours.

Ours is a small private CA and a leaf it signs, both made at the first start in the state
directory: ``server-ca.crt``/``server-ca.key`` (the CA: ``cA=TRUE``, path length 0, only
``keyCertSign``/``cRLSign``, ``CA_LIFETIME``) and ``server.crt``/``server.key`` (the leaf:
``cA=FALSE``, ``digitalSignature``, ``serverAuth``, ``LEAF_LIFETIME``, within what browsers
and Mozilla's profile allow; ``server.crt`` holds the leaf followed by the CA). The leaf
names the listener IP, localhost, 127.0.0.1, ::1 and the host name, so a client handed
``server.crt`` verifies whichever of them it dials. A leaf that no longer covers those
names, or has less than ``RENEW_BEFORE`` left, is issued again by the same CA (at start,
and by ``LiveCertificate`` while the server runs): a client that trusts ``server.crt``
(which holds the CA) keeps trusting its successors.

    ensure_self_signed(state_dir / "server.crt", state_dir / "server.key", ["10.0.0.2"])
    expiry_warning(cert_pem)   # a sentence when the served leaf ends within RENEW_BEFORE
    server_context(cert, key)  # Python ssl: Mozilla's "intermediate" profile
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..data.wankeys import write_private

log = logging.getLogger(__name__)

#: Mozilla's "intermediate" profile (5.7) for TLS 1.2, less its DHE suites (no DH parameters
#: are configured); TLS 1.3 keeps OpenSSL's three suites, all of them in the profile.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"])
#: Its key exchange groups (OpenSSL also offers X448 and P-521 unless told otherwise).
INTERMEDIATE_GROUPS = "X25519:P-256:P-384"

LEAF_LIFETIME = datetime.timedelta(days=365)   # Mozilla's profiles: at most 366; browsers 398
CA_LIFETIME = datetime.timedelta(days=10 * 365)
RENEW_BEFORE = datetime.timedelta(days=30)      # issue the leaf again (and warn) when less is left
_SKEW = datetime.timedelta(minutes=5)
_ORG = "SciStream S2CS (self-signed)"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the first certificate of ``cert_pem`` (DER), as AA:BB:..."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex(":").upper()


def ca_path(cert_path: Path) -> tuple[Path, Path]:
    """Where the CA of the self-signed ``cert_path`` lives: (certificate, key)."""
    return (cert_path.with_name(cert_path.stem + "-ca.crt"), cert_path.with_name(cert_path.stem + "-ca.key"))


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):   # each once, in order
        if not n or n in ("0.0.0.0", "::"):
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _load_ca(cert_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA next to ``cert_path`` if it is there, usable and not about to end."""
    crt, key = ca_path(cert_path)
    try:
        ca = x509.load_pem_x509_certificate(crt.read_bytes())
        ca_key = serialization.load_pem_private_key(key.read_bytes(), None)
    except (OSError, ValueError):
        return None
    if (not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca.public_key()
            or ca.not_valid_after_utc - _now() < LEAF_LIFETIME + RENEW_BEFORE):
        return None
    return ca, ca_key


def _make_ca(cert_path: Path, host: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # a name of its own: clients may trust several servers' CAs from one bundle
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"SciStream S2CS CA {host} {secrets.token_hex(4)}"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)])
    now = _now()
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(sign=False, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    crt, key_path = ca_path(cert_path)
    write_private(key_path, _key_pem(key))
    crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca, key


def make_self_signed(cert_path: Path, key_path: Path, hosts: list[str]) -> None:
    """Issue a new leaf for ``hosts`` (and the local names) into ``cert_path``/``key_path``,
    signed by the CA next to them (made first if it is missing or ends within a leaf's
    lifetime)."""
    names = hosts + ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    host = next((h for h in hosts if h and h not in ("0.0.0.0", "::")), "localhost")
    loaded = _load_ca(cert_path)
    ca, ca_key = loaded if loaded is not None else _make_ca(cert_path, host)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)])
    now = _now()
    leaf = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + LEAF_LIFETIME - _SKEW)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign=True, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    tmp = cert_path.with_name(cert_path.name + ".new")
    tmp.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)


def cert_covers(cert_path: Path, hosts: list[str]) -> bool:
    """True if ``cert_path`` is a leaf of ours (not a CA, its CA next to it) that names every
    one of ``hosts`` and has more than ``RENEW_BEFORE`` left."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        cert = chain[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
        return False
    loaded = _load_ca(cert_path)
    if is_ca or loaded is None or cert.issuer != loaded[0].subject:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE
    return fresh and all(h in have for h in hosts if h not in ("0.0.0.0", "::"))


def ensure_self_signed(cert_path: Path, key_path: Path, hosts: list[str]) -> bool:
    """Issue the leaf again unless ``cert_covers`` it (and the key is there): True if it did."""
    if key_path.exists() and cert_covers(cert_path, hosts):
        return False
    make_self_signed(cert_path, key_path, hosts)
    return True


def expiry_warning(cert_pem: bytes, *, within: datetime.timedelta = RENEW_BEFORE) -> str | None:
    """A sentence if the first certificate of ``cert_pem`` (the one served) has ended or ends
    within ``within``; None otherwise."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    left = cert.not_valid_after_utc - _now()
    if left > within:
        return None
    end = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    if left.total_seconds() <= 0:
        return f"the certificate {cert.subject.rfc4514_string()} EXPIRED on {end}: clients refuse it"
    return (f"the certificate {cert.subject.rfc4514_string()} expires on {end} ({left.days} days left): "
            "rotate it (docs/security.md, 'Rotating the control certificate')")


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Restrict ``ctx``'s key exchange to ``groups`` (OpenSSL's list syntax). Python 3.11 sets
    one group at most (``set_ecdh_curve``); the compiled module of the data server sets the
    list. Without it, the first group alone: True if the whole list was set."""
    from ..data.engine.compiled import on_context
    try:
        on_context(ctx, "set_groups", groups)
        return True
    except (RuntimeError, TypeError, ValueError) as exc:
        why = str(exc)
    first = groups.split(":")[0]
    log.warning("TLS key exchange: %s, so only %s is offered (not %s)", why, first, groups)
    ctx.set_ecdh_curve(first)
    return False


def server_context(cert: Path | str, key: Path | str, *, tls13_only: bool = False) -> ssl.SSLContext:
    """A TLS server context of Mozilla's "intermediate" profile (``tls13_only``: its "modern"
    one) for the certificate chain ``cert`` and its ``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls13_only else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    set_groups(ctx, INTERMEDIATE_GROUPS)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


#: How often a running server looks at its certificate again (on a new connection).
CHECK_EVERY = 60.0


class LiveCertificate:
    """The control channel's certificate and key while the server runs. ``refresh()``, asked
    on new connections (at most every ``CHECK_EVERY`` seconds; from gRPC's threads and the
    event loop alike), looks again: ours (``hosts`` given) is issued again by its CA when
    it has less than ``RENEW_BEFORE`` left; yours is read again when its files change
    (replace both, the key first; a pair that does not match is not taken). Each change
    bumps ``version``; ``current()`` gives (version, key PEM, chain PEM). Warns once a day
    near the end."""

    def __init__(self, cert: Path, key: Path, hosts: list[str] | None = None, *, warned: bool = False) -> None:
        self.cert, self.key, self.hosts = cert, key, hosts
        self.key_pem, self.cert_pem = key.read_bytes(), cert.read_bytes()
        self.version = 0
        self._lock = threading.Lock()
        self._stamp = self._files()
        now = time.time()
        self._next = now + CHECK_EVERY           # the server just looked at it
        self._warned = now if warned else 0.0    # a warning at start counts as today's

    def _files(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (self.cert, self.key))

    def current(self) -> tuple[int, bytes, bytes]:
        with self._lock:
            return self.version, self.key_pem, self.cert_pem

    def refresh(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            if now < self._next:
                return
            self._next = now + CHECK_EVERY
            try:
                if self.hosts is not None and ensure_self_signed(self.cert, self.key, self.hosts):
                    log.info("control channel: issued a new leaf certificate %s", self.cert)
                stamp = self._files()
                if stamp != self._stamp:
                    key_pem, cert_pem = self.key.read_bytes(), self.cert.read_bytes()
                    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    check.load_cert_chain(self.cert, self.key)      # the pair must match
                    self._stamp, self.key_pem, self.cert_pem = stamp, key_pem, cert_pem
                    self.version += 1
                    log.info("control channel: now serving the certificate in %s (%s)", self.cert,
                             fingerprint(cert_pem))
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("control channel: keeping the certificate it serves: %s or %s cannot be used (%s)",
                            self.cert, self.key, exc)
            self._warn(now)

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Put the current pair into ``ctx`` (its new connections get it)."""
        with self._lock:
            ctx.load_cert_chain(self.cert, self.key)

    def _warn(self, now: float) -> None:
        if now - self._warned < 86400:
            return
        self._warned = now
        try:
            warning = expiry_warning(self.cert_pem)
        except ValueError:
            return
        if warning:
            log.warning("control channel: %s", warning)
