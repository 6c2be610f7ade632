"""What the kernel knows of one TCP connection (``TCP_INFO``), sampled about once a second.

``read(sock)`` parses Linux's ``struct tcp_info`` (include/uapi/linux/tcp.h) with
``struct``; a ``LegSampler`` keeps the previous reading of one socket so that a sample
holds rates and shares of the interval, not counters since the connection began:

* ``rtt_ms``, ``min_rtt_ms``: the smoothed and the lowest round trip the sender measured;
* ``cwnd`` (segments), ``mss``: the congestion window;
* ``retrans_pct``: segments sent again, in percent of the data segments sent in the interval;
* ``delivery_rate_bps``: the kernel's estimate of the rate the path delivers (bit/s);
* ``sent_bps``, ``received_bps``: bytes acknowledged and bytes received in the interval;
* ``rwnd_limited``, ``sndbuf_limited``, ``cwnd_limited``, ``app_limited``: the shares of
  the interval (0-1) the sender was held by the receiver's window, by its own send buffer,
  by the network (busy, neither of those two: the congestion window) and by having nothing
  to send (not busy at all);
  (busy time counts any time data is unacknowledged, so an interval that ends with nothing
  left unsent, or that carried under a third of what the window allows, counts as
  application-limited, however busy);
* ``rcv_rtt_ms``: the round trip the receiving end estimates (a leg this host receives on).

    s = LegSampler()
    s.sample(sock)      # the first reading: counters only, no shares yet
    ...                 # a second later
    s.sample(sock)      # {"rtt_ms": 52.1, "retrans_pct": 0.9, "rwnd_limited": 0.0, ...}
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Any

# struct tcp_info, up to tcpi_snd_wnd (Linux 5.4 and later give all of it; older kernels a
# shorter struct, whose missing fields read as zero)
_FIELDS = (
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"), ("backoff", "B"),
    ("options", "B"), ("wscale", "B"), ("app_limited_flags", "B"),
    ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"), ("last_ack_recv", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt", "I"), ("rttvar", "I"), ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"), ("rcv_rtt", "I"), ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"), ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("segs_out", "I"), ("segs_in", "I"), ("notsent_bytes", "I"), ("min_rtt", "I"),
    ("data_segs_in", "I"), ("data_segs_out", "I"),
    ("delivery_rate", "Q"), ("busy_time", "Q"), ("rwnd_limited", "Q"), ("sndbuf_limited", "Q"),
    ("delivered", "I"), ("delivered_ce", "I"), ("bytes_sent", "Q"), ("bytes_retrans", "Q"),
    ("dsack_dups", "I"), ("reord_seen", "I"), ("rcv_ooopack", "I"), ("snd_wnd", "I"),
)
_STRUCT = struct.Struct("=" + "".join(f for _, f in _FIELDS))
_NAMES = tuple(n for n, _ in _FIELDS)
SIZE = _STRUCT.size          # 232 bytes


def parse(raw: bytes) -> dict[str, int]:
    """``struct tcp_info`` as a dict; a shorter struct (an older kernel) reads as zeros after its end."""
    return dict(zip(_NAMES, _STRUCT.unpack(raw[:SIZE].ljust(SIZE, b"\0"))))


def read(sock: socket.socket) -> dict[str, int] | None:
    """The socket's ``tcp_info``; None if it has none (closed, not TCP)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, SIZE)
    except OSError:
        return None
    return parse(raw)


def instant(ti: dict[str, int]) -> dict[str, Any]:
    """What one reading says on its own (no interval): round trip, window, rate estimate."""
    return {"rtt_ms": round(ti["rtt"] / 1000, 3), "min_rtt_ms": round(ti["min_rtt"] / 1000, 3),
            "rttvar_ms": round(ti["rttvar"] / 1000, 3), "rcv_rtt_ms": round(ti["rcv_rtt"] / 1000, 3),
            "cwnd": ti["snd_cwnd"], "mss": ti["snd_mss"], "pmtu": ti["pmtu"],
            "delivery_rate_bps": ti["delivery_rate"] * 8,
            "delivery_app_limited": bool(ti["app_limited_flags"] & 1),
            "total_retrans": ti["total_retrans"], "notsent_bytes": ti["notsent_bytes"],
            "bytes_acked": ti["bytes_acked"], "bytes_received": ti["bytes_received"]}


def between(old: dict[str, int], new: dict[str, int], dt: float) -> dict[str, Any]:
    """What happened between two readings ``dt`` seconds apart: rates and shares of the interval."""
    out = instant(new)
    dt = max(dt, 1e-3)
    d = {k: max(0, new[k] - old[k]) for k in ("bytes_acked", "bytes_received", "data_segs_out", "total_retrans",
                                               "busy_time", "rwnd_limited", "sndbuf_limited")}
    span = dt * 1e6        # microseconds, as the kernel counts the limited times
    busy = min(d["busy_time"], span)
    rwnd = min(d["rwnd_limited"], busy)
    sndbuf = min(d["sndbuf_limited"], busy - rwnd)
    # Busy time is any time with data unacknowledged: on a long path a slow writer keeps
    # the sender "busy" though it waits for the application. A sender held by the network
    # has bytes waiting in its buffer (a relay keeps it full) and sends about a window per
    # round trip; nothing left unsent, or under a third of what its window allows: the
    # writer is the limit.
    window_bps = new["snd_cwnd"] * new["snd_mss"] * 8 / (new["rtt"] / 1e6) if new["rtt"] else 0.0
    if d["bytes_acked"] and (not new["notsent_bytes"] or d["bytes_acked"] * 8 / dt < window_bps / 3):
        busy = rwnd + sndbuf
    out.update({
        "interval_s": round(dt, 3),
        "sent_bps": round(d["bytes_acked"] * 8 / dt), "received_bps": round(d["bytes_received"] * 8 / dt),
        "segs_sent": d["data_segs_out"], "retrans": d["total_retrans"],
        "retrans_pct": round(100 * d["total_retrans"] / d["data_segs_out"], 3) if d["data_segs_out"] else 0.0,
        "busy": round(busy / span, 3), "rwnd_limited": round(rwnd / span, 3),
        "sndbuf_limited": round(sndbuf / span, 3), "cwnd_limited": round((busy - rwnd - sndbuf) / span, 3),
        "app_limited": round(1 - busy / span, 3),
    })
    return out


class LegSampler:
    """The readings of one socket: the last two (kept raw: a reading costs one system call),
    and what the interval between them showed, worked out when asked (``last``)."""
    __slots__ = ("prev", "cur", "_done")

    def __init__(self) -> None:
        self.prev: tuple[float, bytes] | None = None
        self.cur: tuple[float, bytes] | None = None
        self._done: tuple[float, dict[str, Any] | None] = (-1.0, None)

    def sample(self, sock: socket.socket, now: float | None = None) -> dict[str, Any] | None:
        """Take a reading (none within 0.2 s of the last: too short an interval says too
        little); return ``last``."""
        self.take(sock, now)
        return self.last

    def take(self, sock: socket.socket, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.cur is not None and now - self.cur[0] < 0.2:
            return
        try:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, SIZE)
        except OSError:
            return
        self.prev, self.cur = self.cur, (now, raw)

    @property
    def last(self) -> dict[str, Any] | None:
        """The latest interval's sample (``between``), or the one reading's (``instant``)."""
        if self.cur is None:
            return None
        if self._done[0] != self.cur[0]:
            new = parse(self.cur[1])
            out = instant(new) if self.prev is None else between(parse(self.prev[1]), new, self.cur[0] - self.prev[0])
            self._done = (self.cur[0], out)
        return self._done[1]
