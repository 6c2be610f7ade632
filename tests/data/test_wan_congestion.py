"""The WAN leg's congestion control (``s2cs --wan-congestion``): what ``ss -ti`` shows on
the sockets of a live Builtin session, the LAN legs left alone, and a name this kernel
lacks refused at start with the list it has."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess

import pytest

from conftest import BIN, connect_session, parse_listener
from scistream.data.hosttcp import HostTcp, try_congestion

pytestmark = pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")


def congestion_by_ports(port: int) -> dict[tuple[int, int], str]:
    """``ss -tin`` of the established connections with ``port`` at either end:
    (local port, peer port) -> the congestion control it shows."""
    p = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                       capture_output=True, text=True, timeout=10, check=True)
    out: dict[tuple[int, int], str] = {}
    key = None
    for line in p.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            key = (int(fields[-2].rpartition(":")[2]), int(fields[-1].rpartition(":")[2]))
        elif key is not None:
            out[key] = line.split()[0]
            key = None
    return out


def other_than(host: HostTcp, default: str) -> str | None:
    """A congestion control this process may set that is not the kernel's default."""
    for name in ("reno", "cubic", "bbr"):
        if name != default and name in host.available and try_congestion(name) is None:
            return name
    return None


async def test_wan_sockets_carry_the_congestion_control_lan_legs_keep_the_default(servers, client_for, echo_server):
    host = HostTcp.read()
    wan_cc = other_than(host, host.default_cc)
    if wan_cc is None:
        pytest.skip(f"no congestion control other than the default {host.default_cc} can be set here")
    kw = dict(wan_congestion=wan_cc)
    pc = client_for(await servers(**kw))
    cc = client_for(await servers(**kw))
    endpoint = f"{echo_server[0]}:{echo_server[1]}"
    uid, prod, cons = await connect_session(pc, cc, endpoint, num_conn=1)
    wan_port = parse_listener(prod.listeners[0])[1]
    lan_port = parse_listener(cons.listeners[0])[1]
    r, w = await asyncio.open_connection(*parse_listener(cons.listeners[0]))
    try:
        payload = os.urandom(1 << 20)
        w.write(payload)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(payload)), 30) == payload  # the chain is up, end to end
        wan = congestion_by_ports(wan_port)
        consumer_leg = congestion_by_ports(lan_port)
        producer_leg = congestion_by_ports(echo_server[1])
    finally:
        w.close()
    # PROD's accepted WAN socket (local port = its listener) and CONS's connected one (peer port = it)
    assert [v for (lp, pp), v in wan.items() if lp == wan_port] == [wan_cc], wan
    assert [v for (lp, pp), v in wan.items() if pp == wan_port] == [wan_cc], wan
    # the LAN legs: CONS's accepted consumer socket, PROD's socket to the producer
    assert [v for (lp, pp), v in consumer_leg.items() if lp == lan_port] == [host.default_cc], consumer_leg
    assert [v for (lp, pp), v in producer_leg.items() if pp == echo_server[1]] == [host.default_cc], producer_leg
    await pc.release(uid)
    await cc.release(uid)


async def test_system_leaves_the_wan_sockets_to_the_kernel(servers, client_for, echo_server):
    host = HostTcp.read()
    pc = client_for(await servers(wan_congestion="system"))
    cc = client_for(await servers(wan_congestion="system"))
    uid, prod, cons = await connect_session(pc, cc, f"{echo_server[0]}:{echo_server[1]}", num_conn=1)
    wan_port = parse_listener(prod.listeners[0])[1]
    r, w = await asyncio.open_connection(*parse_listener(cons.listeners[0]))
    try:
        w.write(b"x" * 1000)
        await w.drain()
        await asyncio.wait_for(r.readexactly(1000), 30)
        wan = congestion_by_ports(wan_port)
    finally:
        w.close()
    assert sorted(wan.values()) == [host.default_cc] * 2, wan
    await pc.release(uid)
    await cc.release(uid)


def test_a_name_the_kernel_lacks_is_refused_at_start_with_the_list(s2cs_process, tmp_path):
    host = HostTcp.read()
    with pytest.raises(AssertionError) as got:
        s2cs_process("--wan-congestion", "nosuchcc")
    text = str(got.value)
    assert "exited 2" in text and "--wan-congestion nosuchcc: this kernel has no such congestion control" in text
    assert f"available here: {', '.join(host.available)}" in text


def test_the_start_says_the_wan_congestion_control_and_the_host_limit(s2cs_process):
    host = HostTcp.read()
    p = s2cs_process()
    chosen = "bbr" if try_congestion("bbr") is None else ""
    lines = p.log()
    if chosen:
        assert "WAN legs' congestion control: bbr (set on each WAN-leg socket)" in lines
    else:
        assert f"WAN legs' congestion control: the kernel's default ({host.default_cc}" in lines
    m = re.search(r"host TCP: one stream reaches about (\S+ \S+) at 100 ms", lines)
    assert m, lines


def test_config_file_names_a_congestion_control_the_kernel_lacks(tmp_path):
    f = tmp_path / "s2cs.toml"
    f.write_text('auth = "none"\nwan-congestion = "nosuchcc"\n')
    p = subprocess.run([str(BIN / "s2cs"), "check-config", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{f}:2: wan-congestion: --wan-congestion nosuchcc: this kernel has no such" in p.stderr
