"""Listener strings: ``host:port``, IPv6 hosts in brackets (``[::1]:5100``)."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import uuid

from .errors import InvalidArgument

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,62}))*\.?$")
MAX_LISTENER_LEN = 300
#: How long a name lookup of an update's target may take before the update fails.
RESOLVE_TIMEOUT = 10.0


def parse_listener(text: str, example: str = "127.0.0.1:5100") -> tuple[str, int]:
    """Split ``host:port``; raise InvalidArgument naming what is wrong (``example``: the
    address shown as the right form)."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"empty listener; expected host:port, e.g. {example}")
    if len(text) > MAX_LISTENER_LEN:
        raise InvalidArgument(f"listener is {len(text)} characters long; expected host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise InvalidArgument(f"bad listener {text!r}; expected [v6-address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(f"bad listener {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise InvalidArgument(f"bad listener {text!r}; expected host:port, e.g. {example}")
        if ":" in host:
            raise InvalidArgument(f"bad listener {text!r}; write IPv6 hosts in brackets: [::1]:{example.rpartition(':')[2]}")
        if not _HOST_RE.match(host):
            raise InvalidArgument(f"bad listener {text!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"bad listener {text!r}: port must be 1-65535")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, as the kernel hands one out (it may be taken again
    before it is used: for a server started right away, not a reservation)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family) as s:
        s.bind(sockaddr)
        return s.getsockname()[1]


def format_listener(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_listener(text: str, timeout: float | None = None) -> str:
    """``host:port`` -> the numeric ``address:port`` it connects to (the first address
    the resolver gives), looked up without blocking the event loop.

    InvalidArgument when the name does not resolve, or not within ``timeout`` seconds."""
    host, port = parse_listener(text)
    if "%" not in host:          # a scoped IPv6 address needs its interface looked up
        with contextlib.suppress(ValueError):
            return format_listener(str(ipaddress.ip_address(host)), port)   # an address already
    timeout = RESOLVE_TIMEOUT if timeout is None else timeout
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot resolve {text!r}: {exc.strerror}") from None
    except asyncio.TimeoutError:
        raise InvalidArgument(f"cannot resolve {text!r}: no answer within {timeout:g} s") from None
    addr = infos[0][4]
    host = str(addr[0])
    if len(addr) == 4 and addr[3] and "%" not in host:    # keep a link-local address's scope
        host = f"{host}%{socket.if_indextoname(addr[3])}"
    return format_listener(host, int(addr[1]))


def check_uid(uid: str) -> str:
    """A session uid must be a UUID string."""
    try:
        uuid.UUID(uid)
    except (ValueError, TypeError, AttributeError):
        shown = uid if len(uid or "") <= 64 else uid[:64] + "..."
        raise InvalidArgument(f"uid {shown!r} is not a UUID; create one with s2uc prod-req") from None
    return uid


def check_role(role: str) -> str:
    if role not in ("PROD", "CONS"):
        shown = role if len(role) <= 32 else role[:32] + "..."
        raise InvalidArgument(f"role {shown!r} is neither PROD nor CONS")
    return role
