"""A worker process as the node service sees it: spawned, talked to over its channel
(framed messages with descriptors), restarted when it dies (``Node.worker_lost``).

    w = WorkerProc(node, index); await w.spawn()
    reply = await w.call({"op": "ping"})
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from .channel import ChannelClosed, Decoder, encode, send_frame

if TYPE_CHECKING:
    from .service import Node

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0


class WorkerProc:
    """One worker process and the channel to it."""

    def __init__(self, node: "Node", index: int) -> None:
        self.node = node
        self.index = index
        # Its inbox: the other workers hand it connections through the second socket. The
        # service keeps both ends, so a restarted worker reads the same inbox.
        self.inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.proc: asyncio.subprocess.Process | None = None
        self.chan: socket.socket | None = None
        self.decoder = Decoder()
        self.pending: dict[int, asyncio.Future] = {}
        self.out: list[list[Any]] = []            # [data, fds, offset]
        self.ids = 0
        self.listeners = 0                         # placed here (the load)
        self.restarts = 0
        self.started = 0.0
        self.quick_deaths = 0                      # in a row, each within a second of its start
        self.alive = False
        self.monitor: asyncio.Task | None = None

    async def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        others = [w for w in self.node.workers if w is not self]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "scistream.data.node.worker", str(child.fileno()), str(self.index),
                f"--inbox={self.inbox[0].fileno()}", *(f"--peer={w.index}:{w.inbox[1].fileno()}" for w in others),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(child.fileno(), self.inbox[0].fileno(), *(w.inbox[1].fileno() for w in others)))
        finally:
            child.close()
        parent.setblocking(False)
        self.chan = parent
        self.decoder = Decoder()
        self.out = []
        self.alive = True
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._readable)
        self.monitor = asyncio.create_task(self._wait(self.proc))
        log.info("worker %d started, pid %d", self.index, self.proc.pid)

    async def _wait(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self.proc:
            self._lost(f"worker {self.index} (pid {proc.pid}) "
                       + (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"))

    def _readable(self) -> None:
        assert self.chan is not None
        try:
            msgs = self.decoder.feed(self.chan)
        except BlockingIOError:
            return
        except (ChannelClosed, OSError, ValueError) as exc:
            self._lost(f"worker {self.index}: channel closed ({exc})")
            return
        for msg, fds in msgs:
            for fd in fds:
                os.close(fd)
            fut = self.pending.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _lost(self, why: str) -> None:
        """The worker is gone (or going): fail its calls, let the node replace it."""
        if not self.alive:
            return
        self.alive = False
        self._close_chan()
        self.decoder.close()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(why))
        self.pending.clear()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self.node.worker_lost(self, why)

    def _close_chan(self) -> None:
        if self.chan is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.chan.fileno())
            loop.remove_writer(self.chan.fileno())
            self.chan.close()
            self.chan = None

    def _write(self) -> None:
        if self.chan is None:
            return
        while self.out:
            data, fds, off = self.out[0]
            try:
                n = send_frame(self.chan, data[off:], fds if off == 0 else None)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(f"worker {self.index}: cannot write to its channel ({exc})")
                return
            if off + n < len(data):
                self.out[0][2] = off + n
                break
            self.out.pop(0)
        loop = asyncio.get_running_loop()
        if self.out:
            loop.add_writer(self.chan.fileno(), self._write)
        else:
            loop.remove_writer(self.chan.fileno())

    async def call(self, msg: dict, fds: list[int] | None = None, timeout: float = CALL_TIMEOUT) -> dict:
        if not self.alive:
            raise ChannelClosed(f"worker {self.index} is restarting")
        self.ids += 1
        msg = {**msg, "id": self.ids, "nfds": len(fds or [])}
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.ids] = fut
        self.out.append([encode(msg), list(fds or []), 0])
        if len(self.out) == 1:
            self._write()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(msg["id"], None)

    async def stop(self, grace: float = 5.0) -> None:
        self.alive = False
        proc = self.proc
        self._close_chan()
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.monitor is not None:
            self.monitor.cancel()
