"""Owning data-server processes: start, wait until ready, stop and reap, tail the log.

Every child runs in its own session (process group) so that a restart of the control
server does not take the streams down; ``ChildProcess.stop`` always kills the whole
group and reaps the child, even when the caller is cancelled.

    child = await ChildProcess.spawn(argv, log_path=workdir / "haproxy.log", name="haproxy")
    await child.wait_ready(ready, timeout=10)    # ready(): async, e.g. whether its ports listen
    ...
    await child.stop()
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from ..errors import DataServerError

log = logging.getLogger(__name__)


def tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state. The leader of a multi-threaded
    # process turns zombie first while its other threads (and its sockets) live on a few
    # milliseconds more: it is gone only when every thread is.
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any((f := stat_fields(f"{pid}/task/{tid}")) and f[0] not in ("Z", "X") for tid in tasks)


class ChildProcess:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, proc: asyncio.subprocess.Process | None, pid: int, name: str, log_path: Path) -> None:
        self.proc = proc
        self.pid = pid
        self.name = name
        self.log_path = log_path
        self._stopped = False

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, log_path: Path, name: str,
                    env: dict[str, str] | None = None, cwd: Path | None = None) -> "ChildProcess":
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as logf:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True, env=env, cwd=cwd)
            except OSError as exc:
                raise DataServerError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        log.debug("%s started, pid %d: %s", name, proc.pid, " ".join(map(str, argv)))
        return cls(proc, proc.pid, name, log_path)

    @classmethod
    def adopt(cls, pid: int, name: str, log_path: Path) -> "ChildProcess":
        """Take over a process started by an earlier control server (not our child)."""
        return cls(None, pid, name, log_path)

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return pid_alive(self.pid)

    def exit_reason(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        how = f"exited with code {code}" if code is not None else "exited"
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        detail = tail(self.log_path)
        return f"{self.name} (pid {self.pid}) {how}" + (f": {detail}" if detail else "")

    async def _reaped(self, poll: float) -> None:
        """Until the process has ended: reaped if it is our child, else looked at every ``poll`` s."""
        if self.proc is not None:
            await self.proc.wait()
        while self.proc is None and pid_alive(self.pid):
            await asyncio.sleep(poll)

    async def wait(self) -> str:
        """Wait for the process to end by itself; return why."""
        await self._reaped(0.5)
        return self.exit_reason()

    async def exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; whether it did."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            if self.proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.05)
            else:
                await asyncio.sleep(0.02)
        return not self.running

    async def wait_ready(self, ready: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
        """Poll ``ready`` until true; fail (and stop the child) if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        try:
            while True:
                if not self.running:
                    raise DataServerError(f"data server failed to start: {self.exit_reason()}")
                if await ready():
                    return
                if time.monotonic() > deadline:
                    raise DataServerError(
                        f"{self.name} did not become ready within {timeout:.0f} s: {tail(self.log_path)}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        except BaseException:
            await self.stop()
            raise

    def detach(self) -> None:
        """Forget the process without stopping it: it outlives this control server, and the
        next one re-adopts it. (asyncio kills a still-running child when its transport is
        closed or collected, at the latest when the interpreter exits; this stops that.)"""
        self._stopped = True
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport._closed = True

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL after ``grace`` seconds; always reaps. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.shield(self._stop(grace))

    async def _stop(self, grace: float) -> None:
        if not self.running:
            await self._reaped(0.02)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        if not await self.exited(grace):
            log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", self.name, self.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        await self._reaped(0.02)
        # A child of ours may have left grandchildren in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


# -- /proc: process state, groups, children, command lines ------------------------------
def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat (``pid`` "PID/task/TID": a thread's) after the command
    name (state first); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _live_where(field: int, value: int) -> list[int]:
    """Live (non-zombie) processes whose stat field ``field`` is ``value``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = stat_fields(int(entry))
            if f and f[0] != "Z" and int(f[field]) == value:
                out.append(int(entry))
    return out


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return _live_where(2, pgid)


def children(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``."""
    return set(_live_where(1, pid))


def cmdline(pid: int) -> list[str]:
    """The arguments of ``pid`` ([] if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def bind_error(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """Why a TCP listener (``kind`` SOCK_DGRAM: a UDP socket) cannot bind ``host:port`` right
    now, or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


def free_port_check(host: str, port: int, *, udp: bool = False) -> bool:
    """True if ``port`` can be bound on ``host`` right now (``udp``: for UDP as well)."""
    return bind_error(host, port) is None and not (udp and bind_error(host, port, socket.SOCK_DGRAM))
