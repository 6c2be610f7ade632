"""Per-hop telemetry names the hop that holds a session back, over the emulated WAN: each of
three hops is made the bottleneck in turn (a consumer that reads slowly, a lossy WAN, a
producer that sends slowly) and what both gateways' status says must name it. Real
control servers on the gateways (Builtin, which samples its sockets itself, and HAProxy,
Nginx and stunnel, whose sockets are read from outside), a real session, every byte
checked by the consumer; bounded in time, the namespaces removed afterwards."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from pathlib import Path

import pytest

from nshelpers import PY, built, needs_testbed, run_in, spawn, start_s2cs, wait_for
from scistream.data.base import BackendUnavailable, get_backend
from scistream.netns import Testbed, WanSpec

pytestmark = needs_testbed

HELPER = str(Path(__file__).with_name("telemetry_session.py"))
NUM_CONN = 2
WATCH_S = 10          # status answers read, one a second
SLOW = 10_000_000     # bit/s per connection of the slow end

# case -> (the path's loss, the producer's rate, the consumer's rate (0: as fast as it goes),
#          the hop telemetry must name, words its verdict must hold)
CASES = {
    "slow-consumer": ("0", 0, SLOW, "consumer", "the consumer reads slowly (receive window on B's LAN leg"),
    "lossy-wan": ("1%", 0, 0, "wan", "the WAN: "),
    "slow-producer": ("0", SLOW, 0, "producer", "the producer sends no faster (application-limited)"),
}


@pytest.mark.parametrize("server_type", ["Builtin", "Haproxy", "Nginx", "Stunnel"])
@pytest.mark.parametrize("case", list(CASES))
async def test_telemetry_names_the_bottleneck(case, server_type, tmp_path):
    """Builtin samples its sockets itself; the external proxies' are read from outside (``ss``)."""
    try:
        get_backend(server_type).check_available()
    except BackendUnavailable as exc:
        pytest.skip(f"{server_type} cannot run here: {exc}")
    loss, prod_rate, cons_rate, hop, words = CASES[case]
    with built(Testbed(wan=WanSpec(rtt_ms=20, rate="200mbit", loss=loss))) as tb:
        async with contextlib.AsyncExitStack() as stack:
            ready = tmp_path / "source.ready"
            src = await stack.enter_async_context(spawn(tb.argv(
                tb.producer, PY, "-m", "scistream.netns.peer", "source", "--bind", tb.producer.ip,
                "--ports", str(NUM_CONN), "--rate", str(prod_rate), "--ready", str(ready)),
                log_path=tmp_path / "source.log"))
            prod, cons = await asyncio.gather(
                start_s2cs(stack, tb, tb.gw_a, tmp_path, listener_ip=tb.gw_a.wan_ip, server_type=server_type),
                start_s2cs(stack, tb, tb.gw_b, tmp_path, listener_ip=tb.gw_b.lan_ip, server_type=server_type))
            await wait_for(lambda: ready.exists() or src.returncode is not None, 20, "the source")
            endpoints = json.loads(ready.read_text())["endpoints"]
            gateways = (prod.target, str(prod.cert), cons.target, str(cons.cert))

            rc, out = await run_in(tb, tb.user, PY, HELPER, "connect", *gateways, ",".join(endpoints))
            assert rc == 0, out + prod.log_text() + cons.log_text()
            session = json.loads(out.strip().splitlines()[-1])
            uid = session["uid"]
            sink = asyncio.create_task(run_in(
                tb, tb.consumer, PY, "-m", "scistream.netns.peer", "sink", *session["listeners"],
                "--rate", str(cons_rate), "--seconds", str(WATCH_S + 4), timeout=WATCH_S + 60))
            try:
                rc, out = await run_in(tb, tb.user, PY, HELPER, "watch", *gateways, uid, str(WATCH_S),
                                       timeout=WATCH_S + 60)
                assert rc == 0, out
                answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            finally:
                rc_sink, out_sink = await sink
            assert rc_sink == 0, out_sink
            got = json.loads(out_sink.strip().splitlines()[-1])
            assert got["ok"] and all(r["received"] > 0 for r in got["received"]), got   # every byte checked

            # every leg of both gateways was sampled, with its rate and round trip
            last = answers[-1]
            for role in ("PROD", "CONS"):
                legs = last["sides"][role]["legs"]
                assert set(legs) == {"lan", "wan"}, last
                assert all(leg["sampled"] and leg["connections"] == NUM_CONN for leg in legs.values()), last
            assert last["sides"]["PROD"]["legs"]["wan"]["rtt_ms"] >= 18, last     # the path's 20 ms
            assert last["sides"]["PROD"]["legs"]["lan"]["rtt_ms"] < 5, last
            # once the stream settled (after the first seconds), the chain's verdict names the hop
            settled = answers[3:]
            named = collections.Counter(a["chain"]["hop"] for a in settled)
            report = "\n".join(f'{a["chain"]["hop"]}: {a["chain"]["bottleneck"]}' for a in answers)
            assert named[hop] >= len(settled) * 0.7, report
            assert any(words in a["chain"]["bottleneck"] for a in settled), report
            if hop == "wan":
                wan = last["sides"]["PROD"]["legs"]["wan"]
                assert wan["total_retrans"] > 0, last

            rc, out = await run_in(tb, tb.user, PY, HELPER, "release", *gateways, uid)
            assert rc == 0, out
