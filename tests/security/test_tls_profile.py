"""Every TLS listener, scanned by an independent scanner (sslyze) against Mozilla's
"intermediate" profile: the control port and the web view of a running ``s2cs``, and the
PROD WAN listener of a live session of each type (Builtin, Haproxy, Nginx; Stunnel's
listener admits only its PSK, so no scanner can start a handshake with it). Any finding
outside ``DEVIATIONS`` (the table of docs/security.md) fails, and so does a documented
one that is no longer found. Our generated certificates verify under strict X.509 checks."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from tlsmemory import handshake
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from conftest import async_wait_until, connect_session, parse_listener, roundtrip_ok
from facilityhelpers import facility, pg, sql_sync  # noqa: F401  (fixtures)
from scanner import scan
from scistream.client import AsyncClient
from scistream.control import tlscert
from scistream.data import wankeys

#: What the scanner may find, per listener, and why (docs/security.md says the same).
#: the WAN leaf's Ed25519 key: not a type the profile lists, and the web PKI's path policy
#: (which the scanner applies) forbids it; OpenSSL verifies it, strict flags included
ED25519 = {"certificate_types", "certificate_signatures", "certificate_path_validation"}
DEVIATIONS = {
    "control": {"tls_curves"},   # gRPC's TLS (BoringSSL) also accepts P-521; grpcio cannot say otherwise
    "web": set(),
    "node-control": set(),       # a facility node's control port (s2ds serve --store): TLS 1.3 only
    "wan-Builtin": ED25519,
    "wan-Haproxy": ED25519,
    "wan-Nginx": ED25519,
}
INTERMEDIATE_TLS12 = {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                      "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
                      "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"}
LEASE = 600


def _check(results: dict, name: str) -> dict:
    r = results[name]
    leaf = r.get("leaf") or {}
    print(f"{name}: versions {r['versions']}; TLS 1.2 {r['ciphers'].get('TLSv1.2', [])}; "   # the docs' table (-s)
          f"TLS 1.3 {r['ciphers'].get('TLSv1.3', [])}; groups {r['curves']}; leaf {leaf.get('key')} "
          f"{leaf.get('signature')} {leaf.get('lifespan_seconds')} s; findings {sorted(r['issues'])}")
    assert set(r["issues"]) == DEVIATIONS[name], (name, r["issues"])
    return r


async def test_control_port_and_web_view(s2cs_process):
    """The gRPC control port and the web view of one s2cs, with its own certificate."""
    p = s2cs_process("--web-port", "0", "--drain", insecure=False)
    ca = tlscert.ca_path(p.state_dir / "server.crt")[0]
    ready = json.loads(p.ready.read_text())
    targets = [dict(name="control", ip="127.0.0.1", port=p.port, hostname="localhost", ca_file=str(ca)),
               dict(name="web", ip="127.0.0.1", port=ready["web_port"], hostname="localhost", ca_file=str(ca))]
    results = scan(targets)
    for name in ("control", "web"):
        r = _check(results, name)
        assert r["versions"] == ["TLSv1.2", "TLSv1.3"], r
        assert set(r["ciphers"]["TLSv1.2"]) <= INTERMEDIATE_TLS12, r
        assert {"X25519", "secp256r1"} <= set(r["curves"]), r
        leaf = r["leaf"]
        assert leaf["path_valid"] and not leaf["path_errors"] and leaf["key"] == "ECDSA secp256r1", leaf
        assert leaf["lifespan_days"] <= 366 and leaf["chain_length"] == 2, leaf
    assert set(results["web"]["curves"]) == {"X25519", "secp256r1", "secp384r1"}
    assert set(results["control"]["curves"]) == {"X25519", "secp256r1", "secp384r1", "secp521r1"}


def test_node_service_control_port_of_a_facility(facility, tmp_path):
    """The control port a node of a facility serves to its control servers (s2ds serve
    --store), with the certificate it made and registered in the store."""
    f = facility(nodes=1, instances=0)
    (row,) = sql_sync(f.url, "SELECT control, cert FROM nodes WHERE name = $1", f.nodes[0].name)
    chain = x509.load_pem_x509_certificates(row["cert"].encode())
    assert len(chain) == 2 and chain[0].issuer == chain[1].subject
    ca = tmp_path / "node-ca.pem"
    ca.write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
    host, port = parse_listener(row["control"])
    r = _check(scan([dict(name="node-control", ip=host, port=port, hostname=host, ca_file=str(ca))]),
               "node-control")
    assert r["versions"] == ["TLSv1.3"], r
    assert set(r["curves"]) == {"X25519", "secp256r1", "secp384r1"}, r
    assert r["leaf"]["path_valid"] and not r["leaf"]["path_errors"] and r["leaf"]["lifespan_days"] <= 366, r


@pytest.mark.parametrize("kind,lease", [("Builtin", LEASE), ("Haproxy", 0), ("Nginx", LEASE)])
async def test_wan_listener_of_a_live_session(kind, lease, s2cs_process, echo_server, tmp_path):
    """A session of ``kind`` carries real bytes; then its PROD WAN listener is scanned, the
    scanner holding a leaf of the session's anchor (as the CONS gateway does): TLS 1.3 and
    X25519 alone, and a leaf that ends with the lease plus a margin (without a lease: the
    bounded lifetime)."""
    prod = s2cs_process("--type", kind, "--drain", insecure=False)
    cons = s2cs_process("--type", kind, "--drain", insecure=False)
    pc = AsyncClient(prod.target, server_cert=str(prod.state_dir / "server.crt"))
    cc = AsyncClient(cons.target, server_cert=str(cons.state_dir / "server.crt"))
    try:
        started = time.time()
        uid, presp, cresp = await connect_session(pc, cc, f"{echo_server[0]}:{echo_server[1]}",
                                                  num_conn=1, lease=lease)
        assert presp.wan_secret and cresp.listeners
        await roundtrip_ok(cresp.listeners[0])
        files = wankeys.write_credentials(presp.wan_secret, uid, tmp_path / "scanner")
        host, port = parse_listener(presp.listeners[0])
        name = f"wan-{kind}"
        results = scan([dict(name=name, ip=host, port=port, hostname=wankeys.SESSION_NAME,
                             ca_file=str(files.ca))])
        r = _check(results, name)
        assert r["versions"] == ["TLSv1.3"] and r["curves"] == ["X25519"], r
        leaf = r["leaf"]
        assert leaf["key"] == "Ed25519" and leaf["signature"] == "ed25519", leaf
        # the one reason the path is refused: the key's algorithm
        assert leaf["path_errors"] and all("Forbidden public key algorithm" in e and "Ed25519" in e
                                           for e in leaf["path_errors"]), leaf
        if lease:   # from a few minutes back to the lease's end (counted from the req) plus the margin
            bound = lease + (time.time() - started) + (wankeys.MARGIN + wankeys.SKEW).total_seconds()
        else:       # the bounded lifetime
            bound = (wankeys.LIFETIME + wankeys.SKEW).total_seconds() + (time.time() - started)
        assert bound - 120 <= leaf["lifespan_seconds"] <= bound, (leaf, bound)
        await roundtrip_ok(cresp.listeners[0])      # the session still carries bytes
        await pc.release(uid)
        await cc.release(uid)
    finally:
        await pc.close()
        await cc.close()


def _strict_context(cafile) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    return handshake(server, client, name).client


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", "gw.example.org"])
def test_control_certificate_verifies_strictly(tmp_path, name):
    """The self-signed control certificate: a leaf (cA=FALSE) from a small CA, accepted by
    OpenSSL with VERIFY_X509_STRICT and by cryptography's web-PKI verifier, for every name
    it carries, whether the client trusts the CA alone or the whole server.crt."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    tlscert.make_self_signed(cert, key, ["gw.example.org"])
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    assert len(chain) == 2
    leaf, ca = chain
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    server = tlscert.server_context(cert, key)
    for trust in (cert, tlscert.ca_path(cert)[0]):
        cli = _handshake(server, _strict_context(trust), name)
        assert cli.version() == "TLSv1.3"
        store = Store(x509.load_pem_x509_certificates(trust.read_bytes()))
        try:
            subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verified = PolicyBuilder().store(store).build_server_verifier(subject).verify(leaf, [ca])
        assert verified[0] == leaf


def test_control_certificate_renewal_keeps_pinned_clients(tmp_path):
    """A leaf near its end is issued again by the same CA at start: a client that pinned
    the old server.crt verifies the new leaf; a leaf that does not name a new host is issued
    again too; expiry_warning speaks only near the end."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    assert tlscert.ensure_self_signed(cert, key, ["127.0.0.1"])
    assert not tlscert.ensure_self_signed(cert, key, ["127.0.0.1"])
    pinned = tmp_path / "pinned.crt"
    pinned.write_bytes(cert.read_bytes())
    old_leaf = cert.read_bytes()
    assert tlscert.expiry_warning(cert.read_bytes()) is None
    assert tlscert.ensure_self_signed(cert, key, ["127.0.0.1", "gw.example.org"])  # a new name
    assert cert.read_bytes() != old_leaf
    cli = _handshake(tlscert.server_context(cert, key), _strict_context(pinned), "gw.example.org")
    assert cli.getpeercert()["subjectAltName"]
    soon, _ = _near_end(tmp_path)
    msg = tlscert.expiry_warning(soon)
    assert msg and "expires on" in msg and "rotate" in msg


def test_s2cs_warns_at_start_when_its_certificate_nears_its_end(s2cs_process, tmp_path):
    tlscert.make_self_signed(tmp_path / "server.crt", tmp_path / "server.key", ["127.0.0.1"])
    cert_pem, key_pem = _near_end(tmp_path)
    (tmp_path / "soon.crt").write_bytes(cert_pem)
    (tmp_path / "soon.key").write_bytes(key_pem)
    p = s2cs_process("--server-cert", str(tmp_path / "soon.crt"), "--server-key", str(tmp_path / "soon.key"),
                     insecure=False)
    assert "WARNING" in p.log() and "(9 days left): rotate it" in p.log(), p.log()


def _near_end(tmp_path) -> tuple[bytes, bytes]:
    """A leaf of the CA in tmp_path that ends in 10 days less a minute, and its key (PEM)."""
    ca_crt, ca_key = tlscert.ca_path(tmp_path / "server.crt")
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=355))
            .not_valid_after(now + datetime.timedelta(days=10, minutes=-1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(signer, hashes.SHA256()))
    return (leaf.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _served(port: int, trust: Path) -> x509.Certificate:
    """The leaf the control port serves now, verified against ``trust`` (a new connection)."""
    ctx = _strict_context(trust)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


@pytest.mark.parametrize("ours", [True, False], ids=["self-signed", "operator's"])
async def test_control_certificate_changes_without_a_restart(ours, servers, tmp_path, monkeypatch):
    """A running s2cs serves a new control certificate on new connections, on the control
    port and the web view: ours when its leaf is due (issued again by the same CA), the
    operator's when its files are replaced. A client that pinned the first server.crt keeps
    working through the change."""
    monkeypatch.setattr(tlscert, "CHECK_EVERY", 0.0)
    renew_before = tlscert.RENEW_BEFORE
    if ours:
        srv = await servers(insecure=False, listener_ip="127.0.0.1", web_port=0)
        cert = Path(srv.config.state_dir) / "server.crt"
    else:
        cert, key = tmp_path / "mine.crt", tmp_path / "mine.key"
        tlscert.make_self_signed(cert, key, ["127.0.0.1"])
        srv = await servers(insecure=False, listener_ip="127.0.0.1", server_cert=str(cert), server_key=str(key),
                            web_port=0)
    pinned = tmp_path / "pinned.crt"
    pinned.write_bytes(cert.read_bytes())
    first = await asyncio.to_thread(_served, srv.port, pinned)
    assert (await asyncio.to_thread(_served, srv.web_port, pinned)).serial_number == first.serial_number
    if ours:        # due: less than RENEW_BEFORE left, as a year later
        monkeypatch.setattr(tlscert, "RENEW_BEFORE", tlscert.LEAF_LIFETIME)
    else:           # the operator puts a new leaf from the same CA in place
        tlscert.make_self_signed(cert, tmp_path / "mine.key", ["127.0.0.1"])

    async def new_leaf(port):
        leaf = await asyncio.to_thread(_served, port, pinned)
        return leaf if leaf.serial_number != first.serial_number else None
    second = await async_wait_until(lambda: new_leaf(srv.port), 10, "the new control certificate")
    assert second.issuer == first.issuer
    monkeypatch.setattr(tlscert, "RENEW_BEFORE", renew_before)   # the new leaf is not due: it stays

    async def web_follows():   # the web view serves what the control port serves
        now = await asyncio.to_thread(_served, srv.port, pinned)
        web = await asyncio.to_thread(_served, srv.web_port, pinned)
        return web.serial_number == now.serial_number != first.serial_number
    await async_wait_until(web_follows, 10, "the web view's new certificate")
    async with AsyncClient(f"127.0.0.1:{srv.port}", server_cert=str(pinned)) as client:
        assert (await client.status()) is not None
