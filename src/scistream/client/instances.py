"""Several instances of one facility's control server, and moving from one to the next.

A facility may run its control server (S2CS) on several gateway nodes that share one
session store. A client names them all in one value, comma-separated, or as a list:

    s2uc prod-req --s2cs 10.0.0.2:5000,10.0.0.3:5000
    AsyncClient("10.0.0.2:5000,10.0.0.3:5000")     # or ["10.0.0.2:5000", "10.0.0.3:5000"]
    Gateway("[2001:db8::2]:5000,[2001:db8::3]:5000")

The value is split on commas only: IPv6 literals are written in brackets. One address is
one instance, and behaves exactly as before (no retry). With several, ``AsyncClient``
sends each call to the instance that answered last (sticky: a session's steps normally
go to one instance; the first call goes to the first address) and, when that instance is
unreachable, to the next one, in order, round-robin, with a short backoff after each
full round (50 ms doubling to 1 s), until the call's own timeout and for at most
``FAILOVER_WINDOW`` (15 s, ``ChannelOptions.failover_window``) after the first
unreachable attempt; then it fails with ``UNAVAILABLE`` naming every instance and what
each said. A ``req`` waiting for its hello keeps its own deadline as before. Unreachable
(``moves_on``) means the call failed with ``UNAVAILABLE``: no connection (refused, or no
answer within ``CONNECT_TIMEOUT``, 5 s), a connection reset mid-call, or a server that
answered "session store unavailable".
Every other answer (``NOT_FOUND``, ``PERMISSION_DENIED``, ``INVALID_ARGUMENT``,
``FAILED_PRECONDITION``, ``ALREADY_EXISTS``, a ``DEADLINE_EXCEEDED``...) is the
facility's answer and is not retried, with one exception:

A ``release`` whose earlier attempt may have reached an instance (it failed mid-call,
not while connecting: ``may_have_arrived``) and which another instance then answers
``NOT_FOUND`` is taken as done: the first attempt may have released the session
(``release_is_done``). The client logs a note saying so and the call succeeds.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grpc

from ..addr import parse_listener
from ..errors import InvalidArgument, LocalMistake

#: A call gives up on unreachable instances this many seconds after the first unreachable
#: attempt (or at its own deadline, if sooner).
FAILOVER_WINDOW = 15.0
#: With several instances, a connection attempt that gets no answer (a node that is off)
#: fails after this many seconds, so the call moves on (gRPC's own default: 20 s).
CONNECT_TIMEOUT = 5.0
KEEPALIVE = 10.0        # several instances: seconds between pings on a quiet call, and to wait for the answer
#: The pause after a whole round of unreachable instances: doubling, bounded.
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 1.0


class BadInstances(LocalMistake):
    """A list of control server addresses with an empty element, refused before anything
    was sent (a usage error: exit code 2)."""

    usage = True


@dataclasses.dataclass(frozen=True)
class Unreachable:
    """One attempt that found an instance unreachable."""
    address: str
    details: str

    @property
    def may_have_arrived(self) -> bool:
        return may_have_arrived(self.details)


def parse_instances(value: str | Sequence[str], what: str = "--s2cs") -> tuple[str, ...]:
    """The instances named by ``value`` ("a:5000,b:5000" or a list of addresses), in order,
    each once. An empty element or a bad address is a ``BadInstances`` (an
    ``InvalidArgument`` found before anything was sent), for a single address too."""
    if isinstance(value, str):
        items = value.split(",")
        shown = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in (v.split(",") if v else [""])]
        shown = ",".join(value)
    else:
        raise InvalidArgument(f"{what}: expected HOST:PORT, HOST:PORT,HOST:PORT or a list of "
                              f"addresses, got {type(value).__name__}")
    if not items:
        raise BadInstances(f"{what}: no control server address given; expected "
                           "HOST:PORT[,HOST:PORT...]; nothing was sent")
    found: list[str] = []
    for n, item in enumerate(items, 1):
        item = item.strip()
        if not item:
            raise BadInstances(f"{what} {shown!r}: address {n} of {len(items)} is empty; expected "
                               "HOST:PORT[,HOST:PORT...] (IPv6 as [ADDR]:PORT); nothing was sent")
        try:
            parse_listener(item, example="127.0.0.1:5000")
        except InvalidArgument as exc:
            msg = str(exc).replace("bad listener", "bad address", 1)
            where = what if len(items) == 1 else f"{what} {shown!r}"
            raise BadInstances(f"{where}: {msg} (the control server's address and port); "
                               "nothing was sent") from None
        if item not in found:
            found.append(item)
    return tuple(found)


def join_instances(value: str | Sequence[str], what: str = "--s2cs") -> str:
    """The instances of ``value`` as one string, the form kept in session files and printed."""
    return ",".join(parse_instances(value, what))


def moves_on(code: grpc.StatusCode) -> bool:
    """True if a call that failed with ``code`` goes to the next instance."""
    return code == grpc.StatusCode.UNAVAILABLE


_NOT_CONNECTED = ("failed to connect", "connection refused", "dns resolution failed",
                  "name resolution", "no route to host", "network is unreachable")


def may_have_arrived(details: str) -> bool:
    """False if an UNAVAILABLE call certainly never reached a server (the connection was
    never made); True otherwise (reset mid-call, or the server answered "session store
    unavailable")."""
    low = (details or "").lower()
    return not any(text in low for text in _NOT_CONNECTED)


def release_is_done(code: grpc.StatusCode, earlier: Sequence[Unreachable]) -> bool:
    """A release answered ``code`` after the ``earlier`` unreachable attempts of the same
    call: True if that answer is NOT_FOUND and an earlier attempt may have reached an
    instance, which may have released the session then (so it is taken as released)."""
    return code == grpc.StatusCode.NOT_FOUND and any(a.may_have_arrived for a in earlier)


__all__ = ["CONNECT_TIMEOUT", "FAILOVER_WINDOW", "BadInstances", "Unreachable", "parse_instances", "join_instances",
           "moves_on", "may_have_arrived", "release_is_done"]
