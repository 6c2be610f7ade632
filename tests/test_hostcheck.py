"""``s2cs check-config [--max-rtt] [--rate]``: this host's TCP limits for one stream, read
from the real /proc of this host and of a network namespace with other sysctls set, and
the sysctls it advises, applied, let the stream reach the rate."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from scistream.data.hosttcp import HostTcp
from scistream.netns.testbed import NETNS_DIR, PREFIX, unavailable_reason

REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")
PROC = Path("/proc/sys/net")


def check_config(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    argv = [str(BIN / "s2cs"), "check-config", *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def expected_limit(rtt_s: float, proc: dict[str, str]) -> float:
    """What one stream reaches, from the sysctls as read: 0.6 of the receive cap (before
    kernel 6.6: what tcp_adv_win_scale says), 0.8 of the send cap (measured: hosttcp)."""
    rmem, wmem = int(proc["tcp_rmem"].split()[2]), int(proc["tcp_wmem"].split()[2])
    scale = int(proc["tcp_adv_win_scale"])
    major, minor = (int("".join(c for c in x if c.isdigit()) or 0) for x in os.uname().release.split(".")[:2])
    share = 0.6 if (major, minor) >= (6, 6) else 1 - 2.0 ** -scale if scale > 0 else 2.0 ** scale if scale < 0 else 0.6
    return min(rmem * share, wmem * 0.8) * 8 / rtt_s


def read_proc(ns: str | None = None) -> dict[str, str]:
    names = ("tcp_rmem", "tcp_wmem", "tcp_adv_win_scale", "tcp_congestion_control")
    argv = ["cat", *(str(PROC / "ipv4" / n) for n in names)]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    return dict(zip(names, out))


def test_reads_this_host():
    proc = read_proc()
    p = check_config("--max-rtt", "100ms", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["tcp_rmem"] == [int(x) for x in proc["tcp_rmem"].split()]
    assert got["tcp_wmem"] == [int(x) for x in proc["tcp_wmem"].split()]
    assert got["default"] == proc["tcp_congestion_control"]
    assert got["stream_limit_bps"] == pytest.approx(expected_limit(0.1, proc))
    assert got["rate_bps"] is None and got["ok"] is True and got["advice"] == {}


def test_says_what_to_raise_and_exits_1_when_the_rate_is_out_of_reach():
    host = HostTcp.read()
    rate = host.stream_limit(0.15) * 4          # surely beyond this host's caps at 150 ms
    p = check_config("--max-rtt", "150ms", "--rate", str(int(rate)))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "one stream cannot reach" in p.stdout and "at 150 ms; as root, raise" in p.stdout
    assert "sysctl -w net.ipv4.tcp_" in p.stdout
    # within reach: 0, and no advice
    p = check_config("--max-rtt", "150ms", "--rate", str(int(host.stream_limit(0.15) / 2)))
    assert p.returncode == 0 and "OK: one stream can reach" in p.stdout and "sysctl -w" not in p.stdout


def test_bad_values_are_refused():
    p = check_config("--max-rtt", "fast")
    assert p.returncode == 2 and "not a duration" in p.stderr
    p = check_config("--rate", "quick")
    assert p.returncode == 2 and "not a rate" in p.stderr
    p = check_config("--wan-congestion", "nosuchcc")
    assert p.returncode == 2 and "this kernel has no such congestion control" in p.stderr


@pytest.fixture
def netns():
    """A network namespace of our own (the testbed's prefix: a crashed run's is cleaned up)."""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-hostcheck"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)
        assert not (NETNS_DIR / name).exists()


def sysctl(ns: str, *settings: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings], check=True, timeout=10,
                   capture_output=True)


@needs_netns
def test_reads_the_namespace_and_its_advice_makes_the_rate_reachable(netns):
    # a typical gateway: Linux's default caps, the default congestion control reno
    sysctl(netns, "net.ipv4.tcp_rmem=4096 131072 6291456", "net.ipv4.tcp_wmem=4096 16384 4194304",
           "net.ipv4.tcp_congestion_control=reno")
    proc = read_proc(netns)
    assert proc["tcp_wmem"].split()[2] == "4194304"   # the namespace's own, not this host's
    p = check_config("--max-rtt", "50ms", "--rate", "1gbit", "--json", ns=netns)
    assert p.returncode == 1, p.stderr
    got = json.loads(p.stdout)
    assert got["tcp_wmem"] == [4096, 16384, 4194304] and got["default"] == "reno"
    assert got["stream_limit_bps"] == pytest.approx(expected_limit(0.05, proc))
    assert got["bounded_by"] == "net.ipv4.tcp_wmem"
    # 1 Gbit/s x 50 ms = 6.25 MB in flight, twice that in buffer: 16 MiB caps
    assert got["advice"]["net.ipv4.tcp_wmem"] == "4096 16384 16777216"
    assert got["advice"]["net.ipv4.tcp_rmem"] == "4096 131072 16777216"
    text = check_config("--max-rtt", "50ms", "--rate", "1gbit", ns=netns).stdout
    assert "kernel default reno" in text and "sysctl -w net.ipv4.tcp_wmem='4096 16384 16777216'" in text
    # net.core.*mem_max are the first namespace's; the per-namespace caps are what autotuning uses
    sysctl(netns, *(f"{k}={v}" for k, v in got["advice"].items() if k.startswith("net.ipv4.")))
    p = check_config("--max-rtt", "50ms", "--rate", "1gbit", ns=netns)
    assert p.returncode == 0, p.stdout
    assert "OK: one stream can reach 1.0 Gbit/s at 50 ms" in p.stdout
