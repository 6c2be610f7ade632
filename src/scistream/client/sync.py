"""The high-level client for synchronous code: the same calls, blocking.

Each call runs its coroutine from ``scistream.client.session`` on a fresh event loop, so
it cannot be used from inside a running loop (use the async functions there).

    from scistream.client import Gateway, sync
    conn = sync.connect(Gateway("10.0.0.2:5000", server_cert="prod.crt"),
                        Gateway("10.1.0.2:5000", server_cert="cons.crt"), num_conn=4)
    ...                                  # the consumer connects to conn.consumer_listeners
    sync.release(conn)
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Coroutine, TypeVar

from . import session
from .model import ConsSide, Connection, ProdSide, Released, SessionStatus

T = TypeVar("T")


def _blocking(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @functools.wraps(fn)
    def run(*args, **kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(fn(*args, **kwargs))
        raise RuntimeError(f"scistream.client.sync.{fn.__name__} was called inside a running event "
                           f"loop; await scistream.client.{fn.__name__}(...) instead")
    run.__doc__ = f"Blocking form of ``scistream.client.{fn.__name__}``.\n\n{fn.__doc__ or ''}"
    return run


connect: Callable[..., Connection] = _blocking(session.connect)
request_prod: Callable[..., ProdSide] = _blocking(session.request_prod)
request_cons: Callable[..., ConsSide] = _blocking(session.request_cons)
release: Callable[..., Released] = _blocking(session.release)
status: Callable[..., list[SessionStatus]] = _blocking(session.status)

__all__ = ["connect", "request_prod", "request_cons", "release", "status"]
