"""Prometheus metrics of one control server, served over HTTP on ``--metrics-port``.

What is exported (all prefixed ``scistream_``):

    sessions{state}                     gauge    live sessions: requested, ready, connected
    sessions_ended_total{state}         counter  sessions ended: released, expired, failed
    bytes_forwarded_total{direction}    counter  to_producer / to_consumer, every session
    session_bytes_forwarded_total{uid,role,direction}  counter  the same per live session
    connections                         gauge    connections open through the data servers
    connections_refused_total           counter  refused by the per-session cap (--max-session-conns)
    session_setup_seconds               histogram  req -> connected
    udp_datagrams_total{direction}      counter  UDP datagrams carried, to_producer / to_consumer
    udp_bytes_total{direction}          counter  their bytes (payload)
    udp_drops_total{cause}              counter  datagrams dropped: flow_limit, rate, send, forged,
                                                 replayed, truncated, foreign, kernel (a full
                                                 receive buffer of a listener)
    udp_flows                           gauge    UDP flows open through the data servers
    udp_over_mtu_total                  counter  sealed datagrams larger than the path MTU (fragmented)
    rpc_calls_total{method,code}        counter  every RPC answered, by status code
    rpc_errors_total{method,code}       counter  the ones that failed
    ports{state}, bandwidth_kbps{state} gauge    pool use: used / free, used / max

Per-hop telemetry of each live session on this gateway (labels ``uid``, ``role``, ``leg``:
``lan`` or ``wan``; never one per connection), from the data server's TCP_INFO samples:

    session_leg_rtt_seconds                      gauge  smoothed round trip (mean of the connections)
    session_leg_rate_bps{direction}              gauge  sent / received in the last second (sum)
    session_leg_delivery_rate_bps                gauge  the kernel's estimate of what the path delivers
    session_leg_cwnd_segments                    gauge  congestion window (mean)
    session_leg_retransmit_ratio                 gauge  segments sent again / sent, last second
    session_leg_retransmits_total                counter  since the open connections began
    session_leg_limited_ratio{cause}             gauge  share of the last second the sender was held
                                                        by rwnd, sndbuf, cwnd (the network) or app
    session_bottleneck{uid,role,hop}             gauge  1 for the hop this gateway sees limiting
                                                        (producer, a_lan, wan, b_lan, consumer, none)

A facility's control server (``s2cs --facility``) exports the facility's sessions, read
from the store at each scrape (every instance shows the same: aggregate with ``max``),
the pool gauges summed over the nodes, and per node (label ``node``): ``node_up``,
``node_sessions``, ``node_ports_used``, ``node_bandwidth_kbps``,
``node_heartbeat_age_seconds``, ``node_connections``, ``node_bytes_forwarded_total``;
``store_up`` is 0 when the store did not answer the scrape.

The byte and connection counts come from the data servers, asked right before each scrape
(in parallel, bounded), on the event loop: no thread, no sampling interval to tune.
Each server has its own ``CollectorRegistry``, so several can run in one process.

    metrics = Metrics(registry)
    registry.observers.append(metrics.event)
    http = await metrics.serve("127.0.0.1", 9464)    # GET /metrics
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..data.spec import Stats
from ..data.telemetry import verdict
from .sessions import S, Session, SessionRegistry, add_stats

log = logging.getLogger(__name__)

UDP_DROPS = ("flow_limit", "rate", "send", "forged", "replayed", "truncated", "foreign", "kernel")
SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_ENDED = {"release": "released", "released": "released", "expired": "expired", "failed": "failed"}


def _pools(ports_help: str, ports_used: int, ports_free: int, bw_used: int, bw_max: int):
    """The port and bandwidth pool gauges (of one gateway, or summed over a facility's nodes)."""
    p = GaugeMetricFamily("scistream_ports", ports_help, labels=["state"])
    p.add_metric(["used"], ports_used)
    p.add_metric(["free"], ports_free)
    b = GaugeMetricFamily("scistream_bandwidth_kbps", "Admitted bandwidth (max 0 = unlimited)", labels=["state"])
    b.add_metric(["used"], bw_used)
    b.add_metric(["max"], bw_max)
    return p, b


class Metrics:
    """The registry's observer (``event``) and the RPCs' counter (``call``); a
    collector of what is read from the registry at scrape time (``collect``)."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry
        self.prom = CollectorRegistry(auto_describe=True)
        self.rpc_calls = Counter("scistream_rpc_calls", "RPCs answered, by method and status code",
                                 ["method", "code"], registry=self.prom)
        self.rpc_errors = Counter("scistream_rpc_errors", "RPCs that failed, by method and status code",
                                  ["method", "code"], registry=self.prom)
        self.setup = Histogram("scistream_session_setup_seconds", "Seconds from req to connected",
                               buckets=SETUP_BUCKETS, registry=self.prom)
        self.ended = Counter("scistream_sessions_ended", "Sessions ended, by final state", ["state"],
                             registry=self.prom)
        for state in ("released", "expired", "failed"):
            self.ended.labels(state)
        self.ended_stats = Stats()    # what the sessions that ended carried (nothing open)
        self.view: tuple[list[Session], list[dict]] | None = None   # a facility's, at the last scrape
        self.prom.register(self)
        self._server: asyncio.AbstractServer | None = None

    # -- hooks ---------------------------------------------------------------------------
    def call(self, method: str, code: str) -> None:
        """An RPC answered with ``code`` (a status code's name)."""
        self.rpc_calls.labels(method, code).inc()
        if code != "OK":
            self.rpc_errors.labels(method, code).inc()

    def event(self, event: str, session: Session, detail: str) -> None:
        """Registry observer."""
        if event == "connected" and session.connected_at:
            self.setup.observe(max(0.0, session.connected_at - session.created))
        elif event in _ENDED and session.state.value == _ENDED[event]:
            self.ended.labels(session.state.value).inc()
            st = session.total_stats()
            self.ended_stats = add_stats(self.ended_stats, dataclasses.replace(
                st, connections=0, udp={k: v for k, v in st.udp.items() if k != "flows"}))

    # -- scrape ----------------------------------------------------------------------------
    def collect(self):
        reg = self.registry
        facility = hasattr(reg, "facility_view")
        view = self.view
        if facility:
            yield GaugeMetricFamily("scistream_store_up", "1 if the facility's store answered the last scrape",
                                    value=0 if view is None else 1)
        live = list(reg.active.values()) if not facility else (view[0] if view else [])
        by_state = {s.value: 0 for s in (S.REQUESTED, S.READY, S.CONNECTED)}
        total = self.ended_stats
        per = CounterMetricFamily("scistream_session_bytes_forwarded",
                                  "Bytes carried by each live session's data server",
                                  labels=["uid", "role", "direction"])
        for s in live:
            by_state[s.state.value] = by_state.get(s.state.value, 0) + 1
            st = s.total_stats()
            total = add_stats(total, st)
            per.add_metric([s.uid, s.role, "to_producer"], st.bytes_in)
            per.add_metric([s.uid, s.role, "to_consumer"], st.bytes_out)
        g = GaugeMetricFamily("scistream_sessions", "Live sessions by state", labels=["state"])
        for state, n in by_state.items():
            g.add_metric([state], n)
        yield g
        c = CounterMetricFamily("scistream_bytes_forwarded", "Bytes carried by the data servers",
                                labels=["direction"])
        c.add_metric(["to_producer"], total.bytes_in)
        c.add_metric(["to_consumer"], total.bytes_out)
        yield c
        yield per
        yield GaugeMetricFamily("scistream_connections", "Connections open through the data servers",
                                value=total.connections)
        yield CounterMetricFamily("scistream_connections_refused",
                                  "Connections the data servers refused: over the session's cap "
                                  "(--max-session-conns)", value=total.refused_connections)
        yield CounterMetricFamily("scistream_streams_cut",
                                  "Streams whose end a data server may have dropped at a half-close "
                                  "(Stunnel: streams it gave up waiting on; the ends it dropped with "
                                  "SCISTREAM_STUNNEL_RELAY=off)", value=total.cut_streams)
        yield from self._legs(live)
        yield from self._udp(total.udp)
        if facility:
            yield from self._nodes(live, view[1] if view else [])
            return
        yield from _pools("Data ports of --port-range", len(reg.ports.used), reg.ports.free_count,
                          reg.bandwidth.used, reg.bandwidth.max)

    @staticmethod
    def _legs(live: list[Session]):
        """Each live session's legs on this gateway (bounded labels: uid, role, leg)."""
        labels = ["uid", "role", "leg"]
        fams = {
            "rtt": GaugeMetricFamily("scistream_session_leg_rtt_seconds", "Smoothed round trip of a session's "
                                     "leg (TCP_INFO, mean over its connections)", labels=labels),
            "rate": GaugeMetricFamily("scistream_session_leg_rate_bps", "Bits per second sent / received on a "
                                      "session's leg in the last sample interval", labels=labels + ["direction"]),
            "delivery": GaugeMetricFamily("scistream_session_leg_delivery_rate_bps", "The kernel's estimate of "
                                          "the rate a session's leg delivers (sum)", labels=labels),
            "cwnd": GaugeMetricFamily("scistream_session_leg_cwnd_segments", "Congestion window of a session's "
                                      "leg (mean, segments)", labels=labels),
            "retrans": GaugeMetricFamily("scistream_session_leg_retransmit_ratio", "Segments sent again over "
                                         "segments sent on a session's leg, last interval", labels=labels),
            "limited": GaugeMetricFamily("scistream_session_leg_limited_ratio", "Share of the last interval the "
                                         "leg's sender was held back, by cause: rwnd (the receiver), sndbuf (its "
                                         "send buffer), cwnd (the network), app (nothing to send)",
                                         labels=labels + ["cause"]),
        }
        total = CounterMetricFamily("scistream_session_leg_retransmits", "Segments sent again on a session's "
                                    "leg since its open connections began", labels=labels)
        hop = GaugeMetricFamily("scistream_session_bottleneck", "1 for the hop this gateway sees holding the "
                                "session back", labels=["uid", "role", "hop"])
        for s in live:
            if not s.legs:
                continue
            for name, leg in s.legs.items():
                key = [s.uid, s.role, name]
                fams["rtt"].add_metric(key, leg["rtt_ms"] / 1000)
                fams["rate"].add_metric(key + ["sent"], leg["sent_bps"])
                fams["rate"].add_metric(key + ["received"], leg["received_bps"])
                fams["delivery"].add_metric(key, leg["delivery_rate_bps"])
                fams["cwnd"].add_metric(key, leg["cwnd"])
                fams["retrans"].add_metric(key, leg["retrans_pct"] / 100)
                for cause in ("rwnd", "sndbuf", "cwnd", "app"):
                    fams["limited"].add_metric(key + [cause], leg[f"{cause}_limited"])
                total.add_metric(key, leg["total_retrans"])
            hop.add_metric([s.uid, s.role, verdict({s.role: s.legs})[0]], 1)
        yield from fams.values()
        yield total
        yield hop

    @staticmethod
    def _udp(udp: dict[str, int]):
        """The UDP counters of every session (ended ones included; ``flows``: open now)."""
        for what, unit in (("datagrams", "datagrams"), ("bytes", "bytes")):
            c = CounterMetricFamily(f"scistream_udp_{what}", f"UDP {unit} carried by the data servers",
                                    labels=["direction"])
            c.add_metric(["to_producer"], udp.get(f"{what}_in", 0))
            c.add_metric(["to_consumer"], udp.get(f"{what}_out", 0))
            yield c
        d = CounterMetricFamily("scistream_udp_drops", "UDP datagrams the data servers dropped, by cause",
                                labels=["cause"])
        for cause in UDP_DROPS:
            d.add_metric([cause], udp.get(f"drops_{cause}", 0))
        yield d
        yield GaugeMetricFamily("scistream_udp_flows", "UDP flows open through the data servers",
                                value=udp.get("flows", 0))
        yield CounterMetricFamily("scistream_udp_over_mtu", "Sealed UDP datagrams larger than the path "
                                  "MTU (sent, fragmented by the kernel)", value=udp.get("over_mtu", 0))

    @staticmethod
    def _nodes(live: list[Session], nodes: list[dict]):
        """A facility (s2cs --facility): the same pool gauges summed over its nodes, and each
        node's own, labelled ``node``."""
        used = sum(n["ports_used"] for n in nodes)
        yield from _pools("Data ports of the facility's nodes", used, sum(n["ports_total"] for n in nodes) - used,
                          sum(n["bandwidth_used_kbps"] for n in nodes), sum(n["max_rate_kbps"] for n in nodes))
        carried = {n["name"]: Stats() for n in nodes}
        for s in live:
            if s.node in carried:
                carried[s.node] = add_stats(carried[s.node], s.total_stats())
        for metric, text, value in (
                ("up", "1: the node is up and takes sessions; 0: lost, late or drained",
                 lambda n: 1 if n["state"] == "up" else 0),
                ("sessions", "Live sessions on the node", lambda n: n["sessions"]),
                ("ports_used", "Ports reserved on the node", lambda n: n["ports_used"]),
                ("bandwidth_kbps", "Bandwidth admitted on the node", lambda n: n["bandwidth_used_kbps"]),
                ("heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                 lambda n: n["heartbeat_age_s"]),
                ("connections", "Connections open on the node", lambda n: carried[n["name"]].connections)):
            g = GaugeMetricFamily(f"scistream_node_{metric}", text, labels=["node"])
            for n in nodes:
                g.add_metric([n["name"]], value(n))
            yield g
        c = CounterMetricFamily("scistream_node_bytes_forwarded", "Bytes carried by the node's live "
                                "sessions", labels=["node", "direction"])
        for n in nodes:
            c.add_metric([n["name"], "to_producer"], carried[n["name"]].bytes_in)
            c.add_metric([n["name"], "to_consumer"], carried[n["name"]].bytes_out)
        yield c

    async def refresh(self) -> None:
        """Ask every live data server for its counters (bounded in time and in parallel); a
        facility's control server reads its sessions and nodes from the store."""
        if hasattr(self.registry, "facility_view"):
            try:
                self.view = await asyncio.wait_for(self.registry.facility_view(), 5.0)
            except Exception as exc:  # noqa: BLE001 - a scrape says the store is down, it does not fail
                log.warning("metrics: cannot read the facility's store: %s", exc)
                self.view = None
            return
        await self.registry.refresh_stats(5.0)

    # -- HTTP ----------------------------------------------------------------------------
    async def serve(self, host: str, port: int) -> int:
        """Serve ``GET /metrics`` on host:port (0: any free port); return the bound port."""
        self._server = await asyncio.start_server(self._http, host, port, limit=16384)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (parts + ["", ""])[:2]
            path = path.split("?", 1)[0]
            ctype = "text/plain; charset=utf-8"
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"GET /metrics\n"
            elif path == "/metrics":
                await self.refresh()
                status, body, ctype = "200 OK", generate_latest(self.prom), CONTENT_TYPE_LATEST
            elif path == "/":
                status, body = "200 OK", b"scistream control server metrics: GET /metrics\n"
            else:
                status, body = "404 Not Found", b"not found; GET /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError, ValueError):
            pass
        except Exception:  # a scrape must never take the server down
            log.exception("metrics request failed")
        finally:
            writer.close()
