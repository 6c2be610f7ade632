"""``scistream demo``: a whole SciStream session between two facilities on this machine.

It starts a PROD and a CONS control server (``s2cs`` processes, TLS control channel), the
demo producer and consumer with their application controllers (``appctrl`` processes),
runs the exchange of PROTOCOL.md with the client library (req, hello, update on each
side), streams ``size`` bytes over ``num_conn`` connections through both data servers,
verifies every byte, releases both sides and stops everything it started, also on
Ctrl-C and on failure.

    report = asyncio.run(run_demo(DemoOptions(size=1 << 30, num_conn=4)))
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from .client import AsyncClient, ChannelOptions

BIN = Path(sys.executable).parent


@dataclasses.dataclass
class DemoOptions:
    size: int = 1 << 30         # total bytes, split over the connections
    num_conn: int = 4
    server_type: str = "Builtin"
    listener_ip: str = "127.0.0.1"
    rate: int = 0
    keep_dir: bool = False
    say: Callable[[str], None] = print


@dataclasses.dataclass
class DemoReport:
    uid: str
    steps: list[tuple[str, float]]
    bytes_verified: int
    transfer_seconds: float
    streams: int
    server_type: str
    wan_security: str

    @property
    def gbps(self) -> float:
        return self.bytes_verified * 8 / self.transfer_seconds / 1e9 if self.transfer_seconds else 0.0


def _exe(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _port_range(count: int = 64) -> str:
    start = random.randrange(10000, 32000 - count)  # below the ephemeral port range
    return f"{start}-{start + count - 1}"


@contextlib.asynccontextmanager
async def _process(argv: list[str], log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child that is always stopped and reaped: return, error or Ctrl-C."""
    with open(log_path, "ab") as logf:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=logf, stderr=logf)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def _s2cs(stack: contextlib.AsyncExitStack, work: Path, name: str, opts: DemoOptions) -> tuple[str, Path]:
    ready = work / f"{name}.ready"
    argv = [_exe("s2cs"), "--port", "0", "--listener-ip", opts.listener_ip, "--type", opts.server_type,
            "--port-range", _port_range(), "--state-dir", str(work / name), "--auth", "none",
            "--ready-file", str(ready)]
    proc = await stack.enter_async_context(_process(argv, work / f"{name}.log"))
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.returncode is not None:
            raise RuntimeError(f"{name} s2cs exited with {proc.returncode}: "
                               + (work / f"{name}.log").read_text()[-2000:])
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} s2cs did not start within 30 s")
        await asyncio.sleep(0.02)
    info = json.loads(ready.read_text())
    return f"{opts.listener_ip}:{info['port']}", work / name / "server.crt"


async def run_demo(opts: DemoOptions) -> DemoReport:
    say = opts.say
    work = Path(tempfile.mkdtemp(prefix="scistream-demo-"))
    os.chmod(work, 0o700)
    uid = str(uuid.uuid4())
    per_conn = opts.size // opts.num_conn
    steps: list[tuple[str, float]] = []
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps.append((name, now - t))
        say(f"  [{len(steps)}] {name} ({(now - t) * 1000:.0f} ms)")
        t = now

    try:
        async with contextlib.AsyncExitStack() as stack:
            say(f"SciStream demo: {opts.size} bytes over {opts.num_conn} connections, "
                f"data servers of type {opts.server_type}, work dir {work}")
            prod_s2cs, prod_cert = await _s2cs(stack, work, "prod-s2cs", opts)
            cons_s2cs, cons_cert = await _s2cs(stack, work, "cons-s2cs", opts)
            step(f"started PROD S2CS on {prod_s2cs} and CONS S2CS on {cons_s2cs} (TLS control channel)")
            prod = await stack.enter_async_context(
                AsyncClient(prod_s2cs, ChannelOptions(server_cert=str(prod_cert))))
            cons = await stack.enter_async_context(
                AsyncClient(cons_s2cs, ChannelOptions(server_cert=str(cons_cert))))

            # 1-2: req(PROD) waits for the producer controller's hello.
            req = asyncio.create_task(prod.req(uid, "PROD", opts.num_conn, opts.rate))
            producer = await stack.enter_async_context(_process(
                [_exe("appctrl"), "create-appctrl", uid, prod_s2cs, "-", "PROD", opts.listener_ip,
                 "--num-conn", str(opts.num_conn), "--size", str(per_conn),
                 "--connections", str(opts.num_conn), "--server-cert", str(prod_cert)],
                work / "producer.log"))
            prod_resp = await _race(req, producer, "producer controller", work / "producer.log")
            step(f"req PROD + producer hello: WAN listeners {', '.join(prod_resp.listeners)}")
            # 3: update(PROD) with the producer's endpoints.
            upd = await prod.update(uid, "PROD", list(prod_resp.prod_listeners), prod_resp.wan_secret)
            step(f"update PROD -> producer endpoints {', '.join(prod_resp.prod_listeners)} "
                 f"(WAN leg: {upd.wan_security})")
            # 4: req(CONS) + the consumer controller's hello.
            report_file = work / "consumer.json"
            creq = asyncio.create_task(cons.req(uid, "CONS", opts.num_conn, opts.rate))
            consumer = await stack.enter_async_context(_process(
                [_exe("appctrl"), "create-appctrl", uid, cons_s2cs, "-", "CONS",
                 "--size", str(per_conn), "--server-cert", str(cons_cert), "--report", str(report_file)],
                work / "consumer.log"))
            cons_resp = await _race(creq, consumer, "consumer controller", work / "consumer.log")
            step(f"req CONS + consumer hello: consumer listeners {', '.join(cons_resp.listeners)}")
            # 5: update(CONS) with the PROD WAN listeners and the session's WAN secret.
            await cons.update(uid, "CONS", list(prod_resp.listeners), prod_resp.wan_secret)
            step("update CONS -> PROD WAN listeners")
            # 6: the consumer streams and verifies.
            rc = await consumer.wait()
            if rc != 0:
                raise RuntimeError(f"consumer failed (exit {rc}): "
                                   + (work / "consumer.log").read_text()[-2000:])
            result = json.loads(report_file.read_text())
            await asyncio.wait_for(producer.wait(), 30)
            step(f"transfer: {result['bytes']} bytes verified")
            # 7: release both sides.
            await prod.release(uid)
            await cons.release(uid)
            step("release PROD and CONS")
        say("  all processes stopped")
        return DemoReport(uid=uid, steps=steps, bytes_verified=result["bytes"],
                          transfer_seconds=result["seconds"], streams=result["streams"],
                          server_type=opts.server_type, wan_security=upd.wan_security)
    finally:
        if not opts.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


async def _race(call: asyncio.Task, proc: asyncio.subprocess.Process, name: str, log: Path):
    """Wait for an RPC, failing early if the controller it depends on dies."""
    waiter = asyncio.create_task(proc.wait())
    try:
        done, _ = await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if call in done:
            return call.result()
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
        raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
    finally:
        waiter.cancel()
