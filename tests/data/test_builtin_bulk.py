"""1 GiB each way through the built-in chain (CONS -> PROD), plain and TLS, every byte checked."""
from __future__ import annotations

import asyncio

import pytest
from builtin_support import Pattern, PatternApp, data_servers, entry, pattern_exchange
from test_builtin import wait_for

GIB = 1 << 30


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_one_gib_each_way_through_the_chain(tmp_path, tls):
    pattern = Pattern()
    app = PatternApp(pattern, send_bytes=GIB)
    try:
        async with data_servers(tmp_path) as ds:
            prod, cons = await ds.chain(app.target, tls=tls)
            got = await asyncio.to_thread(pattern_exchange, *entry(cons), pattern, GIB, 600)
            assert got == (GIB, True)

            async def producer_done():
                return len(app.results) == 1 and (app.results[0].received == GIB or app.results[0].error)
            await wait_for(producer_done, 60, "the producer to receive everything")
            assert app.results[0].intact and not app.results[0].error

            async def counted():
                a, b = await prod.stats(), await cons.stats()
                return a.connections == b.connections == 0 and a.bytes_in == b.bytes_in == GIB \
                    and a.bytes_out == b.bytes_out == GIB
            await wait_for(counted, 30, "both data servers to count 1 GiB each way")
    finally:
        app.close()
