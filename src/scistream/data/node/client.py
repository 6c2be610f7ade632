"""Talking to the node service (``scistream.data.node``) from the control server or the CLI.

One persistent connection per service; requests carry an ``id`` and are answered in any
order, so many sessions' calls share it. When the connection drops (the service was
restarted and handed over, or it died), the next call reconnects; ``on_lost`` tells the
owner, which re-adds what the service no longer has.

    conn = ServiceConnection(Path("/run/scistream/node.sock"))
    reply = await conn.call({"op": "add", "sid": "uid/PROD", "cfg": cfg})
    await conn.close()
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """The service refused a request (``code``: invalid, busy, unknown) or cannot be reached
    (``code`` "unreachable")."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class ServiceConnection:
    """``path``: the service's unix socket; or, with ``opener`` (a coroutine function that
    opens the stream, e.g. TCP with TLS to a facility's node), a name for messages, and
    ``token`` is sent first (``{"op": "auth"}``, ``data.node.facility``)."""

    def __init__(self, path: Path | str, *, on_event: Callable[[dict], None] | None = None,
                 on_lost: Callable[[], Awaitable[None]] | None = None, opener: Opener | None = None,
                 token: str | None = None) -> None:
        self.path = Path(path) if opener is None else path
        self.opener = opener
        self.token = token
        self.on_event = on_event
        self.on_lost = on_lost
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.reader_task: asyncio.Task | None = None
        self.lock = asyncio.Lock()
        self.closed = False

    @property
    def connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def connect(self, timeout: float = 2.0) -> None:
        async with self.lock:
            if self.connected:
                return
            try:
                opening = (self.opener() if self.opener is not None
                           else asyncio.open_unix_connection(str(self.path), limit=64 << 20))
                self.reader, self.writer = await asyncio.wait_for(opening, timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise ServiceError(f"node service on {self.path} does not answer: "
                                   f"{exc or type(exc).__name__}", "unreachable") from None
            self.reader_task = asyncio.create_task(self._read(self.reader))
            if self.token is not None:
                reply = await self._send({"op": "auth", "token": self.token}, timeout)
                if not reply.get("ok"):
                    if self.writer is not None:   # the service closes it too
                        self.writer.close()
                    raise ServiceError(f"node service on {self.path}: {reply.get('error')}", "denied")
            if self.on_event is not None:
                await self._send({"op": "watch"}, timeout)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in reader:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    if self.on_event is not None:
                        try:
                            self.on_event(msg)
                        except Exception:  # noqa: BLE001
                            log.exception("node service event handler failed")
                    continue
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError):    # ValueError: a line over the limit
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ServiceError(f"node service on {self.path} closed the connection",
                                                   "unreachable"))
            self.pending.clear()
            if self.writer is not None:
                self.writer.close()
            self.writer = None
            if not self.closed and self.on_lost is not None:
                asyncio.get_running_loop().create_task(self.on_lost())

    async def _send(self, msg: dict, timeout: float) -> dict:
        if not self.connected:
            raise ServiceError(f"not connected to the node service on {self.path}", "unreachable")
        mid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[mid] = fut
        try:
            assert self.writer is not None
            self.writer.write(json.dumps({**msg, "id": mid}).encode() + b"\n")
            await self.writer.drain()
            return await asyncio.wait_for(fut, timeout)
        except (OSError, ConnectionError) as exc:
            raise ServiceError(f"node service on {self.path}: {exc}", "unreachable") from None
        except asyncio.TimeoutError:
            raise ServiceError(f"node service on {self.path} did not answer {msg.get('op')!r} "
                               f"within {timeout:g} s", "unreachable") from None
        finally:
            self.pending.pop(mid, None)

    async def call(self, msg: dict, timeout: float = 15.0, *, busy_retry: float = 10.0) -> dict:
        """One request; the reply (``ok`` true) or ServiceError. Reconnects once if the
        connection was lost; retries while the service says ``busy`` (a handover)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + busy_retry
        delay = 0.01
        while True:
            try:
                if not self.connected:
                    await self.connect()
                reply = await self._send(msg, timeout)
            except ServiceError as exc:
                if exc.code != "unreachable" or loop.time() > deadline or self.closed:
                    raise
            else:
                if reply.get("ok"):
                    return reply
                code = reply.get("code") or "invalid"
                if code != "busy" or loop.time() >= deadline:
                    raise ServiceError(str(reply.get("error") or "refused"), code)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def close(self) -> None:
        self.closed = True
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self.reader_task is not None:
            self.reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self.reader_task


async def call_once(path: Path, msg: dict, timeout: float = 5.0) -> dict:
    """A single request on a fresh connection (the CLI, checks)."""
    conn = ServiceConnection(path)
    try:
        return await conn.call(msg, timeout, busy_retry=0)
    finally:
        await conn.close()
