"""``s2uc status`` and ``s2uc list``: what the control servers say about sessions.

    s2uc status UID --s2cs 10.0.0.2:5000 --s2cs 10.1.0.2:5000   # one session, both sides
    s2uc status UID                        # the S2CS this client used for UID (session file)
    s2uc list --s2cs 10.0.0.2:5000,10.0.0.3:5000 --s2cs 10.1.0.2:5000   # PROD: 2 instances; CONS
    s2uc list --s2cs 10.0.0.2:5000 [--active] [--json]
    s2uc status --watch --s2cs 10.0.0.2:5000   # the table, live: rates, states, leases

Both show what the server's ``status`` RPC reports - state, owner, listeners, targets,
bytes each way, average rate, age, lease left, last error - for live sessions and for
ended ones the server still remembers. Ages and leases are computed against the server's
clock, so a skewed laptop clock does not matter. ``--json`` prints one JSON array, for
scripts; the exit code is 0 only if every server answered. ``--watch`` redraws the table
every ``--interval`` seconds with the throughput of each session (from the change of its
byte counters), the terminal twin of the web view (``s2cs --web-port``); Ctrl-C ends it.

Per-hop telemetry (docs/telemetry.md): each gateway reports its session's two legs (round
trip, congestion window, retransmits, rates, what limits the sender); ``status UID``
prints them, then the chain from producer to consumer and its bottleneck read from both
gateways' answers (``--json``: ``legs``, ``bottleneck``, ``chain``); ``--watch`` adds the
legs' round trips and the bottleneck to the table.

Each ``--s2cs`` is one facility (its instances comma-separated, asked in order until one
answers): the ``server`` of the sessions it reports.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..client import sessionfile
from ..client.instances import join_instances
from ..client.model import legs_dict
from ..data.telemetry import hops as chain_hops, verdict
from ..units import bitrate, duration, size as _size
from ..errors import LocalMistake, NotFound, ScistreamError
from ..proto import pb
from ..data.spec import udp_summary
from .common import (EXIT_CODES_HELP, Exit, channel_options, client, err, error_label, exit_code,
                     handle_errors, local_uid, option, out, stacked)


def session_dict(info: pb.SessionInfo, server: str, server_time: float) -> dict[str, Any]:
    """One session as plain data: the reported fields plus what follows from them."""
    now = server_time or time.time()
    end = info.ended or now
    busy = max(0.0, end - info.connected) if info.connected else 0.0
    return {
        "server": server, "uid": info.uid, "role": info.role, "state": info.state,
        "owner": info.owner, "listeners": list(info.listeners), "targets": list(info.targets),
        "num_conn": info.num_conn, "rate_kbps": info.rate,
        "rate_enforced": not info.rate_not_enforced,
        "bytes_to_producer": info.bytes_in, "bytes_to_consumer": info.bytes_out,
        "avg_bps_to_producer": round(info.bytes_in * 8 / busy) if busy > 0 else 0,
        "avg_bps_to_consumer": round(info.bytes_out * 8 / busy) if busy > 0 else 0,
        "connections": info.connections, "total_connections": info.total_connections,
        "refused_connections": info.refused_connections, "cut_streams": info.cut_streams,
        # age: the session's life so far, or its whole life once it ended (as in the web view)
        "created": info.created, "age_s": round(max(0.0, end - info.created), 3),
        "setup_s": round(info.connected - info.created, 3) if info.connected else None,
        "lease_expires": info.lease_expires or None,
        "lease_left_s": (round(max(0.0, info.lease_expires - now), 3)
                         if info.lease_expires and not info.ended else None),
        "ended": info.ended or None, "last_error": info.last_error,
        "wan_security": info.wan_security, "server_type": info.server_type,
        "udp": info.udp, "udp_counters": dict(info.udp_counters),
        # a facility (s2cs --facility): the node carrying it, the instance that took its req
        "node": info.node, "instance": info.instance,
        # per-hop telemetry: this gateway's legs (lan, wan) and what holds the session back
        "legs": legs_dict(info), "bottleneck": info.bottleneck,
    }


def with_chains(found: list[dict]) -> list[dict]:
    """Each live session seen on both gateways gets ``chain``: its hops from producer to
    consumer with their rate and round trip, and the bottleneck read from both sides."""
    by_uid: dict[str, dict[str, dict]] = {}
    for d in found:
        if not d["ended"] and d["legs"]:
            by_uid.setdefault(d["uid"], {})[d["role"]] = d["legs"]
    for d in found:
        sides = by_uid.get(d["uid"])
        if sides and not d["ended"]:
            hop, words = verdict(sides)
            d["chain"] = {"hops": chain_hops(sides), "bottleneck": words, "hop": hop,
                          "sides": sorted(sides)}
    return found


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


async def _query(servers: list[str], uid: str, opts: dict) -> tuple[list[dict], list[tuple[str, ScistreamError]]]:
    async def one(server: str) -> list[dict]:
        async with client(server, opts["certs"].get(server), opts["insecure"], opts["token"], uid or None) as c:
            resp = await c.status(uid, timeout=opts["timeout"])
        return [session_dict(s, server, resp.server_time) for s in resp.sessions]

    results = await asyncio.gather(*(one(s) for s in servers), return_exceptions=True)
    found, failed = [], []
    for server, r in zip(servers, results):
        if isinstance(r, ScistreamError):
            failed.append((server, r))
        elif isinstance(r, BaseException):
            raise r
        else:
            found.extend(r)
    return with_chains(found), failed


def _options(s2cs: tuple[str, ...], uid: str | None, certs: tuple[str, ...], **rest) -> dict:
    """``rest`` with the servers to ask and ``certs``, each one's --server-cert: one for every
    --s2cs, or one per --s2cs in the same order."""
    if s2cs:
        servers = list(dict.fromkeys(join_instances(s) for s in s2cs))
    else:
        servers = list(dict.fromkeys(side["s2cs"] for side in sessionfile.sides(uid).values())) if uid else []
        if not servers:
            raise LocalMistake("give the control server with --s2cs HOST:PORT (repeatable)"
                               + ("" if uid is None else f"; this client has no record of session {uid}"))
    if len(certs) > 1 and len(certs) != len(servers):
        raise LocalMistake(f"{len(certs)} --server-cert for {len(servers)} --s2cs: give one for all, or one "
                           "per --s2cs in the same order; nothing was sent")
    per_server = certs if len(certs) > 1 else certs * len(servers)
    return dict(rest, servers=servers, certs=dict(zip(servers, per_server)))


def _finish(failed: list[tuple[str, ScistreamError]], found: list[dict], uid: str | None) -> None:
    worst = Exit.OK
    for server, exc in failed:
        if uid and found and isinstance(exc, NotFound):
            continue  # the other side has it: one side may have forgotten an old session
        err.print(f"[red]{escape(server)}[/] ({error_label(exc)}): {escape(str(exc))}")
        worst = max(worst, exit_code(exc))
    if worst:
        sys.exit(worst)


_common = stacked(
    channel_options(several=True),
    option("--s2cs", multiple=True, metavar="HOST:PORT[,...]", envvar="SCISTREAM_S2CS",
           help="Control server to ask (repeatable: one per facility; several instances of one "
                "facility's as HOST:PORT,HOST:PORT, asked in order until one answers; status UID "
                "defaults to the one(s) this client used for UID)."),
    option("--json", "as_json", is_flag=True, help="Print a JSON array (for scripts)."),
    option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait per server."))


@click.command("status", epilog="Example: s2uc status 6f1c... --s2cs 10.0.0.2:5000 --s2cs 10.1.0.2:5000\n\n"
                                + EXIT_CODES_HELP)
@click.argument("uid", required=False)
@option("--watch", is_flag=True, help="Redraw the table live, with each session's throughput (Ctrl-C ends).")
@option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True,
        help="Seconds between two refreshes of --watch.")
@_common
@handle_errors("status")
def status(uid, watch, interval, s2cs, as_json, timeout, server_cert, insecure, token) -> None:
    """Everything the control servers know of session UID (without UID: every session you may see)."""
    if uid:
        local_uid(uid)
    opts = _options(s2cs, uid, server_cert, insecure=insecure, token=token, timeout=timeout)
    servers = opts["servers"]
    if watch:
        if as_json:
            raise LocalMistake("--watch draws a live table; use --json without --watch")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_watch(servers, uid or "", opts, interval))
        return
    found, failed = asyncio.run(_query(servers, uid or "", opts))
    if as_json:
        click.echo(json.dumps(found, indent=1))
    elif uid:
        for d in found:
            _print_one(d)
        if (chained := next((d for d in found if d.get("chain")), None)) is not None:
            _print_chain(chained)
    elif found or not failed:
        _print_table(found)
    _finish(failed, found, uid)
    if uid and not found and not failed:
        sys.exit(Exit.REFUSED)


@click.command("list", epilog="Example: s2uc list --s2cs 10.0.0.2:5000 --active --json")
@option("--active", is_flag=True, help="Live sessions only (not the ended ones the server remembers).")
@_common
@handle_errors("list")
def list_sessions(active, s2cs, as_json, timeout, server_cert, insecure, token) -> None:
    """One line per session you may see on the control servers, live ones first."""
    opts = _options(s2cs, None, server_cert, insecure=insecure, token=token, timeout=timeout)
    found, failed = asyncio.run(_query(opts["servers"], "", opts))
    if active:
        found = [d for d in found if not d["ended"]]
    if as_json:
        click.echo(json.dumps(found, indent=1))
    elif found or not failed:
        _print_table(found)
    _finish(failed, found, None)


def _print_rows(rows: list[tuple[str, object]]) -> None:
    """LABEL value lines, one borderless table, then a blank line."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    out.print(t)
    out.print()


def _print_one(d: dict) -> None:
    lease = ("unlimited" if not d["lease_expires"] else
             f"{duration(d['lease_left_s'])} left (ends {_when(d['lease_expires'])})"
             if d["lease_left_s"] is not None else f"ended {_when(d['lease_expires'])}")
    _print_rows([
        ("session", f"{d['uid']} {d['role']} on {d['server']}"),
        ("state", d["state"] + (f" since {_when(d['ended'])}" if d["ended"] else "")),
        ("owner", d["owner"]),
        ("listeners", " ".join(d["listeners"]) or "-"),
        ("targets", " ".join(d["targets"]) or "-"),
        ("to producer", f"{_size(d['bytes_to_producer'])} ({d['bytes_to_producer']} B, avg "
                        f"{bitrate(d['avg_bps_to_producer'])})"),
        ("to consumer", f"{_size(d['bytes_to_consumer'])} ({d['bytes_to_consumer']} B, avg "
                        f"{bitrate(d['avg_bps_to_consumer'])})"),
        ("connections", f"{d['connections']} open, {d['total_connections']} in all, {d['num_conn']} slots"
                        + (f", {d['refused_connections']} refused (over the cap)" if d["refused_connections"] else "")
                        + (f", {d['cut_streams']} CUT at a half-close (end possibly lost)"
                           if d["cut_streams"] else "")),
        ("rate cap", _rate_cap(d)),
        ("age", f"{duration(d['age_s'])} (created {_when(d['created'])})"),
        ("setup", f"{d['setup_s']:.3f} s req -> connected" if d["setup_s"] is not None else "-"),
        ("lease", lease),
        ("WAN leg", f"{d['wan_security'] or '-'} ({d['server_type']})"),
        ("UDP", udp_summary(d.get("udp", ""), d.get("udp_counters") or {})),
        *([("node", f"{d['node']} (req taken by {d['instance'] or '-'})")] if d.get("node") else []),
        ("last error", d["last_error"] or "-"),
        *_telemetry_rows(d),
    ])


_LEG_NAMES = {("PROD", "lan"): "A's LAN leg", ("PROD", "wan"): "WAN leg (A)",
              ("CONS", "wan"): "WAN leg (B)", ("CONS", "lan"): "B's LAN leg"}


def _leg_text(leg: dict) -> str:
    rate = max(leg.get("sent_bps", 0), leg.get("received_bps", 0))
    text = (f"{bitrate(int(rate))}, rtt {leg['rtt_ms']:.2f} ms, cwnd {leg['cwnd']}, "
            f"{leg['retrans_pct']:.2g}% retransmits, {leg['connections']} conn")
    if leg.get("sent_bps"):
        text += (f"; sender limited by: receive window {leg['rwnd_limited']:.0%}, send buffer "
                 f"{leg['sndbuf_limited']:.0%}, network {leg['cwnd_limited']:.0%}, "
                 f"nothing to send {leg['app_limited']:.0%}")
    return text


def _telemetry_rows(d: dict) -> list[tuple[str, str]]:
    first = "lan" if d["role"] == "PROD" else "wan"     # in the order the bytes go to the consumer
    rows = [(_LEG_NAMES.get((d["role"], name), name), _leg_text(leg))
            for name, leg in sorted(d.get("legs", {}).items(), key=lambda x: x[0] != first)]
    if d.get("bottleneck") and not d.get("chain"):
        rows.append(("bottleneck", d["bottleneck"] + " (this gateway's view)"))
    return rows


def _print_chain(d: dict) -> None:
    """The session's chain, hop by hop, and what holds it back (both gateways' view)."""
    chain = d["chain"]
    hops = " -> ".join(f"{h['hop']} {bitrate(int(h['rate_bps'])) if h['rate_bps'] is not None else '?'}"
                       + (f" ({h['rtt_ms']:.1f} ms)" if h.get("rtt_ms") else "") for h in chain["hops"])
    _print_rows([("chain", hops), ("bottleneck", chain["bottleneck"]
                                   + ("" if len(chain["sides"]) == 2 else " (one gateway's view)"))])


def _rate_cap(d: dict, short: bool = False) -> str:
    if not d["rate_kbps"]:
        return "none" if not short else "-"
    cap = f"{d['rate_kbps']} kbit/s"
    if d["rate_enforced"]:
        return cap
    if short:
        return f"{cap} NOT ENFORCED"
    return (f"{cap}, NOT ENFORCED (a client of the original tooling, which never enforced it; "
            "s2cs --enforce-legacy-rate enforces it)")


# the table's columns, in their order, and which go first when the terminal is too narrow
# for all (the uid and the state are never cut: they are what the user copies and checks)
_COLUMNS = ("uid", "role", "state", "owner", "age", "lease left", "conns", "to producer", "to consumer",
            "rtt", "bottleneck", "rate cap", "WAN", "server", "last error")
_KEEP_FIRST = ("uid", "state", "role", "to consumer", "to producer", "conns", "bottleneck", "rtt", "age",
               "last error", "server", "lease left", "owner", "rate cap", "WAN")


def _row(d: dict, rates: dict | None) -> dict[str, str]:
    live = not d["ended"]
    flow = [_size(d["bytes_to_producer"]), _size(d["bytes_to_consumer"])]
    if rates is not None and live:   # --watch: the throughput now, then the bytes so far
        r_in, r_out = rates.get((d["server"], d["uid"], d["role"], d["created"]), (0.0, 0.0))
        flow = [f"{bitrate(int(r_in))} ({flow[0]})", f"{bitrate(int(r_out))} ({flow[1]})"]
    return {"uid": d["uid"], "role": d["role"], "state": d["state"], "owner": escape(d["owner"]),
            "age": duration(d["age_s"]),
            "lease left": duration(d["lease_left_s"]) if d["lease_expires"] and live else "-",
            "conns": f"{d['connections']}/{d['total_connections']}",
            "to producer": flow[0], "to consumer": flow[1],
            "rate cap": _rate_cap(d, short=True), "WAN": d["wan_security"] or "-",
            "rtt": " ".join(f"{k} {v['rtt_ms']:.1f}ms" for k, v in sorted(d.get("legs", {}).items())) if live else "",
            "bottleneck": escape((d.get("chain") or {}).get("bottleneck") or d.get("bottleneck") or "") if live else "",
            "server": d["server"] + (f" @{d['node']}" if d.get("node") else ""),
            "last error": escape(d["last_error"][:120]) or "-"}


def _table(found: list[dict], rates: dict | None = None, width: int | None = None, **kw) -> Table:
    """The sessions, one row each, live ones first: the same columns for ``status``,
    ``list`` and ``status --watch`` (which shows each live session's throughput now before
    its byte counts). Columns that do not fit the terminal's width are left out, the least
    needed first (see _KEEP_FIRST); the uid and the state are never cut."""
    rows = [_row(d, rates) for d in sorted(found, key=lambda d: (d["ended"] is not None,
                                                                -(d["ended"] or 0), -d["created"]))]
    width = width or out.width
    need = {c: max([len(c)] + [len(r[c]) for r in rows]) + 3 for c in _COLUMNS}
    shown, used = set(), 1
    for c in _KEEP_FIRST:
        want = need[c] if c not in ("last error", "bottleneck") else min(need[c], 24)
        if c in ("uid", "state", "role") or used + want <= width:
            shown.add(c)
            used += want
    t = Table(**kw)
    for c in _COLUMNS:
        if c in shown:
            t.add_column(c, no_wrap=c in ("uid", "state", "role"),
                         overflow="fold" if c in ("last error", "bottleneck") else "ellipsis",
                         min_width=need[c] - 3 if c in ("uid", "state") else None)
    for r in rows:
        t.add_row(*(r[c] for c in _COLUMNS if c in shown))
    return t


def _print_table(found: list[dict]) -> None:
    out.print(_table(found) if found else "no sessions")


async def _watch(servers: list[str], uid: str, opts: dict, interval: float) -> None:
    """Poll every ``interval`` seconds and redraw; the first poll fails like ``status`` does."""
    found, failed = await _query(servers, uid, opts)
    if len(failed) == len(servers):   # none answered
        _finish(failed, found, uid or None)
    seen: dict[tuple, tuple[float, int, int]] = {}
    rates: dict[tuple, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()
    with Live(console=out, auto_refresh=False, redirect_stderr=False) as live:
        while True:
            now = loop.time()
            for d in found:
                key = (d["server"], d["uid"], d["role"], d["created"])
                before = seen.get(key)
                if before is not None and now > before[0]:
                    dt = now - before[0]
                    rates[key] = (max(0, d["bytes_to_producer"] - before[1]) * 8 / dt,
                                  max(0, d["bytes_to_consumer"] - before[2]) * 8 / dt)
                seen[key] = (now, d["bytes_to_producer"], d["bytes_to_consumer"])
            live.update(_watch_table(found, rates, failed, interval), refresh=True)
            await asyncio.sleep(max(0.0, interval - (loop.time() - now)))
            found, failed = await _query(servers, uid, opts)


def _watch_table(found: list[dict], rates: dict, failed: list, interval: float, width: int | None = None) -> Table:
    states: dict[str, int] = {}
    for d in found:
        states[d["state"]] = states.get(d["state"], 0) + 1
    title = (f"{len(found)} session(s): " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
             if found else "no sessions")
    return _table(found, rates, width, title=title + f"  (every {interval:g} s; Ctrl-C ends)",
                  caption=" ".join(f"[red]{escape(s)}: {escape(str(e))}[/]" for s, e in failed) or None)


status_commands = [status, list_sessions]
