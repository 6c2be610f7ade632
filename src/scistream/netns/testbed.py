"""Two facilities in network namespaces: the situation SciStream exists for.

Owns the namespaces, veth links, addresses and routes of one testbed, and every process
left inside them at teardown. Five hosts, each a namespace named
``scistream-tb-<pid>-<rand>-<host>`` (the creating process's pid, so a later run can
tell a crashed run's leftovers from a live parallel run's):

    producer 192.0.2.10 --- A's LAN 192.0.2.0/24 --- 192.0.2.1 GW-A 198.51.100.1
                                                                  |  WAN 198.51.100.0/30
    consumer 203.0.113.10 - B's LAN 203.0.113.0/24 - 203.0.113.1 GW-B 198.51.100.2

    user 198.51.100.66 --- 198.51.100.64/30 --- GW-A 198.51.100.65   (control port)
         198.51.100.70 --- 198.51.100.68/30 --- GW-B 198.51.100.69   (control port)

No namespace forwards (net.ipv4.ip_forward=0 everywhere), no host has a default route,
IPv6 is off: the producer and the consumer have no path to each other, the user reaches
only the gateways' control addresses, and the only way across is a SciStream session
(each gateway's S2DS terminates one leg and opens the next). The producer and the
consumer each have one host route, to their own gateway's control address, for their
application controller's hello. Addresses come only from the documentation ranges
(RFC 5737); the root namespace is never touched.

    with Testbed() as tb:                      # needs root; unavailable_reason() says why not
        tb.run(tb.consumer, "ip", "route")     # argv run inside the consumer's namespace
        argv = tb.argv(tb.gw_a, "s2cs", "--listener-ip", tb.gw_a.wan_ip, ...)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable

from ..data.supervise import pid_alive

log = logging.getLogger(__name__)

PREFIX = "scistream-tb-"
NETNS_DIR = Path("/run/netns")
RANGES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")  # RFC 5737, nothing else
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-([0-9a-f]+)-[a-z-]+$")


class TestbedError(RuntimeError):
    """The testbed cannot be built here (not root, no `ip netns`) or a step failed."""

    __test__ = False  # not a pytest test class


@dataclasses.dataclass(frozen=True)
class Host:
    """One namespace: ``name`` is the role (producer, gw-a, ...), ``label`` is for people."""
    name: str
    label: str
    ns: str
    addrs: tuple[tuple[str, str], ...]  # (interface, address/prefix)

    def addr(self, ifname: str) -> str:
        return dict(self.addrs)[ifname].split("/")[0]

    @property
    def ip(self) -> str:
        """The host's main address: on its LAN (hosts) or its WAN (gateways)."""
        d = dict(self.addrs)
        return (d.get("wan0") or d.get("eth0") or self.addrs[0][1]).split("/")[0]

    @property
    def lan_ip(self) -> str:
        return self.addr("lan0")

    @property
    def wan_ip(self) -> str:
        return self.addr("wan0")

    @property
    def control_ip(self) -> str:
        """A gateway's address on the user's link: where its S2CS takes control calls."""
        return self.addr("usr0")


# (host, label, [(ifname, addr)]); links: (host, if, host, if); routes: (host, dest, via)
_HOSTS = (
    ("producer", "producer", (("eth0", "192.0.2.10/24"),)),
    ("gw-a", "GW-A", (("lan0", "192.0.2.1/24"), ("wan0", "198.51.100.1/30"), ("usr0", "198.51.100.65/30"))),
    ("gw-b", "GW-B", (("wan0", "198.51.100.2/30"), ("lan0", "203.0.113.1/24"), ("usr0", "198.51.100.69/30"))),
    ("consumer", "consumer", (("eth0", "203.0.113.10/24"),)),
    ("user", "user", (("gwa0", "198.51.100.66/30"), ("gwb0", "198.51.100.70/30"))),
)
_LINKS = (
    ("producer", "eth0", "gw-a", "lan0"),   # A's LAN
    ("gw-a", "wan0", "gw-b", "wan0"),       # the WAN
    ("consumer", "eth0", "gw-b", "lan0"),   # B's LAN
    ("user", "gwa0", "gw-a", "usr0"),       # the user's path to GW-A's control port
    ("user", "gwb0", "gw-b", "usr0"),       # ... and to GW-B's
)
_ROUTES = (
    ("producer", "198.51.100.65/32", "192.0.2.1"),    # the producer's controller -> GW-A's S2CS
    ("consumer", "198.51.100.69/32", "203.0.113.1"),  # the consumer's controller -> GW-B's S2CS
)


def unavailable_reason() -> str | None:
    """Why a testbed cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. in CI)"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is not installed"
    try:
        p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` failed: {exc}"
    if p.returncode != 0:
        return f"`ip netns list` failed: {p.stderr.strip() or p.returncode}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)}: {p.stderr.strip() or f'exit {p.returncode}'}")
    return p


def namespace_pids(ns: str) -> list[int]:
    """Processes inside namespace ``ns`` (never this process)."""
    p = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def _kill_all(namespaces: Iterable[str], grace: float = 3.0) -> None:
    """SIGTERM every process in the namespaces, then SIGKILL what is left; bounded."""
    namespaces = list(namespaces)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [pid for ns in namespaces for pid in namespace_pids(ns)]
        if not pids:
            return
        for pid in pids:
            log.info("testbed: stopping process %d left in a namespace (%s)", pid, sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        delay = 0.01
        while any(namespace_pids(ns) for ns in namespaces) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    left = [pid for ns in namespaces for pid in namespace_pids(ns)]
    if left:
        raise TestbedError(f"processes {left} survived SIGKILL in {namespaces}")


def _delete(namespaces: Iterable[str]) -> None:
    namespaces = list(namespaces)
    _kill_all(namespaces)
    errors = []
    for ns in namespaces:
        p = _ip("netns", "del", ns, check=False)
        if p.returncode != 0 and (NETNS_DIR / ns).exists():
            errors.append(f"{ns}: {p.stderr.strip()}")
    if errors:
        raise TestbedError("could not delete namespaces: " + "; ".join(errors))


def our_namespaces() -> list[str]:
    """Every namespace with this module's prefix, from any run."""
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.startswith(PREFIX)]


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces (and their processes) of testbeds whose creator is dead."""
    stale = []
    for ns in our_namespaces():
        m = _NAME_RE.match(ns)
        if m and not pid_alive(int(m.group(1))):
            stale.append(ns)
    if stale:
        log.warning("testbed: removing %d namespaces left by crashed runs: %s", len(stale), ", ".join(stale))
        _delete(stale)
    return stale


class Testbed:
    """The two facilities; ``create()`` builds them, ``destroy()`` removes every trace.

    ``Testbed.attach(tag)`` describes an existing testbed (built by another process)
    without owning it: its ``destroy()`` does nothing."""

    __test__ = False  # not a pytest test class

    def __init__(self, tag: str | None = None, *, owner: bool = True) -> None:
        self.tag = tag or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.owner = owner
        self.hosts: dict[str, Host] = {
            name: Host(name, label, f"{PREFIX}{self.tag}-{name}", addrs) for name, label, addrs in _HOSTS}
        self._created: list[str] = []

    @classmethod
    def attach(cls, tag: str) -> "Testbed":
        tb = cls(tag, owner=False)
        missing = [h.ns for h in tb.hosts.values() if not (NETNS_DIR / h.ns).exists()]
        if missing:
            raise TestbedError(f"no testbed {tag!r}: namespaces {', '.join(missing)} do not exist")
        return tb

    producer = property(lambda self: self.hosts["producer"])
    gw_a = property(lambda self: self.hosts["gw-a"])
    gw_b = property(lambda self: self.hosts["gw-b"])
    consumer = property(lambda self: self.hosts["consumer"])
    user = property(lambda self: self.hosts["user"])

    @property
    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts.values()]

    # -- building and tearing down --------------------------------------------------------
    def create(self) -> "Testbed":
        reason = unavailable_reason()
        if reason:
            raise TestbedError(reason)
        cleanup_leftovers()
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        log.info("testbed %s up: %s", self.tag, ", ".join(self.namespaces))
        return self

    def _build(self) -> None:
        for h in self.hosts.values():
            _ip("netns", "add", h.ns)
            self._created.append(h.ns)
            # Before any link exists: no forwarding, no IPv6 (nothing but our IPv4 leaves a veth).
            self.run(h, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        for a, a_if, b, b_if in _LINKS:
            ha, hb = self.hosts[a], self.hosts[b]
            _ip("link", "add", a_if, "netns", ha.ns, "type", "veth", "peer", "name", b_if, "netns", hb.ns)
        for h in self.hosts.values():
            for ifname, addr in h.addrs:
                _ip("-n", h.ns, "addr", "add", addr, "dev", ifname)
                _ip("-n", h.ns, "link", "set", ifname, "up")
        for host, dest, via in _ROUTES:
            _ip("-n", self.hosts[host].ns, "route", "add", dest, "via", via)
        for h in self.hosts.values():
            fwd = self.run(h, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
            if fwd != "0":
                raise TestbedError(f"{h.ns}: ip_forward is {fwd}, expected 0")

    def destroy(self) -> None:
        """Stop every process left in the namespaces, then delete them (and their veths)."""
        if not self.owner:
            return
        created, self._created = self._created, []
        if created:
            _delete(reversed(created))
            log.info("testbed %s removed", self.tag)

    def __enter__(self) -> "Testbed":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()

    # -- running things inside -----------------------------------------------------------
    def argv(self, host: Host, *argv: str) -> list[str]:
        """``argv`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def run(self, host: Host, *argv: str, check: bool = True, timeout: float = 30,
            env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(host, *argv), capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise TestbedError(f"{host.label}: {' '.join(argv)} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()[-1000:]}")
        return p

    def listening_ports(self, host: Host) -> set[int]:
        """The TCP ports something listens on inside ``host`` (``ss -ltn``)."""
        out = self.run(host, "ss", "-ltnH").stdout
        ports = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                ports.add(int(fields[3].rpartition(":")[2]))
        return ports

    def inside(self, host: Host) -> bool:
        """True if this process runs in ``host``'s namespace."""
        try:
            mine, theirs = os.stat("/proc/self/ns/net"), os.stat(NETNS_DIR / host.ns)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

    def describe(self) -> str:
        lines = [f"testbed {self.tag}: facility A = producer + GW-A, facility B = consumer + GW-B"]
        for h in self.hosts.values():
            lines.append(f"  {h.label:<8} {h.ns:<40} " + " ".join(f"{i}={a}" for i, a in h.addrs))
        return "\n".join(lines)


