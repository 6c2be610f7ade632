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

With ``wan=WanSpec(...)`` (``scistream.netns.wan``) the WAN is no direct link but a path
through a sixth host, the router, that carries a one-way delay each way (optional
jitter), random loss (optional runs), a bottleneck rate with its queue and an MTU; only
the router forwards, and only between the gateways' WAN addresses::

    GW-A wan0 198.51.100.9/30 --- a0 198.51.100.10  router  198.51.100.13 b0 --- 198.51.100.14/30 wan0 GW-B

    with Testbed(wan=WanSpec(rtt_ms=50, rate="1gbit", loss="0.01%")) as tb:
        tb.run(tb.gw_a, sys.executable, "-m", "scistream.netns.peer", "ping", tb.gw_b.wan_ip)  # ~50 ms
        tb.wan_stats()                                       # the element's packet counters

``FacilityTestbed`` is the same with facility A as several hosts: two control
hosts, two data-transfer nodes and a database host on bridged LANs; see its docstring.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..data.supervise import pid_alive
from .wan import WanSpec, element_binary

log = logging.getLogger(__name__)

PREFIX = "scistream-tb-"
NETNS_DIR = Path("/run/netns")
RANGES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")  # RFC 5737, nothing else
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-([0-9a-f]+)-[a-z0-9-]+$")


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

    lan_ip = property(lambda self: self.addr("lan0"))
    wan_ip = property(lambda self: self.addr("wan0"))
    control_ip = property(lambda self: self.addr("usr0"))  # on the user's link: where its S2CS takes calls


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


# With an emulated WAN (Testbed(wan=...)): the gateways' WAN addresses are on two /30s, one each
# side of the router, which alone forwards (between the two gateways' WAN addresses only).
_W_HOSTS = (
    _HOSTS[0],
    ("gw-a", "GW-A", (("lan0", "192.0.2.1/24"), ("wan0", "198.51.100.9/30"), ("usr0", "198.51.100.65/30"))),
    ("router", "router", (("a0", "198.51.100.10/30"), ("b0", "198.51.100.13/30"))),
    ("gw-b", "GW-B", (("wan0", "198.51.100.14/30"), ("lan0", "203.0.113.1/24"), ("usr0", "198.51.100.69/30"))),
    *_HOSTS[3:],
)
_W_LINKS = (
    ("producer", "eth0", "gw-a", "lan0"),   # A's LAN
    ("gw-a", "wan0", "router", "a0"),       # the WAN, A's side
    ("router", "b0", "gw-b", "wan0"),       # the WAN, B's side
    *_LINKS[2:],
)
_W_ROUTES = _ROUTES + (
    ("gw-a", "198.51.100.14/32", "198.51.100.10"),   # GW-A -> GW-B's WAN address, through the router
    ("gw-b", "198.51.100.9/32", "198.51.100.13"),    # and back
)
# side: its veth, its TUN, its rule table, the side its packets go to
_TUN = {"gw-a": ("a0", "tun-a", 100, "gw-b"), "gw-b": ("b0", "tun-b", 101, "gw-a")}


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


def _poll(done: Callable[[], Any], timeout: float) -> Any:
    """``done()`` until it gives something true or ``timeout`` seconds pass; its last value."""
    deadline, delay = time.monotonic() + timeout, 0.005
    while not (value := done()) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return value


def _kill_all(namespaces: Iterable[str], grace: float = 3.0) -> None:
    """SIGTERM every process in the namespaces, then SIGKILL what is left; bounded."""
    namespaces = list(namespaces)
    pids = lambda: [pid for ns in namespaces for pid in namespace_pids(ns)]  # noqa: E731
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids():
            log.info("testbed: stopping process %d left in a namespace (%s)", pid, sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if _poll(lambda: not pids(), wait):
            return
    if left := pids():
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


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces (and their processes: a WAN element too) of testbeds whose
    creator is dead, and their WAN elements' directories."""
    stale, tags = [], set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.partition(" ")[0]
        m = _NAME_RE.match(ns)
        if m and not pid_alive(int(m.group(1))):
            stale.append(ns)
            tags.add(f"{m.group(1)}-{m.group(2)}")
    if stale:
        log.warning("testbed: removing %d namespaces left by crashed runs: %s", len(stale), ", ".join(stale))
        _delete(stale)
    for tag in tags:
        for path in Path(tempfile.gettempdir()).glob(f"scistream-wan-{tag}-*"):
            shutil.rmtree(path, ignore_errors=True)
    return stale


class Testbed:
    """The two facilities; ``create()`` builds them, ``destroy()`` removes every trace.

    ``Testbed.attach(tag)`` describes an existing testbed (built by another process)
    without owning it: its ``destroy()`` does nothing. ``Testbed(wan=WanSpec(...))`` puts
    the emulated WAN of ``scistream.netns.wan`` between the gateways (a router host, its
    element process owned by this object: stopped by ``destroy()``)."""

    __test__ = False  # not a pytest test class
    SUMMARY = "facility A = producer + GW-A, facility B = consumer + GW-B"

    def __init__(self, tag: str | None = None, *, owner: bool = True, wan: WanSpec | None = None) -> None:
        self.tag = tag or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.owner = owner
        self.wan = wan
        self._element: subprocess.Popen | None = None  # the WAN element (wanem) in the router
        self._wan_dir: Path | None = None              # its stats file and log
        self.wan_final_stats: dict | None = None       # its counters when it was stopped
        hosts, self.links, self.routes, switches = self._topology()
        self.hosts: dict[str, Host] = {
            name: Host(name, label, f"{PREFIX}{self.tag}-{name}", addrs) for name, label, addrs in hosts}
        # switches: a namespace holding one bridge (br0) that joins a LAN's hosts; no address
        self.switches: dict[str, str] = {name: f"{PREFIX}{self.tag}-{name}" for name in switches}
        self._created: list[str] = []

    def _topology(self) -> tuple:
        """(hosts, links, routes, switches), read per testbed (so a test may patch the module's tables)."""
        return (_W_HOSTS, _W_LINKS, _W_ROUTES, ()) if self.wan else (_HOSTS, _LINKS, _ROUTES, ())

    @classmethod
    def attach(cls, tag: str, *, wan: WanSpec | None = None) -> "Testbed":
        """The testbed ``tag`` built by another process (with ``wan`` if it was built with one)."""
        tb = cls(tag, owner=False, wan=wan)
        missing = [ns for ns in tb.namespaces if not (NETNS_DIR / ns).exists()]
        if missing:
            raise TestbedError(f"no testbed {tag!r}: namespaces {', '.join(missing)} do not exist")
        if wan is None and (NETNS_DIR / f"{PREFIX}{tag}-router").exists():
            raise TestbedError(f"testbed {tag!r} has an emulated WAN: attach with its WanSpec")
        return tb

    def __getattr__(self, name: str) -> Host:
        """A host by its role: ``tb.gw_a`` is ``tb.hosts["gw-a"]`` (``tb.router``: with a WAN only)."""
        host = self.__dict__.get("hosts", {}).get(name.replace("_", "-"))
        if host is None:
            raise AttributeError(f"{type(self).__name__} has no host or attribute {name!r}")
        return host

    @property
    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts.values()] + list(self.switches.values())

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
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self._created.append(ns)
            # Before any link exists: no forwarding, no IPv6 (nothing but our IPv4 leaves a veth).
            self.run(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", ns, "link", "set", "lo", "up")
        for ns in self.switches.values():
            # A bridge switches frames between a LAN's ports (layer 2, no IP, no STP delay).
            _ip("-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            _ip("-n", ns, "link", "set", "br0", "up")
        for a, a_if, b, b_if in self.links:
            ha = self.hosts[a].ns
            hb = self.switches.get(b) or self.hosts[b].ns
            _ip("link", "add", a_if, "netns", ha, "type", "veth", "peer", "name", b_if, "netns", hb)
            if b in self.switches:
                _ip("-n", hb, "link", "set", b_if, "master", "br0")
                _ip("-n", hb, "link", "set", b_if, "up")
        for h in self.hosts.values():
            for ifname, addr in h.addrs:
                _ip("-n", h.ns, "addr", "add", addr, "dev", ifname)
                _ip("-n", h.ns, "link", "set", ifname, "up")
        for host, dest, via in self.routes:
            _ip("-n", self.hosts[host].ns, "route", "add", dest, "via", via)
        for ns in self.namespaces:
            fwd = self.run(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
            if fwd != "0":
                raise TestbedError(f"{ns}: ip_forward is {fwd}, expected 0")
        if self.wan:
            self._build_wan(self.wan)

    def _build_wan(self, spec: WanSpec) -> None:
        """The router's path: a TUN device per side, the element between them, a tbf on each."""
        r = self.router
        try:
            binary = element_binary()
        except RuntimeError as exc:
            raise TestbedError(str(exc)) from None
        for _, tun, _, _ in _TUN.values():
            _ip("-n", r.ns, "tuntap", "add", "dev", tun, "mode", "tun")
        self._wan_dir = Path(tempfile.mkdtemp(prefix=f"scistream-wan-{self.tag}-"))
        stats, logf = self._wan_dir / "stats.json", self._wan_dir / "element.log"
        with open(logf, "wb") as f:
            self._element = subprocess.Popen(self.argv(r, *spec.element_argv(binary, stats)), stdin=subprocess.DEVNULL,
                                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _poll(lambda: stats.exists() or self._element.poll() is not None, 10)
        if not stats.exists():  # written once both devices are attached
            why = logf.read_text(errors="replace").strip()[-1000:] or f"exit {self._element.returncode}"
            raise TestbedError(f"the WAN element did not start: {why}")
        mtu = str(spec.mtu)
        # What comes in from a gateway's side goes into that side's TUN (to the element), and
        # only if it is for the other gateway's WAN address; what the element writes out of the
        # other TUN is routed by the main table, to the other side's veth.
        for gw, (veth, tun, table, other) in _TUN.items():
            _ip("-n", self.hosts[gw].ns, "link", "set", "wan0", "mtu", mtu)
            _ip("-n", r.ns, "link", "set", veth, "mtu", mtu)
            _ip("-n", r.ns, "link", "set", tun, "mtu", mtu, "txqueuelen", "10000", "up")
            _ip("-n", r.ns, "rule", "add", "iif", veth, "lookup", str(table), "pref", str(table))
            _ip("-n", r.ns, "route", "add", f"{self.hosts[other].wan_ip}/32", "dev", tun, "table", str(table))
            if spec.rate:
                self.run(r, "tc", "qdisc", "add", "dev", tun, "root", *spec.tbf_args())
        # Forwarding, without reverse-path checks (a packet comes back in on the other TUN).
        devs = ["all", "default", *(dev for veth, tun, _, _ in _TUN.values() for dev in (veth, tun))]
        self.run(r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                 *(f"net.ipv4.conf.{d}.rp_filter=0" for d in devs))
        log.info("testbed %s: emulated WAN %s", self.tag, spec.describe())

    @property
    def element_pid(self) -> int | None:
        """The WAN element's process id while it runs (this process built the testbed with a WAN)."""
        return self._element.pid if self._element is not None and self._element.poll() is None else None

    def wan_stats(self, timeout: float = 5.0) -> dict:
        """The WAN element's counters now: per direction ("ab": GW-A to GW-B, "ba") the packets
        read, sent, lost (the loss model), overflowed (its buffer full) and write errors, and
        "cut": the joined (GSO) TCP packets it cut into segments because one of them was lost."""
        if self.element_pid is None:
            raise TestbedError("no WAN element runs in this testbed (built by this process with wan=...)")
        path = self._wan_dir / "stats.json"
        before = json.loads(path.read_text())["seq"]
        self._element.send_signal(signal.SIGUSR1)

        def answer() -> dict | None:
            with contextlib.suppress(ValueError, OSError):
                now = json.loads(path.read_text())
                return now if now["seq"] > before else None
        if now := _poll(answer, timeout):
            return now
        raise TestbedError(f"the WAN element did not answer within {timeout} s")

    def tune_tcp(self, *hosts: Host, buffer_max: int, congestion: str | None = None) -> None:
        """Let TCP in ``hosts`` autotune its buffers up to ``buffer_max`` bytes (``tcp_rmem`` and
        ``tcp_wmem``, per namespace) and, if given, use ``congestion`` by default."""
        for h in hosts:
            sets = [f"net.ipv4.tcp_rmem=4096 131072 {buffer_max}", f"net.ipv4.tcp_wmem=4096 16384 {buffer_max}"]
            if congestion:
                sets.append(f"net.ipv4.tcp_congestion_control={congestion}")
            self.run(h, "sysctl", "-q", "-w", *sets)

    #: A gateway as Linux sets it up, nothing tuned: its default buffer caps (tcp_rmem max
    #: 6 MiB, tcp_wmem max 4 MiB) and CUBIC, Linux's default congestion control.
    TYPICAL_TCP = ("net.ipv4.tcp_rmem=4096 131072 6291456", "net.ipv4.tcp_wmem=4096 16384 4194304")
    GATEWAY_SETUPS = ("advised", "typical")

    def set_up_gateways(self, how: str = "advised") -> list[str]:
        """Each gateway's TCP for this testbed's WAN; returns what was done, in lines for people.

        ``advised``: the buffer caps ``s2cs check-config --max-rtt RTT --rate RATE`` advises,
        run in the gateway's namespace (the per-namespace ``net.ipv4`` ones; ``net.core``'s
        belong to the first namespace); the WAN legs' congestion control is the data server's
        (``s2cs --wan-congestion``, BBR by default). ``typical``: a gateway as Linux sets it up,
        Linux's default buffer caps and CUBIC on every route (``ip route ... congctl cubic``:
        a namespace's default may only be one of tcp_allowed_congestion_control, and this
        machine's own default is BBR)."""
        if how not in self.GATEWAY_SETUPS:
            raise TestbedError(f"gateways are set up {' or '.join(self.GATEWAY_SETUPS)}, not {how!r}")
        if self.wan is None:
            raise TestbedError("set_up_gateways needs an emulated WAN (Testbed(wan=...))")
        done = []
        for gw in (self.gw_a, self.gw_b):
            if how == "typical":
                self.run(gw, "sysctl", "-q", "-w", *self.TYPICAL_TCP)
                for route in self.run(gw, "ip", "-4", "route", "show").stdout.splitlines():
                    self.run(gw, "ip", "route", "change", *route.split(), "congctl", "cubic")
                done.append(f"  {gw.label}: typical: {', '.join(self.TYPICAL_TCP)}; every route congctl cubic")
                continue
            opts = ["--max-rtt", f"{self.wan.rtt_ms:g}ms"]
            if self.wan.rate:
                opts += ["--rate", f"{self.wan.rate / 1e6:g}mbit"]
            s2cs = str(Path(sys.executable).with_name("s2cs"))
            p = self.run(gw, s2cs, "check-config", *opts, "--json", check=False, timeout=60)
            try:
                advice = json.loads(p.stdout)["advice"]
            except (ValueError, KeyError):
                raise TestbedError(f"{gw.label}: s2cs check-config failed: {(p.stderr or p.stdout).strip()[-500:]}")
            sets = [f"{k}={v}" for k, v in advice.items() if k.startswith("net.ipv4.")]
            if sets:
                self.run(gw, "sysctl", "-q", "-w", *sets)
            done.append(f"  {gw.label}: as `s2cs check-config {' '.join(opts)}` advises: "
                        + (", ".join(sets) or "nothing to raise"))
        return done

    def _stop_element(self) -> None:
        proc, self._element = self._element, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("the WAN element ignored SIGTERM; sending SIGKILL")
                proc.kill()
                proc.wait()
        wan_dir, self._wan_dir = self._wan_dir, None
        if wan_dir is not None:
            with contextlib.suppress(ValueError, OSError):  # its last counters, written as it stopped
                self.wan_final_stats = json.loads((wan_dir / "stats.json").read_text())
            shutil.rmtree(wan_dir, ignore_errors=True)

    def destroy(self) -> None:
        """Stop every process left in the namespaces, then delete them (and their veths)."""
        if not self.owner:
            return
        self._stop_element()
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

    def run(self, host: Host | str, *argv: str, check: bool = True, timeout: float = 30,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """``argv`` run inside ``host``'s namespace (or the one named ``host``: a switch has no Host)."""
        ns, label = (host, host) if isinstance(host, str) else (host.ns, host.label)
        p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise TestbedError(f"{label}: {' '.join(argv)} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()[-1000:]}")
        return p

    def listening_ports(self, host: Host) -> set[int]:
        """The TCP ports something listens on inside ``host`` (``ss -ltn``)."""
        lines = self.run(host, "ss", "-ltnH").stdout.splitlines()
        return {int(fields[3].rpartition(":")[2]) for fields in map(str.split, lines) if len(fields) >= 4}

    def inside(self, host: Host) -> bool:
        """True if this process runs in ``host``'s namespace."""
        with contextlib.suppress(OSError):
            return os.path.samefile("/proc/self/ns/net", NETNS_DIR / host.ns)
        return False

    def describe(self) -> str:
        lines = [f"testbed {self.tag}: {self.SUMMARY}"]
        for h in self.hosts.values():
            lines.append(f"  {h.label:<8} {h.ns:<40} " + " ".join(f"{i}={a}" for i, a in h.addrs))
        if self.wan:
            lines.append(f"  WAN (GW-A <-> router <-> GW-B): {self.wan.describe()}")
        for name, ns in self.switches.items():
            lines.append(f"  {'[' + name + ']':<8} {ns:<40} bridge of " + " ".join(
                a for a, _, b, _ in self.links if b == name))
        return "\n".join(lines)


# Facility A of several nodes: two control hosts, two data-transfer nodes, a database
# host; facility B one gateway. LANs with more than two hosts are bridges in a switch namespace.
_F_HOSTS = (
    ("producer", "producer", (("eth0", "192.0.2.10/25"),)),
    ("ctl-a1", "CTL-A1", (("lan0", "192.0.2.21/25"), ("mgt0", "192.0.2.131/25"), ("usr0", "198.51.100.81/28"))),
    ("ctl-a2", "CTL-A2", (("lan0", "192.0.2.22/25"), ("mgt0", "192.0.2.132/25"), ("usr0", "198.51.100.82/28"))),
    ("dtn-a1", "DTN-A1", (("lan0", "192.0.2.11/25"), ("mgt0", "192.0.2.141/25"), ("wan0", "198.51.100.11/28"))),
    ("dtn-a2", "DTN-A2", (("lan0", "192.0.2.12/25"), ("mgt0", "192.0.2.142/25"), ("wan0", "198.51.100.12/28"))),
    ("db-a", "DB-A", (("eth0", "192.0.2.150/25"),)),
    ("gw-b", "GW-B", (("wan0", "198.51.100.2/28"), ("lan0", "203.0.113.1/24"), ("usr0", "198.51.100.69/30"))),
    ("consumer", "consumer", (("eth0", "203.0.113.10/24"),)),
    ("user", "user", (("ctl0", "198.51.100.94/28"), ("gwb0", "198.51.100.70/30"))),
)
_F_SWITCHES = ("lan-a", "mgmt-a", "wan", "usr-a")
_F_LINKS = (  # (host, if, host or switch, if)
    ("producer", "eth0", "lan-a", "producer"),    # A's LAN: the producer, the DTNs, the control hosts
    ("dtn-a1", "lan0", "lan-a", "dtn-a1"),
    ("dtn-a2", "lan0", "lan-a", "dtn-a2"),
    ("ctl-a1", "lan0", "lan-a", "ctl-a1"),
    ("ctl-a2", "lan0", "lan-a", "ctl-a2"),
    ("ctl-a1", "mgt0", "mgmt-a", "ctl-a1"),       # A's management LAN: control hosts, DTNs, database
    ("ctl-a2", "mgt0", "mgmt-a", "ctl-a2"),
    ("dtn-a1", "mgt0", "mgmt-a", "dtn-a1"),
    ("dtn-a2", "mgt0", "mgmt-a", "dtn-a2"),
    ("db-a", "eth0", "mgmt-a", "db-a"),
    ("dtn-a1", "wan0", "wan", "dtn-a1"),          # the WAN: A's DTNs and GW-B
    ("dtn-a2", "wan0", "wan", "dtn-a2"),
    ("gw-b", "wan0", "wan", "gw-b"),
    ("ctl-a1", "usr0", "usr-a", "ctl-a1"),        # the user's path to A's control instances
    ("ctl-a2", "usr0", "usr-a", "ctl-a2"),
    ("user", "ctl0", "usr-a", "user"),
    ("consumer", "eth0", "gw-b", "lan0"),         # B's LAN
    ("user", "gwb0", "gw-b", "usr0"),             # ... and to GW-B's control port
)
_F_ROUTES = (
    ("producer", "198.51.100.81/32", "192.0.2.21"),   # the producer's controller -> CTL-A1's S2CS
    ("producer", "198.51.100.82/32", "192.0.2.22"),   # ... and CTL-A2's
    ("consumer", "198.51.100.69/32", "203.0.113.1"),  # the consumer's controller -> GW-B's S2CS
)


class FacilityTestbed(Testbed):
    """Facility A of several nodes and facility B of one gateway::

        A's LAN 192.0.2.0/25 (bridge lan-a): producer .10, DTN-A1 .11, DTN-A2 .12, CTL-A1 .21, CTL-A2 .22
        A's management LAN 192.0.2.128/25 (bridge mgmt-a): CTL-A1 .131, CTL-A2 .132,
            DTN-A1 .141, DTN-A2 .142, DB-A .150 (PostgreSQL)
        WAN 198.51.100.0/28 (bridge wan): DTN-A1 .11, DTN-A2 .12, GW-B .2
        user <-> A's control 198.51.100.80/28 (bridge usr-a): CTL-A1 .81, CTL-A2 .82, user .94
        user <-> GW-B 198.51.100.68/30: GW-B .69, user .70
        B's LAN 203.0.113.0/24: GW-B .1, consumer .10

    Each host reaches only the LANs it is on (no forwarding anywhere, bridges switch frames
    only): the control hosts see the database and the DTNs' control addresses but no WAN,
    the DTNs see the producer, the database and GW-B, the user only the control addresses.
    The producer's controller reaches the control instances' user-facing addresses through
    a host route to the control host's LAN address (delivered locally there, not forwarded)."""

    SUMMARY = "facility A = producer + CTL-A1/A2 + DTN-A1/A2 + DB-A, facility B = consumer + GW-B"

    def __init__(self, tag: str | None = None, *, owner: bool = True, wan: WanSpec | None = None) -> None:
        if wan is not None:
            raise TestbedError("FacilityTestbed has no emulated WAN (its WAN is a bridge); use Testbed(wan=...)")
        super().__init__(tag, owner=owner)

    def _topology(self) -> tuple:
        return _F_HOSTS, _F_LINKS, _F_ROUTES, _F_SWITCHES
