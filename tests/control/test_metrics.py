"""Prometheus metrics scraped over HTTP from a real control server while real bytes flow."""
from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import async_wait_until, echo_roundtrip, new_uid, parse_listener, port_block
from scistream import errors


async def scrape(port: int, path: str = "/metrics") -> tuple[str, dict[tuple, float]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(r.read(), 10)
    w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    samples = {}
    if path == "/metrics":
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return status, samples


def val(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_a_session(servers, client_for, echo_server):
    srv = await servers(metrics_port=0, wan_plaintext=True, port_range=port_block(10))
    assert srv.metrics_port
    c = client_for(srv)
    ep = f"{echo_server[0]}:{echo_server[1]}"
    status, m = await scrape(srv.metrics_port)
    assert status == "HTTP/1.1 200 OK"
    assert val(m, "scistream_sessions", state="connected") == 0
    assert val(m, "scistream_ports", state="free") == 10

    uid = new_uid()
    req = asyncio.create_task(c.req(uid, "PROD", 2))
    await async_wait_until(lambda: (uid, "PROD") in srv.registry.active, what="req arrived")
    _, m = await scrape(srv.metrics_port)
    assert val(m, "scistream_sessions", state="requested") == 1
    assert val(m, "scistream_ports", state="used") == 2
    await c.hello(uid, "PROD", [ep])
    resp = await req
    await c.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
    payload = os.urandom(2 << 20)
    r, w = await asyncio.open_connection(*parse_listener(resp.listeners[0]))  # held open
    w.write(b"ping")
    await w.drain()
    assert await r.readexactly(4) == b"ping"
    assert await echo_roundtrip(*parse_listener(resp.listeners[1]), payload) == payload

    _, m = await scrape(srv.metrics_port)
    assert val(m, "scistream_sessions", state="connected") == 1
    assert val(m, "scistream_sessions", state="requested") == 0
    assert val(m, "scistream_connections") == 1
    assert val(m, "scistream_bytes_forwarded_total", direction="to_producer") == len(payload) + 4
    assert val(m, "scistream_bytes_forwarded_total", direction="to_consumer") == len(payload) + 4
    assert val(m, "scistream_session_setup_seconds_count") == 1
    assert 0 < val(m, "scistream_session_setup_seconds_sum") < 60
    assert val(m, "scistream_rpc_calls_total", method="update", code="OK") == 1

    w.close()
    with pytest.raises(errors.NotFound):
        await c.release(new_uid())
    with pytest.raises(errors.InvalidArgument):
        await c.req("nope", "PROD", 1)
    await c.release(uid)
    _, m = await scrape(srv.metrics_port)
    assert val(m, "scistream_rpc_errors_total", method="release", code="NOT_FOUND") == 1
    assert val(m, "scistream_rpc_errors_total", method="req", code="INVALID_ARGUMENT") == 1
    assert val(m, "scistream_sessions_ended_total", state="released") == 1
    assert val(m, "scistream_sessions", state="connected") == 0
    assert val(m, "scistream_connections") == 0
    # bytes of ended sessions stay counted: the counter never goes down
    assert val(m, "scistream_bytes_forwarded_total", direction="to_producer") == len(payload) + 4
    assert val(m, "scistream_ports", state="free") == 10


async def test_metrics_endpoint_answers_only_what_it_should(servers):
    srv = await servers(metrics_port=0)
    status, _ = await scrape(srv.metrics_port, "/nothing")
    assert status.startswith("HTTP/1.1 404")
    r, w = await asyncio.open_connection("127.0.0.1", srv.metrics_port)
    w.write(b"POST /metrics HTTP/1.1\r\n\r\n")
    assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 405")
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", srv.metrics_port)
    w.write(b"GET /" + b"a" * 100_000)  # no end of headers: dropped, the server goes on
    assert await asyncio.wait_for(r.read(), 10) == b""
    w.close()
    status, m = await scrape(srv.metrics_port)
    assert status == "HTTP/1.1 200 OK" and ("scistream_connections", ()) in m


async def test_metrics_off_by_default_and_via_cli(servers, s2cs_process):
    srv = await servers()
    assert srv.metrics is None and srv.metrics_port == 0
    proc = await asyncio.to_thread(s2cs_process, "--metrics-port", "0", "--metrics-ip", "127.0.0.1")
    import json
    port = json.loads(proc.ready.read_text())["metrics_port"]
    status, m = await scrape(port)
    assert status == "HTTP/1.1 200 OK" and val(m, "scistream_sessions", state="ready") == 0
