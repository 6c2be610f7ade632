"""The testbed itself: the facilities cannot reach each other, only documentation addresses
are used, and teardown leaves no namespace, veth or process, also after a failed build
or a crashed run."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess

import pytest

from nshelpers import needs_testbed, probe, probes, testbed  # noqa: F401  (testbed is a fixture)
from scistream.netns import Testbed, TestbedError, cleanup_leftovers, testbed as tbmod, unavailable_reason
from scistream.netns.testbed import NETNS_DIR, PREFIX, namespace_pids

RANGES = [ipaddress.ip_network(r) for r in tbmod.RANGES]


def _exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = unavailable_reason()
    assert reason and "root" in reason
    with pytest.raises(TestbedError, match="root"):
        Testbed().create()


@pytest.mark.root
@needs_testbed
def test_addresses_routes_and_forwarding(testbed):
    tb = testbed
    for h in tb.hosts.values():
        assert tb.run(h, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0", h.label
        routes = tb.run(h, "ip", "-j", "route").stdout
        assert all(r["dst"] != "default" for r in json.loads(routes)), f"{h.label} has a default route"
        assert tb.run(h, "ip", "-6", "-j", "addr").stdout.strip() in ("", "[]")  # IPv6 off
        for link in json.loads(tb.run(h, "ip", "-4", "-j", "addr").stdout):
            for a in link.get("addr_info", []):
                addr = ipaddress.ip_address(a["local"])
                if link["ifname"] == "lo":
                    assert addr.is_loopback
                else:
                    assert any(addr in r for r in RANGES), f"{h.label} {link['ifname']} has {addr}"


@pytest.mark.root
@needs_testbed
async def test_no_path_between_facilities(testbed):
    tb = testbed
    unreachable = [  # (from, to): no route at all
        (tb.consumer, tb.producer.ip), (tb.producer, tb.consumer.ip), (tb.gw_b, tb.producer.ip),
        (tb.gw_a, tb.consumer.ip), (tb.consumer, tb.gw_a.wan_ip), (tb.producer, tb.gw_b.wan_ip),
        (tb.user, tb.producer.ip), (tb.user, tb.consumer.ip), (tb.user, tb.gw_a.wan_ip),
        (tb.user, tb.gw_b.lan_ip),
    ]
    reachable = [  # a refused connection proves the host answered
        (tb.gw_a, tb.producer.ip), (tb.gw_b, tb.consumer.ip), (tb.gw_b, tb.gw_a.wan_ip),
        (tb.user, tb.gw_a.control_ip), (tb.user, tb.gw_b.control_ip),
        (tb.producer, tb.gw_a.control_ip), (tb.consumer, tb.gw_b.control_ip),
    ]
    by_source: dict = {}
    for src, dst in unreachable:
        by_source.setdefault(src.name, (src, {}))[1][f"{dst}:9"] = "ENETUNREACH"
    for src, dst in reachable:
        by_source.setdefault(src.name, (src, {}))[1][f"{dst}:9"] = "ECONNREFUSED"
    answers = await asyncio.gather(*(probes(tb, src, list(want)) for src, want in by_source.values()))
    for (src, want), got in zip(by_source.values(), answers):
        for listener, expected in want.items():
            assert got[listener]["error"] == expected, (src.label, listener, got[listener])


@pytest.mark.root
@needs_testbed
async def test_forwarding_is_the_only_barrier_left_once_routes_exist(testbed):
    """Give every host a full route set: with ip_forward=0 the gateways still drop the
    packets; turning forwarding on (the control) lets the consumer through."""
    tb = testbed
    tb.run(tb.consumer, "ip", "route", "add", "default", "via", tb.gw_b.lan_ip)
    tb.run(tb.producer, "ip", "route", "add", "default", "via", tb.gw_a.lan_ip)
    tb.run(tb.gw_b, "ip", "route", "add", "192.0.2.0/24", "via", tb.gw_a.wan_ip)
    tb.run(tb.gw_a, "ip", "route", "add", "203.0.113.0/24", "via", tb.gw_b.wan_ip)
    blocked = await probe(tb, tb.consumer, f"{tb.producer.ip}:9", timeout=1)
    assert not blocked["ok"] and blocked["error"] != "ECONNREFUSED", blocked
    for gw in (tb.gw_a, tb.gw_b):
        tb.run(gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    through = await probe(tb, tb.consumer, f"{tb.producer.ip}:9", timeout=3)
    assert through["error"] == "ECONNREFUSED", through  # the producer host itself answered


@pytest.mark.root
@needs_testbed
def test_destroy_stops_processes_and_removes_namespaces():
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n")
    tb = Testbed().create()
    assert not any(h.ns in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
                   for h in tb.hosts.values())  # the veths live in the namespaces only
    try:
        # One child of ours, and one that detached (like a data server in its own session).
        child = subprocess.Popen(tb.argv(tb.consumer, "sleep", "600"), start_new_session=True)
        subprocess.run(tb.argv(tb.gw_a, "sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 &"), check=True)
        pids = namespace_pids(tb.gw_a.ns) + namespace_pids(tb.consumer.ns)
        assert child.pid in pids and len(pids) == 2
    finally:
        tb.destroy()
    assert child.wait(10) is not None
    assert not any(_exists(ns) for ns in tb.namespaces)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    tb.destroy()  # idempotent
    # No veth ever appeared in (or was left in) the root namespace.
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n") <= root_links


@pytest.mark.root
@needs_testbed
def test_failed_build_leaves_nothing(monkeypatch):
    monkeypatch.setattr(tbmod, "_ROUTES", tbmod._ROUTES + (("consumer", "192.0.2.0/24", "198.51.100.200"),))
    tb = Testbed()
    with pytest.raises(TestbedError, match="route"):
        tb.create()
    assert not any(_exists(ns) for ns in tb.namespaces)


@pytest.mark.root
@needs_testbed
def test_leftovers_of_dead_runs_are_removed_live_ones_kept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-0dead0-user"
    live = f"{PREFIX}{os.getpid()}-1ive00-user"  # as a parallel run still alive would name it
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = cleanup_leftovers()
        assert stale in removed and not _exists(stale)
        assert live not in removed and _exists(live)
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
