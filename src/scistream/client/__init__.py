"""The SciStream client library: what ``s2uc`` and ``appctrl`` are built on.

    async with AsyncClient("127.0.0.1:5000", server_cert="server.crt", token=tok) as c:
        resp = await c.req(uid, "PROD", num_conn=4)
"""
from .api import AsyncClient, Client, ChannelOptions

__all__ = ["AsyncClient", "Client", "ChannelOptions"]
