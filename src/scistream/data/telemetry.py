"""Per-hop telemetry of a session: its legs' TCP samples, summed up, and the hop that holds it back.

A session's chain has five hops: the producer, A's LAN leg (producer - gateway A, the
PROD side), the WAN leg (gateway A - gateway B), B's LAN leg (gateway B - consumer) and
the consumer. Each gateway samples ``TCP_INFO`` on both legs of every connection about
once a second (``engine.tcpinfo``); ``summarize`` turns one gateway's connections into
one figure per leg (``lan``, ``wan``); ``verdict`` reads both gateways' legs and says
which hop limits the stream towards the consumer (or towards the producer, if more flows
that way), in words:

    legs = {"PROD": summarize(prod_conns), "CONS": summarize(cons_conns)}
    verdict(legs)      # ("wan", "the WAN: 0.9% retransmits at 52 ms")

The sending end of a leg knows why it does not send faster (the receiver's window, its
own send buffer, the network, or nothing to send); the receiving end knows only its
rate and an estimate of the round trip. Towards the consumer the senders are gateway A
on the WAN and gateway B on B's LAN; towards the producer gateway B on the WAN and
gateway A on A's LAN.
"""
from __future__ import annotations

from typing import Any, Iterable

#: A sender held back this share of the time or more by one cause: that cause limits it.
LIMITED = 0.3
#: Below this many bit/s on a leg it carries nothing worth a verdict.
IDLE_BPS = 8_000

LEGS = ("lan", "wan")
_SHARES = ("busy", "rwnd_limited", "sndbuf_limited", "cwnd_limited", "app_limited")


def summarize(conns: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One gateway's connections (each with ``tcp``: {"lan": sample, "wan": sample}) as one
    figure per leg: rates summed, round trips and shares averaged, retransmits in percent
    of all segments sent."""
    out: dict[str, dict[str, Any]] = {}
    for leg in LEGS:
        samples = [c["tcp"][leg] for c in conns if (c.get("tcp") or {}).get(leg)]
        if not samples:
            continue
        timed = [s for s in samples if "interval_s" in s]
        n = len(samples)
        segs = sum(s.get("segs_sent", 0) for s in timed)
        retrans = sum(s.get("retrans", 0) for s in timed)
        rcv = [s["rcv_rtt_ms"] for s in samples if s.get("rcv_rtt_ms")]
        d: dict[str, Any] = {
            "connections": n,
            "rtt_ms": round(sum(s["rtt_ms"] for s in samples) / n, 3),
            "min_rtt_ms": min(s["min_rtt_ms"] for s in samples),
            "rcv_rtt_ms": round(sum(rcv) / len(rcv), 3) if rcv else 0.0,
            "cwnd": round(sum(s["cwnd"] for s in samples) / n),
            "mss": max(s["mss"] for s in samples),
            "delivery_rate_bps": sum(s["delivery_rate_bps"] for s in samples),
            "sent_bps": sum(s.get("sent_bps", 0) for s in timed),
            "received_bps": sum(s.get("received_bps", 0) for s in timed),
            "retrans": retrans, "segs_sent": segs,
            "retrans_pct": round(100 * retrans / segs, 3) if segs else 0.0,
            "total_retrans": sum(s["total_retrans"] for s in samples),
            "sampled": bool(timed),
        }
        for k in _SHARES:
            d[k] = round(sum(s.get(k, 0.0) for s in timed) / len(timed), 3) if timed else 0.0
        out[leg] = d
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(x: float) -> str:
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms" if x >= 1 else f"{x:.2f} ms"


def _why_sender(leg: dict[str, Any], *, hop: str, receiver: str, gateway: str, downstream: bool) -> str | None:
    """Why the sender of a leg is held back, if it is: the receiver (its window), the
    sender's own buffer, or the network; None if it is not (it waits for data)."""
    if leg["rwnd_limited"] >= LIMITED:
        if downstream:
            return (f"{receiver} reads slowly (receive window on {hop}, "
                    f"{_pct(leg['rwnd_limited'])} of the time)")
        return (f"{hop}: {receiver}'s receive window ({_pct(leg['rwnd_limited'])} of the time; "
                f"its net.ipv4.tcp_rmem may be too small for {_ms(leg['rtt_ms'])})")
    if leg["sndbuf_limited"] >= LIMITED:
        return (f"{hop}: the send buffer of {gateway} ({_pct(leg['sndbuf_limited'])} of the time; "
                f"raise net.ipv4.tcp_wmem for {_ms(leg['rtt_ms'])})")
    if leg["cwnd_limited"] >= LIMITED and leg["cwnd_limited"] >= leg["app_limited"]:
        name = "the WAN" if hop == "the WAN leg" else hop
        if leg["retrans_pct"] >= 0.01:
            return f"{name}: {leg['retrans_pct']:.2g}% retransmits at {_ms(leg['rtt_ms'])}"
        return (f"{name}: its congestion window ({leg['cwnd']} segments at {_ms(leg['rtt_ms'])}, "
                f"{_pct(leg['cwnd_limited'])} of the time)")
    return None


#: The hops a verdict can name (``verdict``), for labels that stay few (Prometheus).
HOPS = ("producer", "a_lan", "wan", "b_lan", "consumer", "none")
_HOP_OF = {"A's LAN leg": "a_lan", "the WAN leg": "wan", "B's LAN leg": "b_lan"}


def verdict(sides: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
    """(hop, words): the hop that limits the session (one of ``HOPS``) and why, from each
    gateway's legs (``{"PROD": summarize(..), "CONS": summarize(..)}``; one side alone
    gives what it can)."""
    a, b = sides.get("PROD") or {}, sides.get("CONS") or {}
    if not any(leg.get("sampled") for side in (a, b) for leg in side.values()):
        return "none", ("no sample yet" if (a or b) else "no connection open")
    # which way the bytes flow: senders towards the consumer are A on the WAN, B on B's LAN
    down = sum(x.get("sent_bps", 0) for x in (a.get("wan") or {}, b.get("lan") or {}))
    up = sum(x.get("sent_bps", 0) for x in (b.get("wan") or {}, a.get("lan") or {}))
    if max(down, up) < IDLE_BPS and not any(x.get("received_bps", 0) >= IDLE_BPS
                                            for side in (a, b) for x in side.values()):
        return "none", "idle: nothing flows"
    if up > down:
        chain = [(a.get("lan"), "A's LAN leg", "the producer", "gateway A", True),
                 (b.get("wan"), "the WAN leg", "gateway A", "gateway B", False)]
        source, writer = "consumer", "the consumer sends no faster (application-limited)"
    else:
        chain = [(b.get("lan"), "B's LAN leg", "the consumer", "gateway B", True),
                 (a.get("wan"), "the WAN leg", "gateway B", "gateway A", False)]
        source, writer = "producer", "the producer sends no faster (application-limited)"
    # the hop nearest the receiving end that holds its sender back is the bottleneck: a
    # slow reader fills every window upstream of it
    for leg, hop, receiver, gateway, downstream in chain:
        if leg and leg.get("sampled"):
            why = _why_sender(leg, hop=hop, receiver=receiver, gateway=gateway, downstream=downstream)
            if why is not None:
                if downstream and leg["rwnd_limited"] >= LIMITED:
                    return ("consumer" if source == "producer" else "producer"), why
                return _HOP_OF[hop], why
    if all(leg and leg.get("sampled") for leg, *_ in chain):
        return source, writer
    seen = "gateway A" if a else "gateway B"
    return source, f"{writer.split(' (')[0]}, as far as {seen} sees (ask the other gateway for the whole chain)"


def hops(sides: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The chain hop by hop (producer, A's LAN, WAN, B's LAN, consumer), each with its rate
    and round trip as the gateways see it (None where no gateway sampled it)."""
    a, b = sides.get("PROD") or {}, sides.get("CONS") or {}

    def leg(name: str, *seen: dict | None) -> dict[str, Any]:
        got = [x for x in seen if x]
        if not got:
            return {"hop": name, "rate_bps": None, "rtt_ms": None, "retrans_pct": None}
        rate = max(max(x.get("sent_bps", 0), x.get("received_bps", 0)) for x in got)
        rtt = max(x.get("rtt_ms") or 0.0 for x in got)
        return {"hop": name, "rate_bps": rate, "rtt_ms": rtt,
                "retrans_pct": max(x.get("retrans_pct", 0.0) for x in got)}

    lan_a, lan_b = leg("A's LAN", a.get("lan")), leg("B's LAN", b.get("lan"))
    wan = leg("WAN", a.get("wan"), b.get("wan"))
    return [{"hop": "producer", "rate_bps": lan_a["rate_bps"], "rtt_ms": None, "retrans_pct": None},
            lan_a, wan, lan_b,
            {"hop": "consumer", "rate_bps": lan_b["rate_bps"], "rtt_ms": None, "retrans_pct": None}]
