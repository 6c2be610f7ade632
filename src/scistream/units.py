"""How sizes, durations and rates read to a person: every ``--size`` option, ``s2uc
status`` and the web view share these.

    parse_size("256M")  -> 268435456      (K, M, G, T: powers of 1024; a plain number is bytes)
    size(268435456)     -> "256.0 MiB"
    duration(4000)      -> "66m40s"
    bitrate(82_200_000) -> "82.2 Mbit/s"
"""
from __future__ import annotations

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

SIZE_HELP = "a whole number of bytes, or one with a K, M, G or T suffix (powers of 1024), e.g. 256M or 1G"


def parse_size(text: str | int) -> int:
    """A byte count: a whole number, or a number with a K, M, G or T suffix (``1.5G``,
    ``256M``, ``64KiB``, ``100MB``: powers of 1024). ValueError says what is wrong."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
        try:
            n = int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
        except (ValueError, KeyError, IndexError):
            raise ValueError(f"{text!r} is not a size: give {SIZE_HELP}") from None
    if n < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return n


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
