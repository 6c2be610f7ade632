"""Re-adoption: a fresh BuiltinDataServer object takes over a running s2ds process from
its ``handle()`` (what a restarted control server finds in its state store)."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
from builtin_support import data_servers, entry, port_is_free
from conftest import echo_roundtrip
from test_builtin import read_all, tag_server

from scistream.data.base import get_backend
from scistream.data.builtin import BuiltinDataServer
from scistream.data.supervise import pid_alive
from scistream.errors import DataServerError


async def test_adopted_server_reports_retargets_and_stops(tmp_path, echo_server):
    other = await tag_server(b"other target")
    try:
        async with data_servers(tmp_path) as ds:
            original = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
            handle = original.handle()
            payload = os.urandom(1 << 20)
            assert await echo_roundtrip(*entry(original), payload) == payload

            adopted = await get_backend("BuiltinProcess").adopt(original.spec, handle)
            assert isinstance(adopted, BuiltinDataServer) and adopted is not original
            assert adopted.pids == original.pids
            stats = await adopted.stats()
            assert stats.bytes_in == stats.bytes_out == len(payload) and stats.total_connections == 1
            assert await echo_roundtrip(*entry(adopted), payload) == payload
            assert (await adopted.stats()).total_connections == 2

            await adopted.retarget((f"127.0.0.1:{other.sockets[0].getsockname()[1]}",))
            assert await asyncio.to_thread(read_all, *entry(adopted)) == b"other target"

            pid = adopted.pids[0]
            await adopted.stop()
            assert not pid_alive(pid)
            assert port_is_free(original.spec.ports[0])
            await original.stop()      # the first owner's stop is harmless now
    finally:
        other.close()
        await other.wait_closed()


async def test_adopted_server_notices_the_process_dying(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        original = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        adopted = await BuiltinDataServer.adopt(original.spec, original.handle())
        waiter = asyncio.create_task(adopted.wait_exit())
        await asyncio.sleep(0)
        assert not waiter.done()
        os.kill(adopted.pids[0], signal.SIGKILL)
        reason = await asyncio.wait_for(waiter, 10)
        assert "s2ds" in reason and str(original.pids[0]) in reason


async def test_adopt_refuses_a_dead_or_foreign_process(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        original = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        handle = original.handle()
        # a live pid that is not this data server
        with pytest.raises(DataServerError, match="not by pid"):
            await BuiltinDataServer.adopt(original.spec, {**handle, "pid": os.getpid()})
        # the right process, but claimed for another session
        other_spec = original.spec.__class__(**{**original.spec.__dict__, "uid": "another-session"})
        with pytest.raises(DataServerError, match="another-session"):
            await BuiltinDataServer.adopt(other_spec, handle)
        with pytest.raises(DataServerError, match="no pid"):
            await BuiltinDataServer.adopt(original.spec, {})
        await original.stop()
        with pytest.raises(DataServerError, match="gone"):
            await BuiltinDataServer.adopt(original.spec, handle)
