"""deploy/grafana-dashboard.json asks only for metrics a real control server serves."""
from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from conftest import async_wait_until, connect_session, echo_roundtrip, new_uid, parse_listener
from scistream import errors
from test_metrics import scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
NAME = re.compile(r"\bscistream_[a-zA-Z0-9_]+")


def queries(dash: dict) -> list[str]:
    found = []
    for panel in dash["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        found += [t["expr"] for t in panel["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            found.append(q["query"] if isinstance(q, dict) else q)
    return found


async def test_every_query_names_a_served_metric(servers, client_for, echo_server):
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    prod = await servers(metrics_port=0)
    cons = await servers()
    uid, _, cons_resp = await connect_session(client_for(prod), client_for(cons),
                                              "%s:%d" % echo_server, num_conn=1)
    payload = os.urandom(1 << 20)
    assert await echo_roundtrip(*parse_listener(cons_resp.listeners[0]), payload) == payload
    with pytest.raises(errors.NotFound):     # one error, so errors by code has a series
        await client_for(prod).release(new_uid())
    # a connection that stays open and carries bytes, so the legs' telemetry has samples
    r, w = await asyncio.open_connection(*parse_listener(cons_resp.listeners[0]))
    streamed = 0
    try:
        async def sampled():
            nonlocal streamed
            block = os.urandom(1 << 16)
            w.write(block)
            await w.drain()
            assert await r.readexactly(len(block)) == block
            streamed += len(block)
            _, got = await scrape(prod.metrics_port)
            return got if any(n == "scistream_session_leg_limited_ratio" for n, _ in got) else None
        samples = await async_wait_until(sampled, 20, "the legs' telemetry in the metrics")
    finally:
        w.close()
    served = {name for name, _ in samples}
    asked = {n for q in queries(dash) for n in NAME.findall(q)}
    missing = asked - served
    assert not missing, f"the dashboard asks for metrics /metrics does not serve: {sorted(missing)}"
    # and it covers what operators look at: states, throughput in total and per session,
    # the setup time histogram, errors by code
    assert {"scistream_sessions", "scistream_bytes_forwarded_total",
            "scistream_session_bytes_forwarded_total", "scistream_session_setup_seconds_bucket",
            "scistream_rpc_errors_total", "scistream_session_leg_rtt_seconds",
            "scistream_session_leg_limited_ratio", "scistream_session_bottleneck"} <= asked
    per_session = {labels for name, labels in samples if name == "scistream_session_bytes_forwarded_total"}
    assert (("direction", "to_consumer"), ("role", "PROD"), ("uid", uid)) in per_session
    assert samples[("scistream_session_bytes_forwarded_total",
                    (("direction", "to_consumer"), ("role", "PROD"), ("uid", uid)))] == len(payload) + streamed
    await client_for(cons).release(uid)
    await client_for(prod).release(uid)
