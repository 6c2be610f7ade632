"""The order of a client's calls, in one place, so it works against every server: ours and
the original tooling's (scistream-proto 1.2.1, see docs/protocol.md).

Every caller that sends a ``hello`` or an ``update`` goes through here: ``connect``,
``request_prod`` / ``request_cons``, the ``s2uc`` commands and ``appctrl``.

1. **A hello only once its req is known to the server.** The original's server looks the
   uid up when the hello arrives and fails it (``UNKNOWN``, "entry not found") if the req
   is not registered yet; its own clients sleep 0.5 s in between. Ours waits for the req
   (``--hello-grace``), so there the hello may go at once. ``hello_after_req`` sends the
   hello at once and, while the server says it does not know the uid yet, sends it again
   with a short backoff (10 ms doubling to 200 ms, for at most ``HELLO_RETRY_WINDOW``
   seconds, and never after its req failed): nothing extra against ours, a few tens of ms
   against the original's.
2. **Targets checked before any update.** The original's ``update`` indexes the targets
   modulo their number and crashes on an empty list; ``check_targets`` refuses an empty or
   malformed list here, before anything is sent.
3. **An original server is named as such.** It sends no ``wan_secret`` and no
   ``wan_security``; ``ORIGINAL_SERVER`` is what a side's ``wan_security`` says then, and
   ``original_server_note`` the sentence to show the user: the WAN leg is plaintext.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Sequence

from ..addr import parse_listener
from ..errors import InvalidArgument, LocalMistake, NotFound, ScistreamError, Status
from ..proto import pb

log = logging.getLogger(__name__)

HELLO_RETRY_WINDOW = 5.0     # seconds a hello is retried while its req is not known yet
_FIRST_DELAY, _MAX_DELAY = 0.01, 0.2

# What ``wan_security`` says of a side whose server sent none: an original server.
ORIGINAL_SERVER = "plain (original server)"


class BadTargets(LocalMistake):
    """An empty or malformed listener list, refused before anything was sent.

    ``usage`` is True when the list came from the command line (exit code 2)."""

    def __init__(self, message: str, *, usage: bool = True) -> None:
        super().__init__(message)
        self.usage = usage


def check_targets(listeners: Sequence[str], what: str, *, usage: bool = True) -> list[str]:
    """The listeners as a list, or ``BadTargets`` if there are none or one is not host:port."""
    items = [str(x).strip() for x in listeners]
    if not items or not any(items):
        raise BadTargets(f"{what}: no listener given (expected host:port[,host:port...]); "
                         "nothing was sent", usage=usage)
    for item in items:
        try:
            parse_listener(item)
        except InvalidArgument as exc:
            raise BadTargets(f"{what}: {exc}; nothing was sent", usage=usage) from None
    return items


def unknown_uid(exc: ScistreamError) -> bool:
    """True if a hello failed only because the server does not know its req yet."""
    if exc.status is Status.UNKNOWN:
        return "entry not found" in str(exc).lower()   # the original's server
    return isinstance(exc, NotFound)                      # ours, after --hello-grace


async def hello_after_req(client, uid: str, role: str, endpoints: Sequence[str] = (), *,
                          req: "asyncio.Future | None" = None,
                          window: float = HELLO_RETRY_WINDOW) -> pb.AppResponse:
    """Send the hello; while the server does not know the uid yet, send it again.

    ``req``: the pending req call of this uid, if this client sent it (the retries stop,
    with the req's own error, once it failed)."""
    deadline = time.monotonic() + window
    delay, tries = _FIRST_DELAY, 0
    while True:
        tries += 1
        try:
            resp = await client.hello(uid, role, list(endpoints))
        except ScistreamError as exc:
            if req is not None and req.done() and not req.cancelled() and req.exception() is not None:
                raise req.exception() from None  # type: ignore[misc]
            if not unknown_uid(exc) or time.monotonic() + delay > deadline:
                raise
            log.debug("hello %s/%s: the server does not know the uid yet (%s); again in %.0f ms",
                      uid, role, exc, delay * 1000)
            await _wait(delay, req)
            delay = min(delay * 2, _MAX_DELAY)
            continue
        if tries > 1:
            log.info("hello %s/%s accepted at try %d (a server that needs its req first)",
                     uid, role, tries)
        return resp


async def _wait(delay: float, req: "asyncio.Future | None") -> None:
    """Sleep ``delay`` seconds, or less if the req finishes (fails) meanwhile."""
    if req is None or req.done():
        await asyncio.sleep(delay)
        return
    await asyncio.wait([req], timeout=delay)


async def req_and_hello(client, uid: str, role: str, req_call: Awaitable[pb.Response],
                        endpoints: Sequence[str] = ()) -> pb.Response:
    """A req and the hello that completes it, both from this client (``inbound-request``,
    ``outbound-request``, ``prod-req --mock``): the req goes first, the hello as soon as
    the server knows the req. The req is cancelled if the hello fails."""
    req = asyncio.ensure_future(req_call)
    try:
        await hello_after_req(client, uid, role, endpoints, req=req)
        return await req
    except BaseException:
        if not req.done():
            req.cancel()
        await asyncio.gather(req, return_exceptions=True)
        raise


async def session_of(client, uid: str, role: str, *, req: "asyncio.Future | None" = None,
                     window: float = HELLO_RETRY_WINDOW) -> "pb.SessionInfo | None":
    """The server's record of the ``role`` side of ``uid``, as soon as it has one (its
    ``status``, asked again while it answers NOT_FOUND). None from a server that has no
    ``status`` (the original tooling's) or when none appeared within ``window`` seconds.
    ``req``: this client's pending req for it; if that fails meanwhile, its error is raised.

    ``s2uc prod-req`` prints the uid only once this returns: the server took the req."""
    deadline = time.monotonic() + window
    delay = _FIRST_DELAY
    while True:
        if req is not None and req.done():
            if req.cancelled() or req.exception() is None:
                return None   # answered already (a hello came): nothing to wait for
            raise req.exception()  # type: ignore[misc]
        try:
            resp = await client.status(uid, timeout=max(1.0, deadline - time.monotonic()))
        except ScistreamError as exc:
            if exc.status == Status.UNIMPLEMENTED:
                return None
            if not isinstance(exc, NotFound):
                if req is not None and req.done() and not req.cancelled() and req.exception() is not None:
                    raise req.exception() from None  # type: ignore[misc]
                raise
        else:
            for s in resp.sessions:
                if s.uid == uid and s.role == role and not s.ended:
                    return s
        if time.monotonic() + delay > deadline:
            return None
        await _wait(delay, req)
        delay = min(delay * 2, _MAX_DELAY)


def wan_security_of(resp: pb.Response) -> str:
    """A side's WAN protection from its update's answer: an original server says nothing."""
    return resp.wan_security or ORIGINAL_SERVER


def original_server_note(role: str, address: str) -> str:
    """What to tell the user when ``address`` turned out to be an original server."""
    return (f"the {role} S2CS at {address} is a server of the original SciStream tooling (its "
            "answers carry no WAN secret): the WAN leg of this session is PLAINTEXT (or the "
            "original's uid-derived PSK, known to anyone who knows the uid), not encrypted "
            "with a per-session secret")


__all__ = ["HELLO_RETRY_WINDOW", "ORIGINAL_SERVER", "BadTargets", "check_targets", "unknown_uid",
           "hello_after_req", "req_and_hello", "session_of", "wan_security_of", "original_server_note"]
