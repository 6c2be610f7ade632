"""Throughput of the proxy backends: iperf3 through a PROD+CONS chain versus direct.

For each backend (Builtin, Haproxy, Nginx, Stunnel) and WAN mode (plain, tls) it starts a
PROD data server forwarding to an ``iperf3 -s -1`` on 127.0.0.1 and a CONS data server
forwarding to the PROD listener, then runs ``iperf3 -c`` against the CONS listener with
1 and 4 parallel streams. A direct run (client straight to the server) is measured in
the same run; the table gives Gbit/s, the ratio chain/direct, and the CPU seconds the
proxies of the chain (both gateways) spent per GB carried - the figure that holds still
on a busy machine.

    .venv/bin/python bench/bench_backends.py --seconds 5 --backends Haproxy,Nginx
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from scistream.data.backends.common import listening_ports

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chain import Chain, free_port  # noqa: E402


async def run_client(port: int, seconds: float, streams: int) -> float:
    proc = await asyncio.create_subprocess_exec(
        "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    data = json.loads(out or b"{}")
    if proc.returncode != 0 or "end" not in data:
        raise RuntimeError(f"iperf3 client failed: {data.get('error') or err.decode()}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


async def measure(target_port: int, client_port: int, seconds: float, streams: int) -> float:
    """Run ``iperf3 -s -1`` on ``target_port`` and a client against ``client_port``; Gbit/s."""
    server = await asyncio.create_subprocess_exec(
        "iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(target_port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(200):  # until the server listens (no probe: it serves one client only)
            if target_port in listening_ports([server.pid], {ipaddress.ip_address("127.0.0.1")}):
                break
            await asyncio.sleep(0.025)
        return await run_client(client_port, seconds, streams)
    finally:
        try:  # it exits after its one test; kill() on a just-exited child races the reaper
            await asyncio.wait_for(asyncio.shield(server.wait()), 5)
        except asyncio.TimeoutError:
            server.kill()
            await server.wait()


async def chain(kind: str, tls: bool, seconds: float, streams: int, base: Path) -> tuple[float, float]:
    """Gbit/s through a PROD+CONS chain (chain.Chain: Builtin in node services of its own),
    and the proxies' CPU seconds per GB carried."""
    target = free_port()
    async with Chain(kind, tls=tls, target=("127.0.0.1", target), workdir=base / f"{kind}-{uuid.uuid4()}") as ch:
        before = ch.cpu_seconds()
        gbps = await measure(target, ch.entry[1], seconds, streams)
        cpu = ch.cpu_seconds() - before
        return gbps, cpu / max(gbps * seconds / 8, 1e-9)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--backends", default="Builtin,Haproxy,Nginx,Stunnel")
    ap.add_argument("--modes", default="plain,tls")
    ap.add_argument("--streams", default="1,4")
    args = ap.parse_args()
    if not shutil.which("iperf3"):
        sys.exit("iperf3 not found: apt-get install iperf3")
    base = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    rows = []
    try:
        for streams in map(int, args.streams.split(",")):
            port = free_port()
            direct = await measure(port, port, args.seconds, streams)
            rows.append(("direct", "-", streams, direct, 1.0, 0.0))
            for kind in args.backends.split(","):
                for mode in args.modes.split(","):
                    try:
                        gbps, cpu = await chain(kind, mode == "tls", args.seconds, streams, base)
                    except Exception as exc:  # report and go on with the others
                        print(f"{kind} {mode} P{streams}: {exc}", file=sys.stderr)
                        continue
                    rows.append((kind, mode, streams, gbps, gbps / direct, cpu))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'path':10} {'wan':6} {'streams':>7} {'Gbit/s':>8} {'ratio':>6} {'CPU s/GB':>9}")
    for kind, mode, streams, gbps, ratio, cpu in rows:
        print(f"{kind:10} {mode:6} {streams:7d} {gbps:8.2f} {ratio:6.2f} {cpu:9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
