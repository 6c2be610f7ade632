"""``s2uc status --watch``: the live table in a real terminal (a pty), over a real session."""
from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios

from conftest import BIN, async_wait_until, connect_session, free_port, parse_listener
from webhelpers import Traffic

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Pty:
    """A program on a pseudo-terminal 220 columns wide; ``screen`` is all it printed, ANSI-free."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
        env = {**os.environ, "COLUMNS": "220", "LINES": "50", "TERM": "xterm"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.raw = b""

    def pump(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.raw += chunk
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def last_frame(self) -> str:
        return self.pump()[-6000:]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pump()
        os.close(self.master)
        return self.proc.returncode


async def test_watch_shows_the_rate_and_the_release(servers, client_for, echo_server):
    prod = await servers()
    cons = await servers()
    pc = client_for(prod)
    uid, _, cons_resp = await connect_session(pc, client_for(cons), "%s:%d" % echo_server, num_conn=1)
    term = Pty([str(BIN / "s2uc"), "status", "--watch", "--interval", "0.3", "--s2cs", prod.target,
                "--insecure"])
    try:
        await async_wait_until(lambda: uid in term.pump() and "connected" in term.pump(), 20,
                               "the session in the live table")
        rate = re.compile(re.escape(uid) + r".*?connected.*?\d+/\d+[ │]+([\d.]+) (k|M|G)?bit/s")
        async with Traffic(*parse_listener(cons_resp.listeners[0])):
            await async_wait_until(
                lambda: any(float(m.group(1)) > 0 for m in rate.finditer(term.last_frame())), 20,
                "a throughput above zero")
            # the legs' round trips and what holds the session back, as this gateway sees it
            await async_wait_until(lambda: re.search(r"lan [\d.]+ms wan [\d.]+ms", term.last_frame()), 20,
                                   "the legs' round trips")
            assert re.search(r"(producer|consumer|WAN|LAN)", term.last_frame().split("rtt", 1)[-1])
        await pc.release(uid)
        await async_wait_until(lambda: re.search(re.escape(uid) + r".*?released", term.last_frame()), 20,
                               "released in the live table")
        assert "every 0.3 s" in term.pump()
    finally:
        rc = await asyncio.to_thread(term.close)
    assert rc == 0


def test_watch_with_json_is_a_usage_error():
    p = subprocess.run([str(BIN / "s2uc"), "status", "--watch", "--json", "--s2cs", "127.0.0.1:1",
                        "--insecure"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--watch" in p.stderr


async def test_watch_against_no_server_fails_like_status():
    nobody = f"127.0.0.1:{free_port()}"  # a port the OS just handed out and nothing listens on
    p = await asyncio.to_thread(subprocess.run, [str(BIN / "s2uc"), "status", "--watch", "--s2cs",
                                                 nobody, "--insecure", "--timeout", "3"],
                                capture_output=True, text=True, timeout=60)
    assert p.returncode == 4 and nobody in p.stderr
