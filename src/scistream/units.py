"""How durations and rates read to a person: ``s2uc status`` and the web view share these.

    duration(4000)      -> "66m40s"
    bitrate(82_200_000) -> "82.2 Mbit/s"
"""
from __future__ import annotations


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bitrate(bps: float) -> str:
    for unit in ("bit/s", "kbit/s", "Mbit/s"):
        if bps < 1000:
            return f"{bps:.0f} {unit}" if unit == "bit/s" else f"{bps:.1f} {unit}"
        bps /= 1000
    return f"{bps:.1f} Gbit/s"
