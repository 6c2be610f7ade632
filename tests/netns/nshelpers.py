"""Helpers for the testbed tests: the ``testbed`` fixture (skipped without root), control
servers on the gateways, CLIs and probes in a host's namespace, a WAN capture.

Fixtures are defined here (not in a conftest.py, whose module name would shadow
tests/conftest.py) and imported by the test modules.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import async_wait_until as wait_for  # noqa: F401  (used by the netns tests)
from scistream.netns import Testbed, spawn, unavailable_reason
from scistream.netns.testbed import NETNS_DIR, Host

PY = sys.executable
BIN = Path(PY).parent
REASON = unavailable_reason()
needs_testbed = pytest.mark.skipif(REASON is not None, reason=f"netns testbed unavailable: {REASON}")


@contextlib.contextmanager
def built(tb: Testbed):
    """``tb`` created; afterwards destroyed, and no namespace of it (nor its veths) remains."""
    tb.create()
    try:
        yield tb
    finally:
        tb.destroy()
        left = [ns for ns in tb.namespaces if (NETNS_DIR / ns).exists()]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def testbed():
    """A fresh pair of facilities."""
    with built(Testbed()) as tb:
        yield tb





@dataclasses.dataclass
class S2cs:
    host: Host
    target: str          # control address the user and the app controller dial
    cert: Path
    port: int
    log: Path
    proc: asyncio.subprocess.Process

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


async def start_s2cs(stack: contextlib.AsyncExitStack, tb: Testbed, gw: Host, tmp: Path, *,
                     listener_ip: str, server_type: str = "Builtin", extra: tuple[str, ...] = ()) -> S2cs:
    """An ``s2cs`` inside the gateway's namespace, control port on its user-facing address."""
    name = gw.name
    ready, log = tmp / f"{name}.ready", tmp / f"{name}.log"
    argv = tb.argv(gw, str(BIN / "s2cs"), "--port", "0", "--listener-ip", listener_ip,
                   "--control-ip", gw.control_ip, "--type", server_type, "--port-range", "5100-5163",
                   "--state-dir", str(tmp / f"{name}-state"), "--auth", "none", "--ready-file", str(ready),
                   *extra)
    proc = await stack.enter_async_context(spawn(argv, log_path=log))
    await wait_for(lambda: ready.exists() or proc.returncode is not None, 30, f"s2cs on {gw.label}")
    if proc.returncode is not None:
        raise AssertionError(f"s2cs on {gw.label} exited {proc.returncode}: {log.read_text()[-3000:]}")
    info = json.loads(ready.read_text())
    return S2cs(gw, f"{gw.control_ip}:{info['port']}", tmp / f"{name}-state" / "server.crt", info["port"],
                log, proc)


def cli_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["SCISTREAM_CONFIG_DIR"] = str(tmp / "user-config")  # where s2uc keeps the WAN secret
    env.pop("SCISTREAM_TOKEN", None)
    return env


async def run_in(tb: Testbed, host: Host, *argv: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run argv inside ``host``; return (exit code, stdout+stderr)."""
    async with spawn(tb.argv(host, *argv), env=env, stdout=asyncio.subprocess.PIPE) as proc:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace")


async def probes(tb: Testbed, host: Host, listeners: list[str], timeout: float = 3.0) -> dict[str, dict]:
    """One connection attempt from ``host`` to each listener (at once): {listener: result}."""
    rc, out = await run_in(tb, host, PY, "-m", "scistream.netns.peer", "connect", *listeners,
                           "--timeout", str(timeout), timeout=timeout + 30)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == len(listeners), out
    return {r["listener"]: r for r in results}


async def probe(tb: Testbed, host: Host, listener: str, timeout: float = 3.0) -> dict:
    return (await probes(tb, host, [listener], timeout))[listener]


async def read_line_matching(stream: asyncio.StreamReader, pattern: str, timeout: float, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got: {seen}")
        line = await asyncio.wait_for(stream.readline(), left)
        if not line:
            raise AssertionError(f"output ended before a line matching {pattern!r}; got: {seen}")
        text = line.decode(errors="replace").rstrip("\n")
        seen.append(text)
        if m := re.search(pattern, text):
            return m


@contextlib.asynccontextmanager
async def capture(tb: Testbed, host: Host, ifname: str, path: Path):
    """tcpdump on ``host``'s ``ifname`` into ``path`` (pcap), running while the block runs."""
    async with spawn(tb.argv(host, "tcpdump", "-i", ifname, "-n", "-s", "0", "-U", "-w", str(path)),
                     stdout=asyncio.subprocess.PIPE) as proc:
        seen: list[str] = []
        await read_line_matching(proc.stdout, r"listening on", 20, seen)
        yield proc
        # tcpdump flushes every packet (-U); SIGTERM (spawn's exit) closes the file cleanly.
