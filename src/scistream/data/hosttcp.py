"""This host's TCP as the WAN leg meets it: congestion controls, buffer limits, MTUs.

Owns two decisions the control server makes at start, and says them in a line each:

* which congestion control the data servers give their WAN-leg sockets
  (``--wan-congestion``: ``auto`` = BBR where this kernel lets this process set it, else the
  kernel's own choice; ``system`` = the kernel's own choice; or a name the kernel has);
* what one stream can reach at a given round trip with this host's buffer limits, and
  which sysctl to raise, to what, for a wanted rate (``s2cs check-config --max-rtt --rate``).

Everything is read from this process's network namespace (``/proc/sys/net`` and the
interfaces are per namespace), so ``ip netns exec NS s2cs check-config`` reads NS.

    host = HostTcp.read()
    wan_cc = resolve_congestion("auto", host)       # "bbr", or "" for the kernel's choice
    limit = host.stream_limit(0.1)                  # bit/s of one stream at 100 ms
    for line in host.advice(0.1, 10e9): print(line) # sysctl -w ... lines

The window a buffer allows: Linux counts a socket's buffer in memory, packets and their
overhead together, so only a share of ``tcp_rmem``'s maximum is offered as receive window
(before kernel 6.6 set by ``tcp_adv_win_scale``, 1: a half; from 6.6 measured per socket)
and a share of ``tcp_wmem``'s maximum can be in flight unacknowledged. Measured through
the testbed's emulated WAN on kernel 6.18 (150 ms, 1 Gbit/s, BBR, one iperf3 stream, MTU
1500): with tcp_rmem max 64 MiB and tcp_wmem max 4 MiB, 3.54 MB in flight (0.84 of the
4 MiB); with 4 MiB and 64 MiB, 2.54 MB (0.61); with Linux's defaults (6 MiB, 4 MiB),
3.39 MB. So: 0.6 of the receive cap (on older kernels what tcp_adv_win_scale says), 0.8
of the send cap; the advice adds a quarter for the bottleneck's queue and rounds up to a
power of two.
"""
from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import logging
import math
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

PROC_NET = Path("/proc/sys/net")
SIOCGIFMTU = 0x8921
AUTO, SYSTEM = "auto", "system"
PREFERRED = "bbr"          # the default WAN-leg congestion control, where the kernel has it
RECV_SHARE = 0.6           # of tcp_rmem's maximum, offered as window (kernels from 6.6; see above)
SEND_SHARE = 0.8           # of tcp_wmem's maximum, kept in flight
HEADROOM = 1.25            # the advice's margin over the bandwidth-delay product (the bottleneck's queue)


class CongestionError(ValueError):
    """A ``--wan-congestion`` this host cannot give its sockets; the message lists what it has."""


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _ints(text: str, n: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split())
    except ValueError:
        vals = ()
    return vals if len(vals) == n else (0,) * n


def interface_mtus() -> dict[str, int]:
    """Each interface of this network namespace (but lo) and its MTU."""
    out: dict[str, int] = {}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            if name == "lo":
                continue
            req = array.array("B", name.encode()[:15].ljust(40, b"\0"))
            try:
                fcntl.ioctl(s.fileno(), SIOCGIFMTU, req, True)
            except OSError:
                continue
            out[name] = struct.unpack_from("i", req.tobytes(), 16)[0]
    return out


def kernel_version() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return 0, 0


def try_congestion(name: str) -> str | None:
    """Why a TCP socket of this process cannot take congestion control ``name``, or None if it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return "this kernel has no such congestion control"
            if exc.errno == errno.EPERM:
                return ("not in net.ipv4.tcp_allowed_congestion_control, and this process lacks "
                        "CAP_NET_ADMIN (root may set any available one)")
            return exc.strerror or str(exc)
    return None


@dataclasses.dataclass(frozen=True)
class HostTcp:
    """The TCP settings of this host (this network namespace) that bound one stream."""
    tcp_rmem: tuple[int, int, int]       # min, default, max (autotuning's cap) of a receive buffer
    tcp_wmem: tuple[int, int, int]       # ... of a send buffer
    rmem_max: int                        # net.core.*: the cap of a size an application sets
    wmem_max: int
    adv_win_scale: int
    available: tuple[str, ...]           # congestion controls the kernel has
    allowed: tuple[str, ...]             # ... any process may set
    default_cc: str                      # net.ipv4.tcp_congestion_control
    mtus: dict[str, int]
    kernel: tuple[int, int] = (0, 0)     # the running kernel's version (the receive share depends on it)

    @classmethod
    def read(cls, proc_net: Path = PROC_NET) -> "HostTcp":
        ipv4, core = proc_net / "ipv4", proc_net / "core"
        return cls(
            tcp_rmem=_ints(_read(ipv4 / "tcp_rmem"), 3),  # type: ignore[arg-type]
            tcp_wmem=_ints(_read(ipv4 / "tcp_wmem"), 3),  # type: ignore[arg-type]
            rmem_max=int(_read(core / "rmem_max", "0") or 0), wmem_max=int(_read(core / "wmem_max", "0") or 0),
            adv_win_scale=int(_read(ipv4 / "tcp_adv_win_scale", "1") or 1),
            available=tuple(_read(ipv4 / "tcp_available_congestion_control").split()),
            allowed=tuple(_read(ipv4 / "tcp_allowed_congestion_control").split()),
            default_cc=_read(ipv4 / "tcp_congestion_control"),
            mtus=interface_mtus(), kernel=kernel_version())

    # -- windows --------------------------------------------------------------------------
    def window_share(self) -> float:
        """The part of the receive buffer that is window (see the module's docstring)."""
        if self.kernel >= (6, 6):
            return RECV_SHARE
        s = self.adv_win_scale
        return 1 - 2.0 ** -s if s > 0 else 2.0 ** s if s < 0 else RECV_SHARE

    def window_bytes(self) -> tuple[int, str]:
        """(bytes one stream may have in flight, the sysctl that bounds it)."""
        share = self.window_share()
        recv, send = int(self.tcp_rmem[2] * share), int(self.tcp_wmem[2] * SEND_SHARE)
        return (recv, "net.ipv4.tcp_rmem") if recv < send else (send, "net.ipv4.tcp_wmem")

    def stream_limit(self, rtt_s: float) -> float:
        """Bit/s one stream can reach at ``rtt_s`` with these buffer limits (no loss)."""
        return self.window_bytes()[0] * 8 / rtt_s if rtt_s > 0 else math.inf

    def buffer_for(self, rtt_s: float, rate_bps: float) -> int:
        """The buffer maximum (bytes, a power of two) that lets one stream reach ``rate_bps``."""
        need = HEADROOM * rate_bps * rtt_s / 8 / min(self.window_share(), SEND_SHARE)
        return 1 << max(22, math.ceil(math.log2(max(need, 1))))

    def advice(self, rtt_s: float, rate_bps: float) -> list[tuple[str, str]]:
        """The sysctls (key, value) that let one stream reach ``rate_bps`` at ``rtt_s`` ([] if it
        can): autotuning's caps (``tcp_*mem``'s maximum, keeping minimum and default) and, where
        lower, the caps of a size an application sets itself (``net.core.*mem_max``, e.g.
        ``iperf3 -w``; host-wide: a network namespace other than the first cannot change them)."""
        if self.stream_limit(rtt_s) >= rate_bps:
            return []
        want = self.buffer_for(rtt_s, rate_bps)
        out: list[tuple[str, str]] = []
        for kind, (lo, mid, top), core in (("r", self.tcp_rmem, self.rmem_max), ("w", self.tcp_wmem, self.wmem_max)):
            if top < want:
                out.append((f"net.ipv4.tcp_{kind}mem", f"{lo} {mid} {want}"))
            if core < want:
                out.append((f"net.core.{kind}mem_max", str(want)))
        return sorted(out, key=lambda kv: not kv[0].startswith("net.ipv4"))

    def report(self, rtt_s: float, rate_bps: float | None, wan_cc: str, wan_setting: str) -> tuple[list[str], bool]:
        """``s2cs check-config``'s lines, and whether one stream reaches ``rate_bps`` (True without one)."""
        from ..units import bitrate, size
        win, which = self.window_bytes()
        limit = self.stream_limit(rtt_s)
        ms = f"{rtt_s * 1000:g} ms"
        lines = [
            "host TCP (this network namespace):",
            f"  buffer caps: tcp_rmem max {size(self.tcp_rmem[2])}, tcp_wmem max {size(self.tcp_wmem[2])}, "
            f"rmem_max {size(self.rmem_max)}, wmem_max {size(self.wmem_max)}",
            f"  one stream at {ms}: about {bitrate(limit)} ({size(win)} in flight, bounded by {which})",
            f"  congestion control: WAN legs {wan_cc or 'the kernel default'} (--wan-congestion {wan_setting}); "
            f"kernel default {self.default_cc or '-'}; available {' '.join(self.available) or '-'}; "
            f"any process may set {' '.join(self.allowed) or '-'}",
            "  MTU: " + (", ".join(f"{k} {v}" for k, v in sorted(self.mtus.items())) or "no interface but lo"),
        ]
        if PREFERRED not in self.available:
            lines.append(f"  no {PREFERRED} here: `modprobe tcp_{PREFERRED}` loads it (a loss-based control such "
                         "as cubic keeps a lossy long path far below these figures)")
        if rate_bps is None:
            return lines, True
        if limit >= rate_bps:
            lines.append(f"OK: one stream can reach {bitrate(rate_bps)} at {ms}")
            return lines, True
        lines.append(f"one stream cannot reach {bitrate(rate_bps)} at {ms}; as root, raise (and keep them in "
                     "/etc/sysctl.d/):")
        for k, v in self.advice(rtt_s, rate_bps):
            lines.append(f"  sysctl -w {k}='{v}'" if " " in v else
                         f"  sysctl -w {k}={v}    # for programs that set their own buffer size")
        return lines, False

    def start_line(self, rtt_s: float) -> str:
        """One line for the control server's start: what one stream reaches, what bounds it."""
        from ..units import bitrate, size
        win, which = self.window_bytes()
        return (f"host TCP: one stream reaches about {bitrate(self.stream_limit(rtt_s))} at "
                f"{rtt_s * 1000:g} ms (tcp_rmem max {size(self.tcp_rmem[2])}, tcp_wmem max "
                f"{size(self.tcp_wmem[2])}: {size(win)} in flight, bounded by {which}); "
                f"`s2cs check-config --max-rtt MS --rate RATE` says what to raise")


def resolve_congestion(name: str | None, host: HostTcp | None = None) -> str:
    """The congestion control WAN-leg sockets get: a kernel name, or "" for the kernel's own
    choice (the route's ``congctl``, else net.ipv4.tcp_congestion_control).

    ``auto`` (None, ""): BBR where this process can set it, else the kernel's choice;
    ``system``: the kernel's choice; a name: that one, or ``CongestionError`` saying why not
    and what this kernel has."""
    text = (name or AUTO).strip().lower()
    if text == SYSTEM:
        return ""
    host = host or HostTcp.read()
    if text == AUTO:
        return PREFERRED if try_congestion(PREFERRED) is None else ""
    why = try_congestion(text)
    if why is not None:
        raise CongestionError(
            f"--wan-congestion {text}: {why}; available here: {', '.join(host.available) or 'none listed'} "
            f"(any process may set {', '.join(host.allowed) or 'none'}); give one of those, "
            f"'auto' (BBR where possible) or 'system' (the kernel's default, {host.default_cc or 'unknown'})")
    return text


def congestion_line(chosen: str, host: HostTcp, kind: str = "Builtin") -> str:
    """One line for the control server's start: the WAN legs' congestion control and why."""
    base = (f"the kernel's default ({host.default_cc or 'unknown'}; a route's congctl wins)")
    have = f"available: {' '.join(host.available) or '-'}"
    if kind != "Builtin" and chosen:
        return (f"WAN legs' congestion control: {base}: the {kind} type cannot set it per socket; "
                f"set it per route (ip route change DEST ... congctl {chosen}) or host-wide "
                f"(sysctl net.ipv4.tcp_congestion_control={chosen}); {have}")
    if not chosen:
        return f"WAN legs' congestion control: {base}; {have}"
    return f"WAN legs' congestion control: {chosen} (set on each WAN-leg socket); {have}"


# -- applied by the data server to each socket of its WAN leg --------------------------------
_WARNED: set[tuple[str, int]] = set()


def prepare_wan_socket(sock: socket.socket, congestion: str) -> None:
    """A socket of the WAN leg (accepted by PROD, connected by CONS): its congestion
    control when one is chosen. Nothing else: no buffer size is ever fixed here, so the
    kernel's autotuning grows the window to the path (up to tcp_rmem/tcp_wmem's maximum).

    Set after accept()/connect(): a route's ``congctl`` is applied when the connection is
    made and would replace a choice made before. A refusal (a route's ``congctl lock``,
    the module gone) is logged once per name and reason; the socket keeps the kernel's."""
    if not congestion:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    except OSError as exc:
        key = (congestion, exc.errno or 0)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("cannot set congestion control %s on a WAN-leg socket: %s; it keeps the "
                        "kernel's (a route with `congctl lock` forbids it)", congestion, exc.strerror or exc)


__all__ = ["HostTcp", "CongestionError", "resolve_congestion", "congestion_line", "prepare_wan_socket",
           "try_congestion", "interface_mtus", "AUTO", "SYSTEM"]
