"""A stand-in for the original tooling's control server (scistream-proto 1.2.1), which is
not installable: a thin gRPC front that keeps the original's rules, as docs/protocol.md
states them, and hands everything else to a real control server of ours behind it, whose
data servers move the bytes (plaintext WAN leg, as with the original's HAProxy type).

The original's rules, each kept here:
- a hello whose req the server has not registered yet fails, UNKNOWN "entry not found"
  (the original registers the uid only after its own token check and port set-up:
  ``register_delay`` models that time, so a client that sends its hello together with
  its req meets the failure, as it does against the original);
- an update without targets fails, UNKNOWN (the original divides by their number);
- no ``wan_secret`` in its answers, none of our added fields, no ``status`` RPC; the
  ``wan_secret`` a client sends is ignored;
- ``update`` is answered before the proxies listen (they accept some time later);
- the rate is not enforced (the request goes on with rate 0);
- any error is an unhandled exception: UNKNOWN "Exception calling application: ...".

    front = await OriginalStandIn.start(backend)   # backend: a ControlServer of ours
    ...  # s2uc / appctrl --insecure --s2cs front.target
    await front.stop()
"""
from __future__ import annotations

import asyncio
import collections

import grpc

from scistream.client import AsyncClient
from scistream.errors import ScistreamError
from scistream.proto import pb


class OriginalStandIn:
    def __init__(self, backend, register_delay: float = 0.15) -> None:
        self.backend = AsyncClient(backend.target, insecure=True)
        self.register_delay = register_delay
        self.entries: dict[str, list[str]] = {}           # uid -> listeners, once registered
        self.calls: list[tuple[str, str]] = []            # (method, uid) of every call received
        self.refused: collections.Counter[str] = collections.Counter()  # method -> refusals
        self.secrets_seen = 0                              # updates that carried a wan_secret
        self.late_updates: dict[str, asyncio.Task] = {}   # uid -> the update still being applied
        self.errors: list[str] = []                        # what a late update met
        self.server: grpc.aio.Server | None = None
        self.target = ""

    @classmethod
    async def start(cls, backend, **kw) -> "OriginalStandIn":
        self = cls(backend, **kw)
        self.server = grpc.aio.server()
        handlers = {
            "req": grpc.unary_unary_rpc_method_handler(
                self.req, request_deserializer=pb.Request.FromString,
                response_serializer=pb.Response.SerializeToString),
            "hello": grpc.unary_unary_rpc_method_handler(
                self.hello, request_deserializer=pb.Hello.FromString,
                response_serializer=pb.AppResponse.SerializeToString),
            "update": grpc.unary_unary_rpc_method_handler(
                self.update, request_deserializer=pb.UpdateTargets.FromString,
                response_serializer=pb.Response.SerializeToString),
            "release": grpc.unary_unary_rpc_method_handler(
                self.release, request_deserializer=pb.Release.FromString,
                response_serializer=pb.Response.SerializeToString),
        }  # no status: the original has none
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("scistream.Control", handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        for task in self.late_updates.values():
            task.cancel()
        await asyncio.gather(*self.late_updates.values(), return_exceptions=True)
        if self.server is not None:
            await self.server.stop(None)
        await self.backend.close()

    async def _fail(self, context, method: str, message: str):
        self.refused[method] += 1
        await context.abort(grpc.StatusCode.UNKNOWN, f"Exception calling application: {message}")

    # -- the four RPCs ---------------------------------------------------------------------
    async def req(self, request: pb.Request, context) -> pb.Response:
        self.calls.append(("req", request.uid))
        pending = asyncio.create_task(self.backend.req(request.uid, request.role, request.num_conn or 5, 0))
        try:
            await asyncio.sleep(self.register_delay)  # the original's token check and port set-up
            self.entries[request.uid] = []
            resp = await pending
        except ScistreamError as exc:
            self.entries.pop(request.uid, None)
            await self._fail(context, "req", str(exc))
        except asyncio.CancelledError:
            pending.cancel()
            raise
        self.entries[request.uid] = list(resp.listeners)
        return pb.Response(listeners=resp.listeners, prod_listeners=resp.prod_listeners)

    async def hello(self, request: pb.Hello, context) -> pb.AppResponse:
        self.calls.append(("hello", request.uid))
        if request.uid not in self.entries:
            await self._fail(context, "hello", f"hello request invalid, entry not found for uid {request.uid}")
        try:
            resp = await self.backend.hello(request.uid, request.role, list(request.prod_listeners))
        except ScistreamError as exc:
            await self._fail(context, "hello", str(exc))
        return pb.AppResponse(message=f"Hello message sent to {request.uid}", listeners=resp.listeners)

    async def update(self, request: pb.UpdateTargets, context) -> pb.Response:
        self.calls.append(("update", request.uid))
        if request.wan_secret:
            self.secrets_seen += 1  # and ignored, as the original does
        if not request.remote_listeners:
            await self._fail(context, "update", "integer division or modulo by zero")
        if request.uid not in self.entries:
            await self._fail(context, "update", f"KeyError: '{request.uid}'")
        # answered now; the proxies start behind the answer
        self.late_updates[request.uid] = asyncio.create_task(
            self._apply(request.uid, request.role, list(request.remote_listeners)))
        return pb.Response(listeners=self.entries[request.uid])

    async def _apply(self, uid: str, role: str, targets: list[str]) -> None:
        try:
            await self.backend.update(uid, role, targets)  # no wan_secret: plaintext WAN leg
        except ScistreamError as exc:
            self.errors.append(f"update {uid}: {exc}")

    async def release(self, request: pb.Release, context) -> pb.Response:
        self.calls.append(("release", request.uid))
        late = self.late_updates.pop(request.uid, None)
        if late is not None:
            await asyncio.gather(late, return_exceptions=True)
        try:
            await self.backend.release(request.uid)
        except ScistreamError as exc:
            await self._fail(context, "release", str(exc))
        self.entries.pop(request.uid, None)
        return pb.Response()
