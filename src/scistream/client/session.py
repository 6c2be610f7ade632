"""The high-level client: whole sessions across the two facilities, in one call.

``connect`` runs the exchange of docs/protocol.md from the user's side: it creates the
uid, sends ``req`` to the PROD and the CONS control servers at once, waits for both
application controllers' hellos, pushes the PROD connection map (the producer's
endpoints and the session's WAN secret), then the CONS one (PROD's WAN listeners and the
same secret), and returns a typed ``Connection``. If anything fails, or the caller is
cancelled (Ctrl-C in ``s2uc connect``), it releases what it set up on both sides before
the error propagates. ``s2uc connect`` is built on it.

    prod = Gateway("10.0.0.2:5000", server_cert="prod.crt", token=token)
    cons = Gateway("10.1.0.2:5000", server_cert="cons.crt", token=token)
    conn = await connect(prod, cons, num_conn=4, on_progress=print)
    print(conn.consumer_listeners)       # where the consumer connects
    await release(conn)

``request_prod`` and ``request_cons`` do one half each (``s2uc prod-req`` / ``cons-req``);
``status`` reads a server's sessions as ``SessionStatus`` records. The order the servers
of the original tooling need (targets checked before any update; such a server named,
its WAN leg plaintext) comes from ``scistream.client.order``, as for the CLIs.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence, Union

from ..addr import check_uid
from ..errors import CertificateRejected, DeadlineExceeded, InvalidArgument, NotFound, ScistreamError, Status
from .api import AsyncClient
from .model import (ConsSide, Connection, Gateway, ProdSide, Progress, Released, SessionStatus,
                    Step)
from .order import ORIGINAL_SERVER, check_targets, original_server_note, wan_security_of

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]
#: A gateway, its address ("host:port"), or its instances ("h1:5000,h2:5000" or a list of them).
GatewayLike = Union[Gateway, str, Sequence[str]]
RELEASE_TIMEOUT = 15.0

# A req that failed with one of these reserved nothing (or freed it): do not release the uid,
# which may be somebody else's session (ALREADY_EXISTS) or nothing at all.
_REFUSED = {Status.ALREADY_EXISTS, Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED,
            Status.UNAUTHENTICATED, Status.PERMISSION_DENIED, Status.UNAVAILABLE}


def new_uid() -> str:
    """A fresh session uid (what ``connect`` uses when given none)."""
    return str(uuid.uuid4())


class _Clock:
    """Elapsed time and the progress callback of one call."""

    def __init__(self, uid: str, callback: ProgressCallback | None) -> None:
        self.uid, self.callback, self.start = uid, callback, time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def emit(self, step: Step, detail: str = "") -> None:
        elapsed = time.monotonic() - self.start
        self.steps.append((step.value, elapsed))
        log.info("session %s: %s (%.3f s) %s", self.uid, step.value, elapsed, detail)
        if self.callback is not None:
            try:
                self.callback(Progress(self.uid, step, elapsed, detail))
            except Exception:  # a display must never break the session
                log.exception("progress callback failed")


@dataclasses.dataclass
class _Half:
    """One side's req: whether it may hold something on its server."""
    role: str
    gateway: Gateway
    sent: bool = False       # the req went out: the server may hold ports for it
    refused: bool = False    # the server said no: it holds nothing for it


def _check_args(num_conn: int, rate: int, lease: int) -> None:
    if not isinstance(num_conn, int) or num_conn < 1:
        raise InvalidArgument(f"num_conn must be a positive integer, got {num_conn!r}")
    if not isinstance(rate, int) or rate < 0:
        raise InvalidArgument(f"rate must be >= 0 kbit/s (0 = no cap), got {rate!r}")
    if not isinstance(lease, int) or lease < 0:
        raise InvalidArgument(f"lease must be >= 0 seconds (0 = the server's default), got {lease!r}")


def _side_error(half: _Half, exc: ScistreamError) -> ScistreamError:
    """The same typed error (its class and what it carries: a ``LocalMistake`` or a
    ``CertificateRejected`` stays one), saying which side it came from."""
    new = copy.copy(exc)
    new.args = (f"{half.role} side ({half.gateway.address}): {exc}",)
    new.side = half.role  # type: ignore[attr-defined]
    return new


async def _req(c: AsyncClient, half: _Half, uid: str, num_conn: int, rate: int, lease: int,
               hello_timeout: float | None):
    """req, which returns once the application's hello came (or fails)."""
    half.sent = True
    try:
        async with asyncio.timeout(hello_timeout):
            return await c.req(uid, half.role, num_conn, rate, lease=lease)
    except TimeoutError:
        raise DeadlineExceeded(
            f"no hello from the {half.role} application controller within {hello_timeout:g} s; "
            "start it with the uid printed above (or raise --hello-timeout)") from None
    except ScistreamError as exc:
        if exc.status in _REFUSED:
            half.refused = True
        raise


async def _prod_half(c: AsyncClient, half: _Half, uid: str, num_conn: int, rate: int, lease: int,
                     hello_timeout: float | None, clock: _Clock) -> ProdSide:
    resp = await _req(c, half, uid, num_conn, rate, lease, hello_timeout)
    clock.emit(Step.PROD_HELLO, f"producer endpoints {', '.join(resp.prod_listeners)}; "
                                f"PROD WAN listeners {', '.join(resp.listeners)}")
    endpoints = check_targets(resp.prod_listeners, "the producer's endpoints (from its hello)", usage=False)
    wan = await _update(c, half, uid, endpoints, resp.wan_secret)
    clock.emit(Step.PROD_CONNECTED, f"PROD data server forwards to the producer (WAN leg {wan})")
    return ProdSide(uid=uid, s2cs=half.gateway.address, wan_listeners=tuple(resp.listeners),
                    producer_endpoints=tuple(resp.prod_listeners), wan_security=wan,
                    wan_secret=resp.wan_secret)


async def _update(c: AsyncClient, half: _Half, uid: str, targets: list[str], secret: bytes) -> str:
    """The side's update; its WAN protection (an original server, which says none, is named in the log)."""
    wan = wan_security_of(await c.update(uid, half.role, targets, secret, timeout=half.gateway.timeout))
    if wan == ORIGINAL_SERVER:
        log.warning("%s", original_server_note(half.role, half.gateway.address))
    return wan


async def _cons_half(c: AsyncClient, half: _Half, uid: str, num_conn: int, rate: int, lease: int,
                     hello_timeout: float | None, clock: _Clock,
                     prod: "asyncio.Future[ProdSide] | ProdSide") -> ConsSide:
    resp = await _req(c, half, uid, num_conn, rate, lease, hello_timeout)
    clock.emit(Step.CONS_HELLO, f"consumer listeners {', '.join(resp.listeners)}")
    side = prod if isinstance(prod, ProdSide) else await asyncio.shield(prod)
    targets = check_targets(side.wan_listeners, "the PROD side's WAN listeners", usage=False)
    wan = await _update(c, half, uid, targets, side.wan_secret)
    clock.emit(Step.CONNECTED, f"CONS data server forwards to {', '.join(side.wan_listeners)} "
                               f"(WAN leg {wan})")
    return ConsSide(uid=uid, s2cs=half.gateway.address, consumer_listeners=tuple(resp.listeners),
                    targets=tuple(side.wan_listeners), wan_security=wan)


async def _release_half(c: AsyncClient, half: _Half, uid: str) -> bool:
    """Release one side; False if it holds nothing (any more)."""
    try:
        await c.release(uid, timeout=min(half.gateway.timeout or RELEASE_TIMEOUT, RELEASE_TIMEOUT))
        return True
    except NotFound:
        return False


async def _cleanup(clients: Sequence[AsyncClient], halves: Sequence[_Half], uid: str, clock: _Clock,
                   reason: str) -> None:
    """After a failure or a cancellation: release every side that may hold something."""
    todo = [(c, h) for c, h in zip(clients, halves) if h.sent and not h.refused]
    if not todo:
        return
    clock.emit(Step.RELEASING, reason)
    results = await asyncio.gather(*(_release_half(c, h, uid) for c, h in todo), return_exceptions=True)
    for (_, h), r in zip(todo, results):
        if isinstance(r, CertificateRejected):
            continue   # no call reaches that server over this channel: its req never did either
        if isinstance(r, BaseException):
            log.error("session %s: could not release the %s side on %s: %s; it ends at the "
                      "server's hello timeout or lease", uid, h.role, h.gateway.address, r)
    freed = [h.role for (_, h), r in zip(todo, results) if not isinstance(r, BaseException)]
    clock.emit(Step.RELEASED, f"{' and '.join(freed) or 'nothing'} freed")


async def _run_halves(tasks: dict[asyncio.Task, _Half]) -> None:
    """Wait for every task; on the first failure raise it (marked with its side)."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:  # PROD first: a CONS half that waited for PROD fails with PROD's error
            if t not in done or t.cancelled():
                continue
            exc = t.exception()
            if isinstance(exc, ScistreamError):
                raise _side_error(tasks[t], exc) from None
            if exc is not None:
                raise exc


async def connect(prod: GatewayLike, cons: GatewayLike, *, num_conn: int = 1, rate: int = 0,
                  lease: int = 0, uid: str | None = None, hello_timeout: float | None = None,
                  on_progress: ProgressCallback | None = None) -> Connection:
    """Set up a whole session: both reqs, both hellos, both connection maps.

    ``uid``: the session's uid (default: a new one; pass your own to start the application
    controllers before calling). ``hello_timeout``: seconds to wait for the hellos (default:
    the servers' ``--hello-timeout``). On failure or cancellation both sides are released
    and the typed error (``scistream.errors``) propagates, its message naming the side."""
    prod, cons = Gateway.of(prod), Gateway.of(cons)
    uid = check_uid(uid) if uid else new_uid()
    _check_args(num_conn, rate, lease)
    clock = _Clock(uid, on_progress)
    halves = (_Half("PROD", prod), _Half("CONS", cons))
    async with contextlib.AsyncExitStack() as stack:
        pc = await stack.enter_async_context(prod.client())
        cc = await stack.enter_async_context(cons.client())
        ptask = asyncio.create_task(_prod_half(pc, halves[0], uid, num_conn, rate, lease, hello_timeout, clock))
        ctask = asyncio.create_task(_cons_half(cc, halves[1], uid, num_conn, rate, lease, hello_timeout,
                                               clock, ptask))
        clock.emit(Step.REQUESTED, f"req sent to PROD {prod.address} and CONS {cons.address}; "
                                   "waiting for both application controllers' hellos")
        try:
            await _run_halves({ptask: halves[0], ctask: halves[1]})
        except BaseException as exc:
            for t in (ptask, ctask):
                t.cancel()
            await asyncio.gather(ptask, ctask, return_exceptions=True)
            reason = "interrupted" if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)) else str(exc)
            await _cleanup((pc, cc), halves, uid, clock, reason)
            raise
        p, c = ptask.result(), ctask.result()
    wan = p.wan_security if p.wan_security == c.wan_security else f"{p.wan_security}/{c.wan_security}"
    return Connection(uid=uid, prod_s2cs=prod.address, cons_s2cs=cons.address, num_conn=num_conn,
                      rate=rate, producer_endpoints=p.producer_endpoints, wan_listeners=p.wan_listeners,
                      consumer_listeners=c.consumer_listeners, wan_security=wan,
                      steps=tuple(clock.steps), prod=prod, cons=cons)


async def request_prod(gateway: GatewayLike, *, num_conn: int = 1, rate: int = 0, lease: int = 0,
                       uid: str | None = None, hello_timeout: float | None = None,
                       on_progress: ProgressCallback | None = None) -> ProdSide:
    """The PROD half alone (``s2uc prod-req``): req, the producer's hello, update PROD.

    The result's ``wan_listeners`` and ``wan_secret`` are what ``request_cons`` needs."""
    gateway = Gateway.of(gateway)
    uid = check_uid(uid) if uid else new_uid()
    _check_args(num_conn, rate, lease)
    clock, half = _Clock(uid, on_progress), _Half("PROD", gateway)
    return await _one_half(half, uid, clock, lambda c: _prod_half(c, half, uid, num_conn, rate, lease,
                                                                  hello_timeout, clock))


async def request_cons(gateway: GatewayLike, uid: str, wan_listeners: Sequence[str],
                       wan_secret: bytes = b"", *, num_conn: int | None = None, rate: int = 0,
                       lease: int = 0, hello_timeout: float | None = None,
                       on_progress: ProgressCallback | None = None) -> ConsSide:
    """The CONS half alone (``s2uc cons-req``): req, the consumer's hello, update CONS to
    the PROD side's ``wan_listeners`` with its ``wan_secret``."""
    gateway = Gateway.of(gateway)
    check_uid(uid)
    wan_listeners = check_targets(wan_listeners, "request_cons needs the PROD side's WAN listeners")
    num_conn = num_conn or len(wan_listeners)
    _check_args(num_conn, rate, lease)
    clock, half = _Clock(uid, on_progress), _Half("CONS", gateway)
    prod = ProdSide(uid=uid, s2cs="", wan_listeners=tuple(wan_listeners), producer_endpoints=(),
                    wan_security="", wan_secret=wan_secret)
    return await _one_half(half, uid, clock, lambda c: _cons_half(c, half, uid, num_conn, rate, lease,
                                                                  hello_timeout, clock, prod))


async def _one_half(half: _Half, uid: str, clock: _Clock, run: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
    """``run(client)`` on the half's gateway; on failure or cancellation the half is released
    and a typed error names its side."""
    async with half.gateway.client() as c:
        clock.emit(Step.REQUESTED, f"req sent to {half.role} {half.gateway.address}")
        try:
            return await run(c)
        except BaseException as exc:
            await _cleanup([c], [half], uid, clock, str(exc) or type(exc).__name__)
            if isinstance(exc, ScistreamError):
                raise _side_error(half, exc) from None
            raise


async def release(session: Connection | str, prod: GatewayLike | None = None,
                  cons: GatewayLike | None = None) -> Released:
    """Release a session on both sides (or the sides given): stop its data servers, free ports.

    ``release(conn)`` for a ``Connection``; ``release(uid, prod, cons)`` otherwise. A side that
    holds nothing any more reports False; both holding nothing raises ``NotFound``."""
    if isinstance(session, Connection):
        uid, prod, cons = session.uid, prod or session.prod or session.prod_s2cs, \
            cons or session.cons or session.cons_s2cs
    else:
        uid = check_uid(session)
    if prod is None and cons is None:
        raise InvalidArgument("release needs the PROD or the CONS control server (or both)")
    done: dict[str, bool] = {"PROD": False, "CONS": False}

    async def one(half: _Half) -> None:
        async with half.gateway.client() as c:
            try:
                done[half.role] = await _release_half(c, half, uid)
            except ScistreamError as exc:
                raise _side_error(half, exc) from None

    halves = [_Half(role, Gateway.of(g)) for role, g in (("PROD", prod), ("CONS", cons)) if g is not None]
    results = await asyncio.gather(*(one(h) for h in halves), return_exceptions=True)
    for r in results:  # both sides were tried; report the first failure
        if isinstance(r, BaseException):
            raise r
    if not any(done.values()):
        raise NotFound(f"no active session {uid} on the control servers given; "
                       "it was released already, or expired")
    return Released(uid=uid, prod=done["PROD"], cons=done["CONS"])


async def status(gateway: GatewayLike, uid: str = "") -> list[SessionStatus]:
    """The sessions of ``uid`` (or every session you may see) on one control server."""
    gateway = Gateway.of(gateway)
    if uid:
        check_uid(uid)
    async with gateway.client() as c:
        resp = await c.status(uid, timeout=gateway.timeout)
    return [SessionStatus.from_pb(s) for s in resp.sessions]


__all__ = ["connect", "request_prod", "request_cons", "release", "status", "new_uid", "ProgressCallback"]
