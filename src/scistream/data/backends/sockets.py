"""Per-hop telemetry of an external proxy's connections, read from outside with ``ss``.

HAProxy, Nginx and stunnel do not say what the kernel knows of their sockets, but the
kernel tells any process of the host (``ss -ti``, netlink ``inet_diag``): the round trip,
the congestion window, bytes acknowledged and received, retransmits, the delivery rate,
and the time the sender was busy and held by the receiver's window or its send buffer.
``SocketWatch`` finds a session's sockets by their addresses: on the listener side the
sockets whose local port is one of the session's ports, on the target side the sockets
whose peer is one of its targets; each reading is turned into the same sample as the
built-in data server's (``engine.tcpinfo.between``), over the time since the last one.

What cannot be read this way: the proxy's own buffers between its two sockets; the
sockets of another process with the same peer (another session to the same producer
endpoint is counted in both); the timing of ``ss`` (milliseconds, not microseconds).
The reading is made when asked (status, the web view, a metrics scrape), averaged since
the one before.

    watch = SocketWatch(role="PROD", ports=(5100,), targets=("10.0.0.5:7000",))
    await watch.legs()     # {"lan": {...}, "wan": {...}} (data.telemetry.summarize)
"""
from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from typing import Any, Callable

from ...addr import format_listener, parse_listener
from ..engine.tcpinfo import between, instant
from ..telemetry import summarize
from .common import run_check

log = logging.getLogger(__name__)

_HEAD = re.compile(r"^\S+\s+\S+\s+(\S+)\s+(\S+)")
_KV = re.compile(r"([a-z_]+):(\S+)")


def _us(ms: str) -> int:
    """``"1.5ms"`` (or ``"1.5ms(12.3%)"``) -> 1500 (microseconds)."""
    return int(float(ms.split("(")[0].rstrip("ms")) * 1000)


#: ``ss -ti``'s fields but rtt (two in one): their ``tcp_info`` names, and how each value reads.
_FIELDS: dict[str, tuple[str, Callable[[str], int]]] = {
    "minrtt": ("min_rtt", _us), "rcv_rtt": ("rcv_rtt", _us), "busy": ("busy_time", _us),
    "rwnd_limited": ("rwnd_limited", _us), "sndbuf_limited": ("sndbuf_limited", _us),
    "cwnd": ("snd_cwnd", int), "mss": ("snd_mss", int), "pmtu": ("pmtu", int),
    "retrans": ("total_retrans", lambda v: int(v.partition("/")[2] or 0)),   # "now/total"
    "bytes_acked": ("bytes_acked", int), "bytes_received": ("bytes_received", int),
    "data_segs_out": ("data_segs_out", int), "notsent": ("notsent_bytes", int),
}


def parse_ss(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """``ss -tinH`` output -> {(local, peer): tcp_info-like counters}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    key: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _HEAD.match(line)
            key = (m.group(1), m.group(2)) if m else None
            continue
        if key is None:
            continue
        info = dict.fromkeys(("rtt", "rttvar", "delivery_rate", "app_limited_flags",
                              *(name for name, _ in _FIELDS.values())), 0)
        for k, v in _KV.findall(line):
            try:
                if k == "rtt":
                    rtt, _, var = v.partition("/")
                    info["rtt"], info["rttvar"] = _us(rtt), _us(var or "0")
                elif k in _FIELDS:
                    name, read = _FIELDS[k]
                    info[name] = read(v)
            except ValueError:
                continue
        m = re.search(r"delivery_rate (\d+)bps", line)
        if m:
            info["delivery_rate"] = int(m.group(1)) // 8
        if re.search(r"\bapp_limited\b", line):
            info["app_limited_flags"] = 1
        out[key] = info
        key = None
    return out


async def run_ss(filter_expr: str, timeout: float = 3.0) -> str:
    argv = ["ss", "-tinH", "state", "established", filter_expr]
    return (await run_check(argv, timeout, stderr=asyncio.subprocess.DEVNULL))[1]


class SocketWatch:
    """A session's sockets on this host, read with ``ss``; see the module docstring."""

    def __init__(self, *, role: str, ports: tuple[int, ...], targets: tuple[str, ...]) -> None:
        self.role = role
        self.ports = ports
        self.targets = targets
        self.prev: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.at = 0.0

    @staticmethod
    def available() -> bool:
        return shutil.which("ss") is not None

    def _filters(self) -> tuple[str, str]:
        listeners = " or ".join(f"sport = :{p}" for p in self.ports)
        dests = " or ".join(f"dst {format_listener(*parse_listener(t))}" for t in dict.fromkeys(self.targets))
        return f"( {listeners} )", f"( {dests} )"

    async def legs(self) -> dict[str, dict[str, Any]]:
        """The session's legs now (``summarize``); the last reading if asked again within 0.2 s."""
        now = time.monotonic()
        if now - self.at < 0.2 or not self.available() or not self.ports or not self.targets:
            return self.last
        accepted, outgoing = self._filters()
        texts = await asyncio.gather(run_ss(accepted), run_ss(outgoing))
        # PROD accepts from the WAN and connects to the producer; CONS the other way round
        kinds = ("wan", "lan") if self.role == "PROD" else ("lan", "wan")
        conns: dict[tuple[str, str], dict[str, Any]] = {}
        seen: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        for kind, text in zip(kinds, texts):
            for key, info in parse_ss(text).items():
                old = self.prev.get(key)
                sample = between(old[1], info, now - old[0]) if old else instant(info)
                seen[key] = (now, info)
                conns[key] = {"tcp": {kind: sample}}
        self.prev = seen
        self.at = now
        self.last = summarize(conns.values())
        return self.last
