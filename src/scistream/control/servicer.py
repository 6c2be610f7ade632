"""The gRPC face of the session registry: authenticate, translate, map errors to status.

Each handler authenticates the caller from the ``authorization`` metadata, calls the
registry, and turns a ``ScistreamError`` into its status code and message. Anything else
becomes INTERNAL with a short message (and a traceback in the server log), never an
unhandled exception on the wire.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from ..auth.base import Authenticator, Identity
from ..errors import ScistreamError
from ..proto import pb, pb_grpc
from .sessions import Session, SessionRegistry

log = logging.getLogger(__name__)


def rpc_errors(handler):
    @functools.wraps(handler)
    async def wrapper(self: "ControlServicer", request, context: grpc.aio.ServicerContext):
        name = handler.__name__
        try:
            return await handler(self, request, context)
        except ScistreamError as exc:
            log.info("%s -> %s: %s", name, exc.status.name, exc)
            self.count_error(name, exc.status)
            await context.abort(exc.status, str(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", name)
            self.count_error(name, grpc.StatusCode.INTERNAL)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in {name}; the server log has the details")
    return wrapper


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, registry: SessionRegistry, auth: Authenticator, metrics=None) -> None:
        self.registry = registry
        self.auth = auth
        self.metrics = metrics

    def count_error(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.error(method, code.name)

    async def _who(self, context: grpc.aio.ServicerContext) -> Identity:
        return await self.auth.authenticate(_metadata(context, "authorization"))

    @rpc_errors
    async def req(self, request: pb.Request, context) -> pb.Response:
        who = await self._who(context)
        session = await self.registry.request(request.uid, request.role, request.num_conn,
                                              request.rate, who, lease=request.lease)
        return pb.Response(listeners=session.listeners, prod_listeners=session.prod_listeners,
                           wan_secret=session.wan_secret or b"")

    @rpc_errors
    async def hello(self, request: pb.Hello, context) -> pb.AppResponse:
        who = await self._who(context)
        session = await self.registry.hello(request.uid, request.role, request.prod_listeners, who)
        return pb.AppResponse(message=f"hello received for {session.role} session {session.uid}",
                              listeners=session.listeners)

    @rpc_errors
    async def update(self, request: pb.UpdateTargets, context) -> pb.Response:
        who = await self._who(context)
        session = await self.registry.update(request.uid, request.role, request.remote_listeners,
                                             request.wan_secret, who)
        return pb.Response(listeners=session.listeners, prod_listeners=session.prod_listeners,
                           wan_security=session.wan_security)

    @rpc_errors
    async def release(self, request: pb.Release, context) -> pb.Response:
        who = await self._who(context)
        sessions = await self.registry.release(request.uid, who)
        return pb.Response(listeners=[l for s in sessions for l in s.listeners])

    @rpc_errors
    async def status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        who = await self._who(context)
        admin = who.id in self.registry.config.admins
        out = []
        for s in self.registry.sessions():
            if request.uid and s.uid != request.uid:
                continue
            if not admin and s.owner.id != who.id:
                continue
            out.append(await self._info(s))
        if request.uid and not out:
            from ..errors import NotFound
            raise NotFound(f"no session {request.uid} visible to you on this server")
        return pb.StatusResponse(sessions=out)

    async def _info(self, s: Session) -> pb.SessionInfo:
        stats = await s.server.stats() if s.server is not None else s.final_stats
        info = pb.SessionInfo(
            uid=s.uid, role=s.role, state=s.state.value, owner=str(s.owner), listeners=s.listeners,
            targets=s.targets, num_conn=s.num_conn, rate=s.rate, created=s.created,
            lease_expires=s.lease_expires, last_error=s.last_error, wan_security=s.wan_security,
            server_type=self.registry.config.server_type)
        if stats is not None:
            info.bytes_in, info.bytes_out, info.connections = stats.bytes_in, stats.bytes_out, stats.connections
        return info
