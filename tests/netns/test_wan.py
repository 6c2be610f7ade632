"""The emulated WAN between the gateways (``Testbed(wan=WanSpec(...))``): its settings are read
and checked, and the path it builds is the one asked for: the round trip, the loss (and its
runs), the jitter, a TCP stream reaching the set rate, segments cut right when a joined
(GSO) packet loses one; the router forwards only between the gateways, and everything is
gone afterwards. Every test is bounded in time and removes its namespaces."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_until
from nshelpers import built, needs_testbed
from scistream.netns import Testbed, TestbedError, WanSpec, WanSpecError, testbed as tbmod
from scistream.netns.testbed import NETNS_DIR
from scistream.netns.wan import element_binary

PY = sys.executable


# -- the settings ---------------------------------------------------------------------------
def test_spec_reads_units():
    s = WanSpec(rtt_ms="50ms", rate="1gbit", loss="0.01%", mtu="9000", jitter_ms="0.5ms", queue="4MiB")
    assert (s.rtt_ms, s.rate, s.loss, s.mtu, s.jitter_ms, s.queue) == (50.0, 10**9, 1e-4, 9000, 0.5, 4 << 20)
    assert s.one_way_ms == 25 and s.bdp_bytes == 6_250_000 and s.queue_bytes == 4 << 20
    assert WanSpec(rtt_ms="0.1s", rate="200Mbit/s", loss=1e-4).rate == 200_000_000
    assert WanSpec(rtt_ms=100, rate="200m").rtt_ms == 100
    assert WanSpec(rate="1gbit", rtt_ms=50).queue_bytes == 6_250_000          # one BDP by default
    assert WanSpec(rate="1gbit", rtt_ms=50, queue="20ms").queue_bytes == 2_500_000  # 20 ms at the rate
    assert WanSpec(rate=None).queue_bytes is None and WanSpec(rate="none").rate is None
    assert "RTT 50 ms" in s.describe() and "MTU 9000" in s.describe()


@pytest.mark.parametrize("kwargs, words", [
    ({"rtt_ms": "fifty"}, "not a duration"),
    ({"rtt_ms": "20s"}, "out of range"),
    ({"rate": "fast"}, "not a rate"),
    ({"rate": "1bit"}, "out of range"),
    ({"loss": "100%"}, "below 100%"),
    ({"loss": "-1"}, "at least 0"),
    ({"loss": "often"}, "not a probability"),
    ({"mtu": 100}, "mtu 100 is out of range"),
    ({"mtu": "big"}, "must be numbers"),
    ({"rtt_ms": 10, "jitter_ms": 6}, "larger than the one-way delay"),
    ({"queue": "lots"}, "not a size"),
    ({"rate": None, "queue": "20ms"}, "needs a rate"),
    ({"loss_run": 0.5}, "at least 1"),
])
def test_spec_refuses_what_makes_no_sense(kwargs, words):
    with pytest.raises(WanSpecError, match=words):
        WanSpec(**kwargs)


def test_facility_testbed_says_it_has_no_emulated_wan():
    with pytest.raises(TestbedError, match="no emulated WAN"):
        tbmod.FacilityTestbed(wan=WanSpec())


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_element_builds_once_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SCISTREAM_CACHE_DIR", str(tmp_path))
    first = element_binary()
    assert first.parent == tmp_path and os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns
    assert element_binary() == first and first.stat().st_mtime_ns == mtime  # kept, not rebuilt
    p = subprocess.run([str(first)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 64 and "usage" in p.stderr


# -- the path -------------------------------------------------------------------------------
def ping(tb: Testbed, count: int, interval: float, wait: float = 2.0) -> dict:
    p = tb.run(tb.gw_a, PY, "-m", "scistream.netns.peer", "ping", tb.gw_b.wan_ip, "--count", str(count),
               "--interval", str(interval), "--wait", str(wait), timeout=count * interval + wait + 30)
    return json.loads(p.stdout)


def binomial_bounds(n: int, p: float, sds: float = 4.5) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sds * sd, n * p + sds * sd


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
def test_router_forwards_only_between_the_gateways():
    spec = WanSpec(rtt_ms=2, rate="100mbit")
    with built(Testbed(wan=spec)) as tb:
        fwd = {h.name: tb.run(h, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() for h in tb.hosts.values()}
        assert fwd == {**{n: "0" for n in fwd}, "router": "1"}
        for h in tb.hosts.values():
            for link in json.loads(tb.run(h, "ip", "-4", "-j", "addr").stdout):
                for a in link.get("addr_info", []):
                    assert a["local"].startswith(("127.", "192.0.2.", "198.51.100.", "203.0.113.")), (h.label, a)
        assert ping(tb, 3, 0.01)["received"] == 3   # GW-A <-> GW-B through the router
        out = tb.run(tb.gw_a, PY, "-m", "scistream.netns.peer", "connect", f"{tb.consumer.ip}:9",
                     f"{tb.gw_b.lan_ip}:9", f"{tb.producer.ip}:9", "--timeout", "1", check=False).stdout
        got = {r["listener"].split(":")[0]: r["error"] for r in map(json.loads, out.splitlines())}
        # No route to B's LAN on GW-A; its own LAN answers (refused: nothing listens on port 9).
        assert got == {tb.consumer.ip: "ENETUNREACH", tb.gw_b.lan_ip: "ENETUNREACH", tb.producer.ip: "ECONNREFUSED"}
        # Even given a route, the router does not carry GW-A's packets to B's LAN.
        tb.run(tb.gw_a, "ip", "route", "add", "203.0.113.0/24", "via", tb.router.addr("a0"))
        tb.run(tb.consumer, "ip", "route", "add", "default", "via", tb.gw_b.lan_ip)
        r = json.loads(tb.run(tb.gw_a, PY, "-m", "scistream.netns.peer", "connect", f"{tb.consumer.ip}:9",
                              "--timeout", "1", check=False).stdout)
        assert not r["ok"] and r["error"] != "ECONNREFUSED", r
        assert "tbf" in tb.run(tb.router, "tc", "qdisc", "show", "dev", "tun-a").stdout
        mtus = {json.loads(tb.run(h, "ip", "-j", "link", "show", dev).stdout)[0]["mtu"]
                for h, dev in ((tb.gw_a, "wan0"), (tb.router, "tun-a"), (tb.router, "b0"), (tb.gw_b, "wan0"))}
        assert mtus == {1500}
        pid = tb.element_pid
        assert pid is not None and "wanem-" in open(f"/proc/{pid}/cmdline").read()
    assert tb.element_pid is None and not os.path.exists(f"/proc/{pid}")  # stopped (and reaped) with the testbed
    assert tb.wan_final_stats and tb.wan_final_stats["ab"]["sent"] >= 3
    assert not any((NETNS_DIR / ns).exists() for ns in tb.namespaces)


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(60)
def test_an_error_inside_stops_the_element_and_removes_the_namespaces():
    tb = Testbed(wan=WanSpec(rtt_ms=2))
    with pytest.raises(RuntimeError, match="boom"):
        with tb:
            pid = tb.element_pid
            raise RuntimeError("boom")
    assert tb.element_pid is None and not os.path.exists(f"/proc/{pid}")
    assert not any((NETNS_DIR / ns).exists() for ns in tb.namespaces)


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(60)
def test_element_of_a_killed_run_is_removed_with_its_namespaces(tmp_path):
    """The process that built the testbed is killed -9: the next testbed removes its
    namespaces, and the element in them, as leftovers of a dead run."""
    out = tmp_path / "tag"
    code = ("import sys, time; from scistream.netns import Testbed, WanSpec\n"
            "tb = Testbed(wan=WanSpec(rtt_ms=2)).create()\n"
            f"open({str(out)!r}, 'w').write(tb.tag + ' ' + str(tb.element_pid))\n"
            "time.sleep(600)\n")
    owner = subprocess.Popen([PY, "-c", code], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: out.exists() and out.read_text(), 30, "the testbed of the other process")
    finally:
        owner.kill()
        owner.wait()
    tag, pid = out.read_text().split()
    assert os.path.exists(f"/proc/{pid}")  # its element outlived it, in the router's namespace
    removed = tbmod.cleanup_leftovers()
    assert f"scistream-tb-{tag}-router" in removed
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10, "the element to go")
    assert not list(Path(tempfile.gettempdir()).glob(f"scistream-wan-{tag}-*"))  # its stats and log too


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(60)
def test_bottleneck_queue_holds_its_set_size():
    """A burst of 100 datagrams of 1500 bytes into a 10 Mbit/s bottleneck with a queue of
    30000 bytes: the queue takes 20 of them, the token bucket's burst 2 more, the rest is
    dropped at its tail (a packet leaves every 1.2 ms meanwhile: a few more get in)."""
    spec = WanSpec(rtt_ms=2, rate="10mbit", queue=30000)
    assert spec.tbf_args()[-2:] == ["limit", "30000"]
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20); "
            "[s.sendto(bytes(1472), (%r, 9)) for _ in range(100)]")
    with built(Testbed(wan=spec)) as tb:
        tb.run(tb.gw_a, PY, "-c", send % tb.gw_b.wan_ip)
        wait_until(lambda: "backlog 0b" in tb.run(tb.router, "tc", "-s", "qdisc", "show", "dev", "tun-a").stdout,
                   10, "the queue to drain")
        got = tb.wan_stats()["ab"]["read"]
    assert 20 <= got <= 27, got


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rtt", [10, 100])
def test_ping_rtt_within_1ms_of_the_set_value(rtt):
    with built(Testbed(wan=WanSpec(rtt_ms=rtt, rate="1gbit", mtu=9000))) as tb:
        r = ping(tb, 50, 0.02)
    assert r["received"] == 50, r
    rtts = r["rtt_ms"]
    assert rtt <= min(rtts) < rtt + 1, rtts
    assert abs(statistics.median(rtts) - rtt) < 1, rtts


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
def test_jitter_spreads_the_delay_and_keeps_the_order():
    with built(Testbed(wan=WanSpec(rtt_ms=20, jitter_ms=2, rate=None))) as tb:
        r = ping(tb, 300, 0.002)
    rtts = r["rtt_ms"]
    assert r["received"] == 300
    # each way 10 ms +- 2 ms, never ahead of the packet before it: within [16, 24] ms, plus the
    # element's and the hosts' own work (a few late wake-ups on a busy machine)
    assert 16 <= min(rtts) and statistics.quantiles(rtts, n=20)[-1] < 24.5, (min(rtts), sorted(rtts)[-20:])
    assert statistics.pstdev(rtts) > 0.5, statistics.pstdev(rtts)
    assert abs(statistics.mean(rtts) - 20) < 1.5


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
def test_loss_within_its_binomial_bounds():
    p, n = 0.01, 3000
    with built(Testbed(wan=WanSpec(rtt_ms=2, loss="1%", rate=None, seed=7))) as tb:
        r = ping(tb, n, 0.001)
        stats = tb.wan_stats()
    lost = n - r["received"]
    lo, hi = binomial_bounds(n, 1 - (1 - p) ** 2)      # a ping is lost if either way loses it
    assert lo <= lost <= hi, (lost, lo, hi)
    ab, ba = stats["ab"], stats["ba"]
    assert ab["read"] == n and ba["read"] == n - ab["lost"]   # what the element saw is what was sent
    for d in (ab, ba):
        lo, hi = binomial_bounds(d["read"], p)
        assert lo <= d["lost"] <= hi, d
        assert d["sent"] == d["read"] - d["lost"] and d["overflow"] == d["write_errors"] == 0
    assert lost == ab["lost"] + ba["lost"]


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
def test_loss_in_runs():
    """loss_run=6: about 2% of the packets lost, in runs of 6 on average (Gilbert model);
    the independent model at the same rate loses them one by one."""
    n = 3000
    runs = {}
    for run in (1, 6):
        with built(Testbed(wan=WanSpec(rtt_ms=2, loss="2%", loss_run=run, rate=None, seed=3))) as tb:
            r = ping(tb, n, 0.001)
        lost = r["lost"]
        lengths, i = [], 0
        while i < len(lost):  # runs of consecutive sequence numbers
            j = i
            while j + 1 < len(lost) and lost[j + 1] == lost[j] + 1:
                j += 1
            lengths.append(j - i + 1)
            i = j + 1
        runs[run] = (len(lost) / n, statistics.mean(lengths) if lengths else 0)
    (rate1, mean1), (rate6, mean6) = runs[1], runs[6]
    assert 0.025 < rate1 < 0.055 and mean1 < 1.3, runs   # ~4% of pings (2% each way), alone
    assert 0.015 < rate6 < 0.08 and 3.5 < mean6 < 10, runs


def iperf3(tb: Testbed, seconds: int, omit: int) -> dict:
    """One iperf3 stream GW-A -> GW-B (BBR); the server's JSON result."""
    port = "5201"  # a fresh namespace: nothing else listens there
    server = subprocess.Popen(tb.argv(tb.gw_b, "iperf3", "-s", "-1", "-B", tb.gw_b.wan_ip, "-p", port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: int(port) in tb.listening_ports(tb.gw_b), 10, "iperf3 -s")
        p = tb.run(tb.gw_a, "iperf3", "-c", tb.gw_b.wan_ip, "-p", port, "-t", str(seconds), "-O", str(omit),
                   "-C", "bbr", "-J", timeout=seconds + omit + 30, check=False)
        server.wait(15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    data = json.loads(p.stdout)
    assert "error" not in data, data["error"]
    return data


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(180)
@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 not installed")
def test_tcp_between_the_gateways_reaches_the_set_rate():
    """200 Mbit/s, 50 ms, buffers that fit the path, BBR: at least 0.9x the rate (receiver's
    count, after the first 2 s of start-up)."""
    spec = WanSpec(rtt_ms=50, rate="200mbit", mtu=1500)
    with built(Testbed(wan=spec)) as tb:
        tb.tune_tcp(tb.gw_a, tb.gw_b, buffer_max=8 * spec.bdp_bytes)
        before, t0 = tb.wan_stats()["ab"], time.monotonic()
        data = iperf3(tb, seconds=5, omit=2)
        after, t1 = tb.wan_stats()["ab"], time.monotonic()
    got = data["end"]["sum_received"]["bits_per_second"]
    assert got >= 0.9 * spec.rate, f"{got / 1e6:.1f} Mbit/s of {spec.rate / 1e6:.0f}"
    # the bottleneck holds: what the path carried over the whole run (IP bytes) is within the rate
    path = (after["sent_bytes"] - before["sent_bytes"]) * 8 / (t1 - t0)
    assert 0.5 * spec.rate < path <= 1.01 * spec.rate, path
    assert after["overflow"] == 0


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(120)
def test_segments_cut_from_joined_packets_arrive_intact(tmp_path):
    """With 1% loss most joined (GSO) TCP packets lose a segment and are cut in the element:
    every byte of a 4 MiB echo comes back, and no host counts a bad checksum."""
    spec = WanSpec(rtt_ms=4, rate=None, loss="1%", seed=11)
    with built(Testbed(wan=spec)) as tb:
        ready, report, out = tmp_path / "ready.json", tmp_path / "server.json", tmp_path / "client.json"
        server = subprocess.Popen(tb.argv(tb.gw_b, PY, "-m", "scistream.netns.peer", "echo-server", "--bind",
                                          tb.gw_b.wan_ip, "--ready", str(ready), "--report", str(report)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(ready.exists, 15, "echo server")
            listener = json.loads(ready.read_text())["endpoints"][0]
            tb.run(tb.gw_a, PY, "-m", "scistream.netns.peer", "echo-client", "--size", str(4 << 20),
                   "--report", str(out), "--timeout", "60", listener, timeout=90)
            server.wait(15)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        stats = tb.wan_stats()
        snmp = {h.label: tb.run(h, "cat", "/proc/net/snmp").stdout for h in (tb.gw_a, tb.gw_b)}
    result = json.loads(out.read_text())[0]
    assert result["echo_ok"] and result["received"] == 4 << 20
    assert stats["ab"]["lost"] > 0 and stats["ba"]["lost"] > 0
    assert stats["ab"]["cut"] > 0 and stats["ba"]["cut"] > 0   # the echo's both ways were cut
    for label, text in snmp.items():
        lines = [l.split() for l in text.splitlines()]
        for i in range(0, len(lines) - 1, 2):
            proto = dict(zip(lines[i][1:], map(int, lines[i + 1][1:])))
            if lines[i][0] in ("Ip:", "Tcp:"):
                bad = {k: v for k, v in proto.items() if k in ("InHdrErrors", "InCsumErrors") and v}
                assert not bad, (label, bad)


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(60)
def test_element_that_cannot_start_leaves_nothing(monkeypatch):
    monkeypatch.setattr(tbmod, "element_binary", lambda: Path("/bin/false"))
    tb = Testbed(wan=WanSpec(rtt_ms=2))
    with pytest.raises(TestbedError, match="the WAN element did not start"):
        tb.create()
    assert not any((NETNS_DIR / ns).exists() for ns in tb.namespaces)
    assert tb.element_pid is None


# -- scistream demo --netns --wan-* ----------------------------------------------------------
BIN = Path(PY).parent


@pytest.mark.parametrize("args, words", [
    (["--wan-rtt", "50ms"], "need --netns"),
    (["--netns", "--wan-rate", "1gbit"], "needs its round trip: --wan-rtt"),
    (["--netns", "--wan-rtt", "50ms", "--wan-loss", "200%"], "below 100%"),
    (["--netns", "--wan-rtt", "soon"], "not a duration"),
    (["--netns", "--wan-rtt", "50ms", "--wan-mtu", "100"], "1280<=x<=9000"),
])
def test_demo_wan_options_refused_with_a_reason(args, words, tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--size", "1M", *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stdout + p.stderr
    assert words in " ".join(p.stderr.split()), p.stderr


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(240)
def test_demo_over_the_emulated_wan(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--netns", "--size", "16M", "--num-conn", "2",
                        "--wan-rtt", "20ms", "--wan-rate", "500mbit", "--wan-loss", "0.01%", "--wan-mtu", "9000"],
                       capture_output=True, text=True, timeout=200, cwd=tmp_path, stdin=subprocess.DEVNULL)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "WAN (GW-A <-> router <-> GW-B): RTT 20 ms, rate 500.0 Mbit/s" in out and "MTU 9000" in out
    assert "verified 16777216 bytes" in out
    assert "-> [WAN, TLS] -> GW-A 198.51.100.9:" in out
    for gw in ("GW-A", "GW-B"):   # set up as check-config advises, and said so
        assert f"  {gw}: as `s2cs check-config --max-rtt 20ms --rate 500mbit` advises: " in out, out
    tag = out.split("testbed ", 1)[1].split(":", 1)[0]
    assert f"testbed {tag} removed" in out
    assert f"scistream-tb-{tag}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout
    assert not [l for l in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                if "wanem-" in l and "--stats" in l and tag in l]


@pytest.mark.root
@needs_testbed
@pytest.mark.timeout(240)
@pytest.mark.skipif("bbr" not in Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split(),
                    reason="this kernel has no bbr (the data servers' default)")
def test_demo_on_typical_gateways_the_wan_legs_take_the_data_servers_congestion_control(tmp_path):
    """Typical gateways: CUBIC on every route (congctl), Linux's default buffer caps. The data
    servers give their WAN-leg sockets BBR after connect and accept, over the route's choice;
    the LAN legs keep the route's CUBIC (seen with ss -ti on each gateway during the transfer)."""
    p = subprocess.run([str(BIN / "scistream"), "demo", "--netns", "--size", "64M", "--num-conn", "2",
                        "--wan-rtt", "20ms", "--wan-rate", "500mbit", "--wan-hosts", "typical"],
                       capture_output=True, text=True, timeout=200, cwd=tmp_path, stdin=subprocess.DEVNULL)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "verified 67108864 bytes" in out
    for gw in ("GW-A", "GW-B"):
        assert (f"  {gw}: typical: net.ipv4.tcp_rmem=4096 131072 6291456, net.ipv4.tcp_wmem=4096 16384 4194304; "
                "every route congctl cubic") in out, out
    assert ("congestion control of the legs (ss -ti during the transfer): GW-B LAN cubic, GW-B WAN bbr, "
            "GW-A WAN bbr, GW-A LAN cubic") in out, out
    assert "gateways set up as typical gateways" in out


def test_demo_wan_hosts_needs_a_wan(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--size", "1M", "--netns", "--wan-hosts", "typical"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "give --wan-rtt too" in " ".join(p.stderr.split()), p.stderr
