"""`scistream demo` end to end: verified transfer, everything released and stopped."""
from __future__ import annotations

import subprocess

from conftest import BIN


def test_demo_streams_and_verifies(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--size", "64M", "--num-conn", "2"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified 67108864 bytes" in p.stdout
    assert "WAN leg tls" in p.stdout
    assert "all processes stopped" in p.stdout
