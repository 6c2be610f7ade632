"""An emulated wide-area path for the testbed: delay, jitter, loss, a bottleneck rate and its
queue, an MTU, between the two gateways.

``WanSpec`` says what the path is; ``Testbed(wan=spec)`` puts a router host between GW-A
and GW-B that carries it. The kernel's ``netem`` is not needed (many kernels lack it):
the delay, jitter and loss are done by ``wanem``, a small C program of this package
(``wanem.c``, compiled with ``cc`` on first use into a cache directory), which moves
packets between two TUN devices of the router's namespace; the rate and the queue are a
``tbf`` qdisc on each TUN device, before the delay::

    GW-A wan0 --veth-- a0  router  b0 --veth-- wan0 GW-B
                        |             ^
                        v (A->B)      |
                tbf -> tun-a => wanem => tun-b          (and B->A: tbf -> tun-b => wanem => tun-a)

    spec = WanSpec(rtt_ms="50ms", rate="1gbit", loss="0.01%", mtu=9000)
    spec.one_way_ms, spec.queue_bytes, spec.bdp_bytes     # 25.0, 6250000, 6250000

Terms: ``rtt_ms`` is the round trip the path adds (half each way); ``loss`` the chance
that a packet is dropped, in each direction on its own (a ping is lost with
1 - (1 - loss)**2); ``loss_run`` the mean number of packets lost in a row (1: each loss
independent; above 1: a Gilbert model with that mean run and the same overall loss);
``jitter_ms`` a uniform spread of +-jitter on each packet's one-way delay (order is kept:
a packet never overtakes the one sent before it); ``rate`` the bottleneck in bit/s
(None: no limit but the element's own); ``queue`` the bottleneck's queue in bytes (None:
one bandwidth-delay product), its overflow is dropped at its tail like a router's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("wanem.c")
MTUS = (1280, 9000)  # the range accepted; 1500 and 9000 are the usual ones


class WanSpecError(ValueError):
    """A WAN setting that cannot be read or makes no sense; the message says which and why."""


_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_MS_UNITS = {"": 1, "ms": 1, "s": 1000, "us": 1e-3, "µs": 1e-3}
_RATE_UNITS = {"": 1, "bit": 1, "k": 1e3, "kbit": 1e3, "m": 1e6, "mbit": 1e6, "g": 1e9, "gbit": 1e9}
_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
               "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def _scaled(value: str, what: str, units: dict[str, float], expected: str, tail: str = "") -> float:
    """The number in ``value`` times its unit's factor (``units``: by lower-case name; ``tail``: a
    pattern allowed after the unit)."""
    m = re.fullmatch(f"{_NUM}({'|'.join(map(re.escape, units))}){tail}\\s*", value, re.IGNORECASE)
    if not m:
        raise WanSpecError(f"{what} {value!r} is not {expected}")
    return float(m[1]) * units[m[2].lower()]


def parse_ms(value: str | float | int, what: str = "duration") -> float:
    """Milliseconds from 50, "50ms", "0.05s", "50000us"."""
    ms = float(value) if isinstance(value, (int, float)) else _scaled(
        str(value), what, _MS_UNITS, "a duration (e.g. 50ms, 0.1s)")
    if not 0 <= ms <= 10_000:
        raise WanSpecError(f"{what} {value!r} is out of range (0 to 10 s)")
    return ms


def parse_rate(value: str | float | int | None) -> int | None:
    """Bits per second from 1e9, "1gbit", "200Mbit/s", "500m"; None, 0 or "none": no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "0", "")):
        return None
    bps = float(value) if isinstance(value, (int, float)) else _scaled(
        value, "rate", _RATE_UNITS, "a rate (e.g. 1gbit, 200mbit, 1e9)", tail="(?:/s|ps)?")
    if bps == 0:
        return None
    if not 8_000 <= bps <= 100e9:
        raise WanSpecError(f"rate {value!r} is out of range (8 kbit/s to 100 Gbit/s)")
    return int(bps)


def parse_loss(value: str | float | int) -> float:
    """A probability from 1e-4, "0.01%", "1e-4"."""
    text = str(value).strip()
    try:
        p = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise WanSpecError(f"loss {value!r} is not a probability (e.g. 0.01%, 1e-4)") from None
    if not 0 <= p < 1:
        raise WanSpecError(f"loss {value!r} must be at least 0 and below 100%")
    return p


def parse_queue(value: str | int | None, rate: int | None) -> int | None:
    """Queue bytes from 6250000, "4MiB", "6MB", or a time at the rate: "20ms"; None: one BDP."""
    if value is None or isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        if re.fullmatch(_NUM + r"(ms|s|us)\s*", text, re.IGNORECASE):
            if rate is None:
                raise WanSpecError(f"queue {value!r} is a time, which needs a rate")
            n = int(parse_ms(text, "queue") / 1000 * rate / 8)
        else:
            n = int(_scaled(text, "queue", _BYTE_UNITS, "a size or a time (e.g. 4MiB, 20ms)"))
    if n is not None and not 3000 <= n <= 1 << 30:
        raise WanSpecError(f"queue {value!r} is out of range (3000 bytes to 1 GiB)")
    return n


@dataclasses.dataclass(frozen=True)
class WanSpec:
    """The path between the gateways; strings are read ("50ms", "1gbit", "0.01%", "4MiB")."""
    rtt_ms: float = 50.0
    rate: int | None = 1_000_000_000      # bit/s; None: no bottleneck but the element
    loss: float = 0.0                     # per packet, in each direction
    mtu: int = 1500
    jitter_ms: float = 0.0                # uniform +- on each one-way delay
    queue: int | None = None              # bottleneck queue, bytes; None: one BDP
    loss_run: float = 1.0                 # mean packets lost in a row; 1: independent
    seed: int = 1                         # of the loss model's and the jitter's random numbers
    offload: bool = True                  # the element takes TCP segments joined (GSO); False: one by one

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        put("rtt_ms", parse_ms(self.rtt_ms, "rtt"))
        put("rate", parse_rate(self.rate))
        put("loss", parse_loss(self.loss))
        put("jitter_ms", parse_ms(self.jitter_ms, "jitter"))
        put("queue", parse_queue(self.queue, self.rate))
        try:
            put("mtu", int(self.mtu))
            put("loss_run", float(self.loss_run))
        except (TypeError, ValueError):
            raise WanSpecError(f"mtu {self.mtu!r} and loss_run {self.loss_run!r} must be numbers") from None
        if not MTUS[0] <= self.mtu <= MTUS[1]:
            raise WanSpecError(f"mtu {self.mtu} is out of range ({MTUS[0]} to {MTUS[1]}; usually 1500 or 9000)")
        if self.jitter_ms > self.one_way_ms:
            raise WanSpecError(f"jitter {self.jitter_ms:g} ms is larger than the one-way delay "
                               f"{self.one_way_ms:g} ms (half the RTT)")
        if self.loss_run < 1:
            raise WanSpecError(f"loss_run {self.loss_run:g} must be at least 1 (packets in a row)")

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2

    @property
    def bdp_bytes(self) -> int | None:
        """Bytes in flight that fill the path (rate x RTT), None without a rate."""
        return None if self.rate is None else int(self.rate * self.rtt_ms / 1000 / 8)

    @property
    def queue_bytes(self) -> int | None:
        """The bottleneck's queue: the one set, else one BDP (at least 64 packets)."""
        if self.rate is None:
            return None
        return self.queue if self.queue is not None else max(self.bdp_bytes or 0, 64 * self.mtu)

    @property
    def ring_bytes(self) -> int:
        """The element's buffer per direction: what arrives during the longest delay, twice, + 64 MiB
        (a late wake-up on a busy machine); memory is used only as packets fill it."""
        rate = self.rate or 10_000_000_000
        held = rate / 8 * (self.one_way_ms + self.jitter_ms) / 1000
        return int(min(2 * held + (64 << 20), 1 << 30))

    def describe(self) -> str:
        from ..units import bitrate
        parts = [f"RTT {self.rtt_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"jitter +-{self.jitter_ms:g} ms each way")
        parts.append("rate " + (bitrate(self.rate) if self.rate else "unlimited (the element's own)"))
        if self.rate:
            parts.append(f"queue {self.queue_bytes / 1e6:.2f} MB")
        runs = f" in runs of {self.loss_run:g}" if self.loss_run > 1 else ""
        parts.append(f"loss {self.loss * 100:g}% each way{runs}")
        parts.append(f"MTU {self.mtu}")
        return ", ".join(parts)

    def element_argv(self, binary: Path, stats: Path, dev_a: str = "tun-a", dev_b: str = "tun-b") -> list[str]:
        us = self.one_way_ms * 1000
        return [str(binary), "--a", dev_a, "--b", dev_b, "--delay-ab-us", f"{us:.3f}", "--delay-ba-us", f"{us:.3f}",
                "--jitter-us", f"{self.jitter_ms * 1000:.3f}", "--loss", repr(self.loss),
                "--loss-run", repr(self.loss_run), "--ring-bytes", str(self.ring_bytes), "--seed", str(self.seed),
                "--offload", "1" if self.offload else "0", "--stats", str(stats)]

    def tbf_args(self) -> list[str]:
        """``tc qdisc ... tbf`` arguments for the bottleneck (rate set)."""
        assert self.rate is not None
        # burst: 1 ms at the rate (the kernel's timer cannot release less in one go), >= 2 packets
        burst = max(self.rate // 8 // 1000, 2 * (self.mtu + 100))
        return ["tbf", "rate", f"{self.rate}bit", "burst", str(burst), "limit", str(self.queue_bytes)]


def element_binary() -> Path:
    """The compiled ``wanem`` for this source (built with ``cc`` the first time, kept by the source's hash
    in $SCISTREAM_CACHE_DIR, else $XDG_CACHE_HOME/scistream, else ~/.cache/scistream).

    Raises ``RuntimeError`` saying what to install if it cannot be built."""
    cache = os.environ.get("SCISTREAM_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "scistream")
    out = Path(cache, f"wanem-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}")
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        raise RuntimeError("the WAN element needs a C compiler (cc) to build once: install gcc "
                           "(scripts/setup --system does)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=out.name + ".", dir=out.parent) as tmp:
        p = subprocess.run([cc, "-O2", "-pthread", "-o", f"{tmp}/wanem", str(SOURCE)], capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"cannot build the WAN element ({SOURCE.name}) with {cc}: "
                               f"{(p.stderr or p.stdout).strip()[-1000:]}")
        os.replace(f"{tmp}/wanem", out)  # atomic: a parallel build leaves one good binary
    log.info("built the WAN element: %s", out)
    return out


if __name__ == "__main__":  # python -m scistream.netns.wan: build the element now, print where
    print(element_binary())
