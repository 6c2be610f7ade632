"""Scan TLS listeners with sslyze and check them against Mozilla's "intermediate" profile.

Run by the scanner's own interpreter (sslyze pins a ``cryptography`` older than ours, so
it lives in a virtual environment of its own, ``.venv/sslyze``; see tests/security/scanner.py).
Reads a JSON list of targets on stdin, writes one JSON result per target on stdout:

    [{"name": "control", "ip": "127.0.0.1", "port": 5000, "hostname": "localhost",
      "ca_file": "/path/ca.pem", "client_cert": null, "client_key": null}]

Every target must be a loopback address: this script refuses any other.
"""
from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sslyze import (ClientAuthenticationCredentials, Scanner, ServerNetworkConfiguration,
                    ServerNetworkLocation, ServerScanRequest, ServerScanStatusEnum)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER, MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration, TlsConfigurationEnum,
    check_server_against_tls_configuration)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument
from sslyze.scanner.models import ScanCommandsExtraArguments


def _key_name(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _request(t: dict) -> ServerScanRequest:
    ip = ipaddress.ip_address(t["ip"])
    if not ip.is_loopback:
        raise SystemExit(f"refusing to scan {ip}: loopback addresses only")
    creds = None
    if t.get("client_cert"):
        creds = ClientAuthenticationCredentials(certificate_chain_path=Path(t["client_cert"]),
                                                key_path=Path(t["client_key"]))
    hostname = t.get("hostname") or str(ip)
    return ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=hostname, port=int(t["port"]), ip_address=str(ip)),
        network_configuration=ServerNetworkConfiguration(tls_server_name_indication=hostname,
                                                         tls_client_auth_credentials=creds,
                                                         network_timeout=10, network_max_retries=1),
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(t["ca_file"]))
            if t.get("ca_file") else None),
    )


def _summary(result) -> dict:
    out: dict = {"status": result.scan_status.value}
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        out["error"] = str(result.connectivity_error_trace or result.connectivity_status)
        return out
    attempts = result.scan_result
    failed = {}
    for cmd in SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER:
        a = getattr(attempts, cmd.value)
        if a.status.value != "COMPLETED":
            failed[cmd.value] = f"{a.status.value}: {a.error_reason} {a.error_trace}"
    out["failed_commands"] = failed
    versions, ciphers = [], {}
    for field, name in (("ssl_2_0_cipher_suites", "SSLv2"), ("ssl_3_0_cipher_suites", "SSLv3"),
                        ("tls_1_0_cipher_suites", "TLSv1"), ("tls_1_1_cipher_suites", "TLSv1.1"),
                        ("tls_1_2_cipher_suites", "TLSv1.2"), ("tls_1_3_cipher_suites", "TLSv1.3")):
        r = getattr(attempts, field).result
        if r is not None and r.is_tls_version_supported:
            versions.append(name)
            ciphers[name] = sorted(c.cipher_suite.openssl_name for c in r.accepted_cipher_suites)
    out["versions"], out["ciphers"] = versions, ciphers
    curves = attempts.elliptic_curves.result
    out["curves"] = sorted(c.name for c in (curves.supported_curves or [])) if curves else None
    info = attempts.certificate_info.result
    if info is not None:
        d = info.certificate_deployments[0]
        leaf = d.received_certificate_chain[0]
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        out["leaf"] = {"key": _key_name(leaf.public_key()), "lifespan_days": life.days,
                       "lifespan_seconds": int(life.total_seconds()),
                       "signature": leaf.signature_algorithm_oid._name,
                       "chain_length": len(d.received_certificate_chain),
                       "path_valid": bool(d.verified_certificate_chain),
                       # the verdict of the trust store we supplied (ca_file): the public
                       # stores know nothing of our CAs
                       "path_errors": sorted({str(p.validation_error) for p in d.path_validation_results
                                              if p.trust_store.name == "Supplied CA file"
                                              and not p.was_validation_successful}),
                       "chain_order_ok": d.received_chain_has_valid_order}
    issues: dict = {}
    if not failed:
        try:
            check_server_against_tls_configuration(
                result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE))
        except ServerNotCompliantWithTlsConfiguration as exc:
            issues = exc.issues
    out["issues"] = issues
    return out


def main() -> None:
    targets = json.load(sys.stdin)
    requests = {}
    for t in targets:
        requests[t["name"]] = _request(t)
    scanner = Scanner(per_server_concurrent_connections_limit=2, concurrent_server_scans_limit=2)
    scanner.queue_scans(list(requests.values()))
    out = {}
    for result in scanner.get_results():
        name = next(n for n, r in requests.items() if r.server_location == result.server_location)
        out[name] = _summary(result)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
