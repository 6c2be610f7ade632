"""Talking to a control server: one channel, typed errors, optional token.

``AsyncClient`` wraps the four RPCs of the protocol (plus ``status``); every gRPC error
comes out as the matching ``scistream.errors`` class, with the server's message.
``Client`` is the same thing for synchronous code.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import grpc

from ..addr import parse_listener
from ..errors import InvalidArgument, ScistreamError, from_status
from ..proto import pb, pb_grpc

DEFAULT_CERT = "server.crt"


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    server_cert: str | None = None   # PEM file to verify the server against
    insecure: bool = False           # plaintext channel (server started with --insecure)
    token: str | None = None         # sent as "authorization: Bearer <token>"
    timeout: float | None = None     # per-call deadline for quick calls (update, release)

    def resolved_cert(self) -> str | None:
        if self.server_cert:
            return self.server_cert
        env = os.environ.get("SCISTREAM_SERVER_CERT")
        if env:
            return env
        return DEFAULT_CERT if Path(DEFAULT_CERT).exists() else None


def open_channel(target: str, opts: ChannelOptions) -> grpc.aio.Channel:
    parse_listener(target)
    options = [("grpc.max_receive_message_length", 1 << 20),
               ("grpc.enable_retries", 0)]
    if opts.insecure:
        return grpc.aio.insecure_channel(target, options=options)
    cert = opts.resolved_cert()
    try:
        roots = Path(cert).read_bytes() if cert else None
    except OSError as exc:
        raise InvalidArgument(f"cannot read server certificate {cert}: {exc.strerror}") from None
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)


class AsyncClient:
    def __init__(self, target: str, opts: ChannelOptions | None = None, **kw) -> None:
        self.target = target
        self.opts = opts or ChannelOptions(**kw)
        self._channel = open_channel(target, self.opts)
        self._stub = pb_grpc.ControlStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.opts.token}")] if self.opts.token else []

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, metadata=self._metadata(), timeout=timeout,
                                wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            msg = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not msg.startswith("session store"):
                msg = (f"cannot reach the S2CS at {self.target}: {msg}. Is it running, and "
                       "does --server-cert (or --insecure) match how it was started?")
            elif exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                msg = (f"the S2CS at {self.target} does not know this call ({msg}); a server of "
                       "the original SciStream tooling has no status: use our s2cs for that")
            raise from_status(exc.code(), msg) from None

    async def req(self, uid: str, role: str, num_conn: int = 5, rate: int = 0, *,
                  lease: int = 0, timeout: float | None = None) -> pb.Response:
        return await self._call(self._stub.req, pb.Request(uid=uid, role=role, num_conn=num_conn,
                                                           rate=rate, lease=lease), timeout)

    async def hello(self, uid: str, role: str, prod_listeners: Sequence[str] = (), *,
                    timeout: float | None = 60) -> pb.AppResponse:
        return await self._call(self._stub.hello, pb.Hello(uid=uid, role=role,
                                                           prod_listeners=list(prod_listeners)), timeout)

    async def update(self, uid: str, role: str, remote_listeners: Sequence[str],
                     wan_secret: bytes = b"", *, timeout: float | None = 60) -> pb.Response:
        return await self._call(self._stub.update, pb.UpdateTargets(
            uid=uid, role=role, remote_listeners=list(remote_listeners), wan_secret=wan_secret), timeout)

    async def release(self, uid: str, *, timeout: float | None = 60) -> pb.Response:
        return await self._call(self._stub.release, pb.Release(uid=uid), timeout)

    async def status(self, uid: str = "", *, timeout: float | None = 30) -> pb.StatusResponse:
        return await self._call(self._stub.status, pb.StatusRequest(uid=uid), timeout)


class Client:
    """Synchronous wrapper: each call runs the async one on a private event loop."""

    def __init__(self, target: str, opts: ChannelOptions | None = None, **kw) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = self._loop.run_until_complete(self._make(target, opts, kw))

    @staticmethod
    async def _make(target, opts, kw) -> AsyncClient:
        return AsyncClient(target, opts, **kw)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._async.close())
            self._loop.close()

    def __getattr__(self, name: str):
        method = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def call(*args, **kwargs):
            return self._loop.run_until_complete(method(*args, **kwargs))
        return call


__all__ = ["AsyncClient", "Client", "ChannelOptions", "ScistreamError"]
