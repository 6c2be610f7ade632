"""sslyze, run in its own virtual environment: it pins a ``cryptography`` older than ours.

``scripts/setup`` (with the test extras) makes ``.venv/sslyze`` with ``SSLYZE`` in it;
``SCISTREAM_SSLYZE_PYTHON`` names another interpreter that has it. ``scan(targets)`` runs
sslyze_scan.py there on loopback targets and returns its verdict per target.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SSLYZE = "sslyze==6.3.1"
DRIVER = Path(__file__).with_name("sslyze_scan.py")


def scanner_python() -> Path:
    given = os.environ.get("SCISTREAM_SSLYZE_PYTHON")
    path = Path(given) if given else ROOT / ".venv" / "sslyze" / "bin" / "python"
    if not path.exists():
        pytest.fail(f"the TLS scanner is not installed ({path} is missing): run scripts/setup, "
                    f"which installs {SSLYZE} into .venv/sslyze")
    return path


def scan(targets: list[dict], timeout: float = 240) -> dict[str, dict]:
    """Scan ``targets`` (name, ip, port, hostname, ca_file, client_cert, client_key): a
    dict name -> {"issues", "versions", "ciphers", "curves", "leaf", ...}."""
    for t in targets:
        assert ipaddress.ip_address(t["ip"]).is_loopback, t
    out = subprocess.run([str(scanner_python()), str(DRIVER)], input=json.dumps(targets),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for name, r in results.items():
        assert r["status"] == "COMPLETED", (name, r)
        assert not r["failed_commands"], (name, r["failed_commands"])
    return results
