"""The gRPC face of the session registry: decode, authenticate, translate, audit, map errors.

Each handler receives the raw request bytes: a message that does not decode (bad wire
format, strings that are not UTF-8) is refused with INVALID_ARGUMENT, not grpc's generic
INTERNAL. It then authenticates the caller from the ``authorization`` metadata, calls the
registry, and turns a ``ScistreamError`` into its status code and message. Anything else
becomes INTERNAL with a short message (and a traceback in the server log), never an
unhandled exception on the wire. Every call, answered or refused, is one line in the
audit log and one count in the metrics.

    server.add_generic_rpc_handlers([generic_handler(ControlServicer(registry, auth))])
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from ..auth.base import Identity
from ..data.telemetry import verdict
from ..errors import InvalidArgument, NotFound, ScistreamError
from ..proto import pb
from .sessions import Session, SessionRegistry

log = logging.getLogger(__name__)

STATUS_BUDGET = 900 * 1024   # bytes of SessionInfo per status answer (MAX_MESSAGE is 1 MiB)


@dataclasses.dataclass
class Call:
    """What the audit log says about one RPC."""
    method: str
    peer: str
    who: Identity | None = None
    uid: str = ""
    role: str = ""


def rpc(request_type):
    """Decode the raw request, run the handler, map errors, audit and count the call."""
    def deco(handler):
        name = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: "ControlServicer", raw, context: grpc.aio.ServicerContext):
            call = Call(name, _peer(context))
            try:
                try:
                    request = request_type.FromString(raw)
                except DecodeError as exc:
                    raise InvalidArgument(f"the {name} request is not a valid scistream."
                                          f"{request_type.__name__} message: {exc}") from None
                call.uid = getattr(request, "uid", "")
                call.role = getattr(request, "role", "")
                response = await handler(self, request, context, call)
            except ScistreamError as exc:
                log.info("%s -> %s: %s", name, exc.status.name, exc)
                self.record(call, exc.status.name, str(exc))
                await context.abort(grpc.StatusCode[exc.status.name], str(exc))
            except asyncio.CancelledError:
                self.record(call, "CANCELLED", "the caller went away or the server is stopping")
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                log.exception("%s failed", name)
                self.record(call, "INTERNAL", repr(exc))
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"internal error in {name}; the server log has the details")
            self.record(call, "OK", "")
            return response
        return wrapper
    return deco


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return context.peer() or ""
    except Exception:  # noqa: BLE001 - only for the log
        return ""


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class ControlServicer:
    def __init__(self, registry: SessionRegistry, auth, metrics=None, audit=None) -> None:
        self.registry = registry
        self.auth = auth
        self.metrics = metrics
        self.audit = audit

    def record(self, call: Call, code: str, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.call(call.method, code)
        if self.audit is not None:
            self.audit.write(who=call.who.id if call.who is not None else "", peer=call.peer,
                             what=call.method, uid=call.uid, role=call.role, result=code, detail=detail)

    async def _who(self, context: grpc.aio.ServicerContext, call: Call) -> Identity:
        call.who = await self.auth.authenticate(_metadata(context, "authorization"))
        return call.who

    @rpc(pb.Request)
    async def req(self, request: pb.Request, context, call: Call) -> pb.Response:
        who = await self._who(context, call)
        session = await self.registry.request(request.uid, request.role, request.num_conn,
                                              request.rate, who, lease=request.lease)
        return pb.Response(listeners=session.listeners, prod_listeners=session.prod_listeners,
                           wan_secret=session.wan_secret or b"")

    @rpc(pb.Hello)
    async def hello(self, request: pb.Hello, context, call: Call) -> pb.AppResponse:
        who = await self._who(context, call)
        session = await self.registry.hello(request.uid, request.role, request.prod_listeners, who)
        call.role = session.role
        return pb.AppResponse(message=f"hello received for {session.role} session {session.uid}",
                              listeners=session.listeners)

    @rpc(pb.UpdateTargets)
    async def update(self, request: pb.UpdateTargets, context, call: Call) -> pb.Response:
        who = await self._who(context, call)
        session = await self.registry.update(request.uid, request.role, request.remote_listeners,
                                             request.wan_secret, who)
        call.role = session.role
        return pb.Response(listeners=session.listeners, prod_listeners=session.prod_listeners,
                           wan_security=session.wan_security)

    @rpc(pb.Release)
    async def release(self, request: pb.Release, context, call: Call) -> pb.Response:
        who = await self._who(context, call)
        sessions = await self.registry.release(request.uid, who)
        call.role = ",".join(s.role for s in sessions)
        return pb.Response(listeners=[l for s in sessions for l in s.listeners])

    @rpc(pb.StatusRequest)
    async def status(self, request: pb.StatusRequest, context, call: Call) -> pb.StatusResponse:
        who = await self._who(context, call)
        admin = who.id in self.registry.config.admins
        if hasattr(self.registry, "snapshot"):   # a facility: the store says (control/facility.py)
            visible = await self.registry.snapshot(request.uid, who, admin)
        else:
            visible = [s for s in self.registry.sessions()
                       if (not request.uid or s.uid == request.uid) and (admin or s.owner.id == who.id)]
        if request.uid and not visible:
            raise NotFound(f"no session {request.uid[:64]} visible to you on this server")
        sem = asyncio.Semaphore(32)

        async def info(s: Session) -> pb.SessionInfo:
            async with sem:
                return await self._info(s)

        out = pb.StatusResponse(server_time=time.time())
        size = 0
        for item in await asyncio.gather(*(info(s) for s in visible)):
            size += item.ByteSize() + 8
            if size > STATUS_BUDGET:  # live sessions come first; the oldest ended ones go
                out.omitted += 1
                continue
            out.sessions.append(item)
        return out

    async def _info(self, s: Session) -> pb.SessionInfo:
        stats = await self.registry.stats(s)
        return pb.SessionInfo(
            uid=s.uid, role=s.role, state=s.state.value, owner=str(s.owner), listeners=s.listeners,
            targets=s.targets, num_conn=s.num_conn, rate=s.rate, created=s.created,
            lease_expires=s.lease_expires, last_error=s.error(stats), wan_security=s.wan_security,
            server_type=s.server_type or self.registry.config.server_type,
            bytes_in=stats.bytes_in, bytes_out=stats.bytes_out, connections=stats.connections,
            total_connections=stats.total_connections, refused_connections=stats.refused_connections,
            cut_streams=stats.cut_streams, legs=legs_pb(s.legs),
            bottleneck=verdict({s.role: s.legs})[1] if s.legs else "",
            udp=s.udp, udp_counters=stats.udp,
            ended=s.ended, connected=s.connected_at,
            rate_not_enforced=bool(s.rate) and not s.rate_enforced, node=s.node, instance=s.instance)


def legs_pb(legs: dict[str, dict]) -> list[pb.LegTelemetry]:
    """A gateway's legs (``data.telemetry.summarize``) as the status answer carries them."""
    fields = set(pb.LegTelemetry.DESCRIPTOR.fields_by_name) - {"leg"}
    return [pb.LegTelemetry(leg=name, **{k: v for k, v in leg.items() if k in fields})
            for name, leg in sorted(legs.items())]


def generic_handler(servicer: ControlServicer) -> grpc.GenericRpcHandler:
    """The ``scistream.Control`` service with raw-bytes requests (decoded by ``rpc``)."""
    return grpc.method_handlers_generic_handler("scistream.Control", {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=None,
            response_serializer=lambda message: message.SerializeToString())
        for name in ("req", "hello", "update", "release", "status")})
