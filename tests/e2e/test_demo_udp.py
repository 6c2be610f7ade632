"""`scistream demo --udp`: numbered datagrams through a whole session (Builtin: sealed on
the WAN leg; Nginx: in the clear, its control servers told so), every datagram checked,
loss and reordering reported, everything stopped; a type without UDP is refused."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import BIN


def run_demo(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "scistream"), "demo", "--udp", *args], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind, how", [("Builtin", "sealed"), ("Nginx", "in the clear")])
def test_demo_udp(tmp_path, kind, how):
    size, dgram = 4 << 20, 1000
    p = run_demo(tmp_path, "--size", str(size), "--num-conn", "2", "--type", kind, "--datagram-size", str(dgram))
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"verified (\d+) datagrams of 1000 bytes \((\d+) bytes\) over 2 UDP flows .*: (\d+) lost "
                  r"\([0-9.]+%\), (\d+) out of order, (\d+) duplicated", p.stdout)
    assert m, p.stdout
    got, nbytes, lost = int(m.group(1)), int(m.group(2)), int(m.group(3))
    expected = 2 * (size // 2 // dgram)
    assert got + lost == expected and nbytes == got * dgram
    assert got > expected // 2          # loopback: most arrive (the paced default rate)
    assert f"UDP {how}" in p.stdout and "all processes stopped" in p.stdout


def test_demo_udp_refuses_a_type_without_udp(tmp_path):
    p = run_demo(tmp_path, "--size", "1M", "--type", "Haproxy")
    assert p.returncode != 0
    assert "carries no UDP" in p.stderr
