"""A TLS connection in memory between two contexts: an ``ssl.SSLObject`` each over memory
BIOs, the bytes shuttled by hand. Tests of contexts, certificates and resumption need no
socket and no process.

    t = handshake(server_ctx, client_ctx)            # ssl.SSLError if either side refuses
    t.server.write(b"hi"); t.shuttle(); t.client.read(2)
"""
from __future__ import annotations

import ssl


class MemoryTLS:
    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str,
                 session: ssl.SSLSession | None = None) -> None:
        self.sbio = (ssl.MemoryBIO(), ssl.MemoryBIO())
        self.cbio = (ssl.MemoryBIO(), ssl.MemoryBIO())
        self.server = server_ctx.wrap_bio(*self.sbio, server_side=True)
        self.client = client_ctx.wrap_bio(*self.cbio, server_side=False, server_hostname=name, session=session)

    def shuttle(self) -> None:
        """Move what each side wrote to the other."""
        if self.cbio[1].pending:
            self.sbio[0].write(self.cbio[1].read())
        if self.sbio[1].pending:
            self.cbio[0].write(self.sbio[1].read())

    def handshake(self) -> "MemoryTLS":
        for _ in range(20):
            done = 0
            for obj in (self.client, self.server):
                try:
                    obj.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            self.shuttle()
            if done == 2:
                try:         # the server learns the client's verdict only with its next read
                    self.server.read(1)
                except ssl.SSLWantReadError:
                    pass
                return self
        raise AssertionError("the handshake did not finish")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str = "scistream-session",
              session: ssl.SSLSession | None = None) -> MemoryTLS:
    """A finished handshake between the two contexts; ssl.SSLError if either side refuses."""
    return MemoryTLS(server_ctx, client_ctx, name, session).handshake()
