"""Per-hop telemetry of a live session on loopback (Builtin): every leg of both gateways
is sampled, reaches status (the RPC, ``s2uc status --json``, the Python API) and
Prometheus, and is gone once the session ends."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket

import pytest

from conftest import async_wait_until, connect_session, parse_listener
from scistream.client import SessionStatus, chain
from scistream.data.base import BackendUnavailable, get_backend
from scistream.data.engine import tcpinfo
from test_status import s2uc


async def _stream(listener: str, stop: asyncio.Event) -> int:
    """Send random bytes through the chain to the echo application and read them back until
    ``stop``; the bytes that came back, checked against what was sent."""
    r, w = await asyncio.open_connection(*parse_listener(listener))
    sent = bytearray()
    got = 0

    async def reader() -> None:
        nonlocal got
        while chunk := await r.read(1 << 16):
            assert chunk == sent[got:got + len(chunk)]
            got += len(chunk)

    task = asyncio.create_task(reader())
    try:
        while not stop.is_set():
            block = os.urandom(1 << 16)
            sent += block
            w.write(block)
            await w.drain()
            if len(sent) - got > 32 << 20:      # keep what is in flight bounded
                await asyncio.sleep(0.01)
        w.write_eof()
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        w.close()
    assert got == len(sent)
    return got


def test_tcp_info_of_a_real_socket():
    """The parsed struct agrees with what the socket did: bytes acknowledged, an RTT."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        with c, s:
            sampler = tcpinfo.LegSampler()
            first = sampler.sample(c, 100.0)
            assert first is not None and "interval_s" not in first
            c.sendall(b"x" * 200_000)
            got = 0
            while got < 200_000:
                got += len(s.recv(1 << 16))
            now = tcpinfo.read(c)
            assert now is not None and now["bytes_acked"] >= 200_000
            later = sampler.sample(c, 101.0)
            assert later["interval_s"] == 1.0 and later["sent_bps"] >= 200_000 * 8 * 0.99
            assert later["rtt_ms"] > 0 and later["cwnd"] > 0 and later["mss"] > 0
            rx = tcpinfo.read(s)
            assert rx["bytes_received"] == 200_000
            shares = [later[k] for k in ("rwnd_limited", "sndbuf_limited", "cwnd_limited", "app_limited")]
            assert all(0 <= x <= 1 for x in shares) and abs(sum(shares) - 1) < 0.01


@pytest.mark.parametrize("server_type", ["Builtin", "Haproxy", "Nginx", "Stunnel"])
async def test_every_leg_of_a_live_session(servers, client_for, echo_server, tmp_path, server_type):
    """Builtin samples its sockets itself; the external proxies' sockets are read from
    outside (``ss``): the same legs, the same fields."""
    try:
        get_backend(server_type).check_available()
    except BackendUnavailable as exc:
        pytest.skip(f"{server_type} cannot run here: {exc}")
    prod = await servers(metrics_port=0, server_type=server_type)
    cons = await servers(server_type=server_type)
    pc, cc = client_for(prod), client_for(cons)
    uid, p, c = await connect_session(pc, cc, f"{echo_server[0]}:{echo_server[1]}", num_conn=2)
    stop = asyncio.Event()
    streams = [asyncio.create_task(_stream(listener, stop)) for listener in c.listeners]
    try:
        async def sampled() -> list[SessionStatus] | None:
            got = [SessionStatus.from_pb(s) for cl in (pc, cc) for s in (await cl.status(uid)).sessions]
            ok = all(set(s.legs) == {"lan", "wan"} and all(leg["sampled"] and leg["connections"] == 2
                                                           and leg["sent_bps"] > 0 and leg["received_bps"] > 0
                                                           and leg["rtt_ms"] > 0 and leg["cwnd"] > 0
                                                           for leg in s.legs.values())
                     for s in got)
            return got if ok and len(got) == 2 else None

        statuses = await async_wait_until(sampled, timeout=20, what="both legs sampled on both gateways")
        for s in statuses:
            assert s.bottleneck and s.bottleneck not in ("no sample yet", "no connection open")
        whole = chain(statuses)
        assert [h["hop"] for h in whole["hops"]] == ["producer", "A's LAN", "WAN", "B's LAN", "consumer"]
        assert all(h["rate_bps"] > 0 for h in whole["hops"])
        assert whole["hop"] in ("producer", "a_lan", "wan", "b_lan", "consumer") and whole["bottleneck"]

        code, out, err = await s2uc("status", uid, "--s2cs", prod.target, "--s2cs", cons.target,
                                    "--insecure", "--json")
        assert code == 0, err
        rows = json.loads(out)
        assert {d["role"] for d in rows} == {"PROD", "CONS"}
        for d in rows:
            assert set(d["legs"]) == {"lan", "wan"} and d["legs"]["wan"]["connections"] == 2
            assert [h["hop"] for h in d["chain"]["hops"]][2] == "WAN" and d["chain"]["sides"] == ["CONS", "PROD"]
        code, out, err = await s2uc("status", uid, "--s2cs", prod.target, "--s2cs", cons.target, "--insecure")
        assert code == 0, err
        for text in ("A's LAN leg", "WAN leg (A)", "WAN leg (B)", "B's LAN leg", "chain", "bottleneck",
                     "producer", "consumer"):
            assert text in out, (text, out)

        reader, writer = await asyncio.open_connection("127.0.0.1", prod.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(-1), 10)).decode()
        writer.close()
        for leg in ("lan", "wan"):
            assert f'scistream_session_leg_rtt_seconds{{leg="{leg}",role="PROD",uid="{uid}"}}' in text
        assert "scistream_session_bottleneck{" in text and 'conn' not in text.split("scistream_session_leg")[1][:80]
    finally:
        stop.set()
        carried = await asyncio.gather(*streams)
    assert all(n > 0 for n in carried)
    await pc.release(uid)
    await cc.release(uid)
    (ps,) = (await pc.status(uid)).sessions
    assert ps.state == "released" and not ps.legs and not ps.bottleneck


def test_ss_reads_what_tcp_info_says():
    """The external proxies' reading (``ss`` from outside) agrees with the socket's own
    TCP_INFO: the same connection, found by its port, with its counters."""
    import subprocess
    from scistream.data.backends.sockets import parse_ss
    with socket.create_server(("127.0.0.1", 0)) as ls:
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        with c, s:
            c.sendall(b"y" * 300_000)
            got = 0
            while got < 300_000:
                got += len(s.recv(1 << 16))
            port = ls.getsockname()[1]
            text = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout
            mine = tcpinfo.read(c)
            (key, info), = parse_ss(text).items()
            assert key == (f"127.0.0.1:{c.getsockname()[1]}", f"127.0.0.1:{port}")
            assert info["bytes_acked"] == mine["bytes_acked"] >= 300_000
            assert info["snd_cwnd"] == mine["snd_cwnd"] and info["snd_mss"] == mine["snd_mss"]
            assert info["data_segs_out"] == mine["data_segs_out"] > 0
            assert abs(info["busy_time"] - mine["busy_time"]) < 2000     # ss prints milliseconds


def _leg(**kw):
    base = {"connections": 1, "rtt_ms": 50.0, "min_rtt_ms": 50.0, "rcv_rtt_ms": 0.0, "cwnd": 100, "mss": 1448,
            "delivery_rate_bps": 0, "sent_bps": 10**8, "received_bps": 0, "retrans": 0, "segs_sent": 1000,
            "retrans_pct": 0.0, "total_retrans": 0, "sampled": True, "busy": 1.0, "rwnd_limited": 0.0,
            "sndbuf_limited": 0.0, "cwnd_limited": 0.0, "app_limited": 0.0}
    return {**base, **kw}


def test_verdict_rules():
    """The rules the testbed cannot make on demand: a full send buffer, one side only,
    nothing flowing, bytes towards the producer."""
    from scistream.data.telemetry import verdict
    fine_lan = _leg(rtt_ms=0.1, app_limited=1.0, busy=0.0)
    assert verdict({"PROD": {"lan": _leg(sent_bps=0, received_bps=10**8), "wan": _leg(sndbuf_limited=0.7)},
                    "CONS": {"lan": fine_lan, "wan": _leg(sent_bps=0, received_bps=10**8)}}) == (
        "wan", "the WAN leg: the send buffer of gateway A (70% of the time; raise net.ipv4.tcp_wmem for 50 ms)")
    hop, words = verdict({"PROD": {"lan": _leg(sent_bps=0, received_bps=10**8), "wan": _leg(app_limited=1.0)}})
    assert hop == "producer" and words.endswith("as far as gateway A sees (ask the other gateway for the whole chain)")
    assert verdict({"PROD": {"wan": _leg(sent_bps=0)}})[1] == "idle: nothing flows"
    assert verdict({}) == ("none", "no connection open")
    # towards the producer: the senders are B on the WAN and A on A's LAN
    up = verdict({"PROD": {"lan": _leg(rwnd_limited=0.9), "wan": _leg(sent_bps=0, received_bps=10**8)},
                  "CONS": {"lan": _leg(sent_bps=0, received_bps=10**8), "wan": _leg(rwnd_limited=0.9)}})
    assert up == ("producer", "the producer reads slowly (receive window on A's LAN leg, 90% of the time)")
