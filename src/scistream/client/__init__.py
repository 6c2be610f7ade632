"""The SciStream client library: what ``s2uc`` and ``appctrl`` are built on.

High level (typed results, both facilities at once; ``scistream.client.sync`` for
blocking code):

    conn = await connect(Gateway("10.0.0.2:5000", server_cert="prod.crt", token=tok),
                         Gateway("10.1.0.2:5000", server_cert="cons.crt", token=tok), num_conn=4)
    await release(conn)

Low level (one control server, the protocol's messages):

    async with AsyncClient("127.0.0.1:5000", server_cert="server.crt", token=tok) as c:
        resp = await c.req(uid, "PROD", num_conn=4)

A facility that runs its control server on several nodes is one address list,
``Gateway("10.0.0.2:5000,10.0.0.3:5000")`` or ``AsyncClient(["10.0.0.2:5000", "10.0.0.3:5000"])``:
a call that finds one instance unreachable goes to the next (``scistream.client.instances``).

Every failure is a ``scistream.errors.ScistreamError`` subclass carrying its gRPC status.
"""
from . import sync
from .api import AsyncClient, ChannelOptions, Client
from .model import (ConsSide, Connection, Gateway, ProdSide, Progress, Released, SessionStatus,
                    Step, chain)
from .session import connect, new_uid, release, request_cons, request_prod, status

__all__ = ["AsyncClient", "Client", "ChannelOptions",
           "Gateway", "Connection", "ProdSide", "ConsSide", "Released", "SessionStatus", "Progress", "Step",
           "connect", "request_prod", "request_cons", "release", "status", "chain", "new_uid",
           "sync"]
