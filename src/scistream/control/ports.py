"""Port and bandwidth pools of one gateway.

Ports come from ``--port-range``; a port another program holds is skipped, not handed
out. Everything reserved is given back with ``free`` - the session registry calls it on
release, on timeout and on every failure path, so the pool is always whole again.

    pool = PortPool(range(5100, 5201), host="127.0.0.1")
    ports = pool.take(4)     # PortsExhausted if fewer than 4 are free
    pool.free(ports)
"""
from __future__ import annotations

import logging
from typing import Iterable

from ..data.supervise import free_port_check
from ..errors import BandwidthExhausted, InvalidArgument, PortsExhausted

log = logging.getLogger(__name__)


def parse_port_range(text: str) -> range:
    lo, sep, hi = text.partition("-")
    try:
        start, stop = int(lo), int(hi if sep else lo)
    except ValueError:
        raise InvalidArgument(f"bad port range {text!r}; expected e.g. 5100-5200") from None
    if not (1 <= start <= stop <= 65535):
        raise InvalidArgument(f"bad port range {text!r}; ports are 1-65535, low-high")
    return range(start, stop + 1)


class PortPool:
    def __init__(self, ports: range, host: str, *, udp: bool = False) -> None:
        self.ports = ports
        self.host = host
        self.udp = udp          # sessions carry UDP too: a port is free only if free for both
        self.used: set[int] = set()
        self._next = ports.start

    @property
    def free_count(self) -> int:
        return len(self.ports) - len(self.used)

    def take(self, n: int) -> list[int]:
        if n > self.free_count:
            raise PortsExhausted(wanted=n, free=self.free_count, ports=self.ports)
        got: list[int] = []
        busy = 0
        tried = 0
        port = self._next
        while len(got) < n and tried < len(self.ports):
            tried += 1
            if port not in self.used:
                if free_port_check(self.host, port, udp=self.udp):
                    got.append(port)
                    self.used.add(port)
                else:
                    busy += 1
            port = port + 1 if port + 1 < self.ports.stop else self.ports.start
        self._next = port
        if len(got) < n:
            self.free(got)
            raise PortsExhausted(wanted=n, free=self.free_count - busy, ports=self.ports,
                                 busy=busy)
        return got

    def claim(self, ports: Iterable[int]) -> None:
        """Mark ports as used (re-adopting a session after a restart)."""
        self.used.update(p for p in ports if p in self.ports)

    def free(self, ports: Iterable[int]) -> None:
        self.used.difference_update(ports)


class BandwidthPool:
    """Admission control over ``--max-rate`` (kbit/s; 0 = unlimited)."""

    def __init__(self, max_kbps: int) -> None:
        self.max = max_kbps
        self.used = 0

    def take(self, kbps: int) -> int:
        if not self.max:
            return 0
        if kbps <= 0:
            raise InvalidArgument(
                f"this gateway caps bandwidth at {self.max} kbit/s; ask for a rate (kbit/s) with --rate")
        left = self.max - self.used
        if kbps > left:
            raise BandwidthExhausted(wanted=kbps, left=left)
        self.used += kbps
        return kbps

    def claim(self, kbps: int) -> int:
        """Count a re-adopted session's bandwidth, even past ``--max-rate`` (it is running)."""
        if not self.max or kbps <= 0:
            return 0
        self.used += kbps
        if self.used > self.max:
            log.warning("re-adopted sessions use %d kbit/s, more than --max-rate %d", self.used, self.max)
        return kbps

    def free(self, kbps: int) -> None:
        self.used = max(0, self.used - kbps)
