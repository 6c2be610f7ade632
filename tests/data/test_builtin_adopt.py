"""Re-adoption: a fresh data-server object takes a session over in the running node service
from its ``handle()`` (what a restarted control server finds in its state store)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest
from builtin_support import data_servers, entry
from conftest import async_wait_until, echo_roundtrip, port_is_free
from test_builtin import read_all, tag_server

from scistream.data.base import get_backend
from scistream.data.node.backend import NodeDataServer
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

            adopted = await get_backend("Builtin").adopt(original.spec, handle)
            assert isinstance(adopted, NodeDataServer) and adopted is not original
            assert adopted.handle() == handle
            stats = await adopted.stats()
            assert stats.bytes_in == stats.bytes_out == len(payload) and stats.total_connections == 1
            assert await echo_roundtrip(*entry(adopted), payload) == payload
            assert (await adopted.stats()).total_connections == 2

            await adopted.retarget((f"127.0.0.1:{other.sockets[0].getsockname()[1]}",))
            assert await asyncio.to_thread(read_all, *entry(adopted)) == b"other target"

            await adopted.stop()
            assert port_is_free(original.spec.ports[0])
            assert await ds.sessions() == {}
            assert pid_alive(handle["service_pid"])     # the service serves on, for other sessions
            await original.stop()      # the first owner's stop is harmless now
    finally:
        other.close()
        await other.wait_closed()


async def test_adopted_session_survives_the_service_dying(tmp_path, echo_server):
    """kill -9 of the node service: the control server's handle starts it again and puts
    the adopted session back on its ports; nothing is reported as lost."""
    async with data_servers(tmp_path) as ds:
        original = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        adopted = await NodeDataServer.adopt(original.spec, original.handle())
        waiter = asyncio.create_task(adopted.wait_exit())
        pid = original.handle()["service_pid"]
        os.kill(pid, signal.SIGKILL)

        async def back() -> bool:
            return ds.node.pid != pid and adopted.sid in await ds.sessions()
        await async_wait_until(back, 20, "the service to be started again with the session")
        assert await echo_roundtrip(*entry(adopted), b"after") == b"after"
        assert not waiter.done()
        waiter.cancel()


async def test_adopt_refuses_a_session_the_service_does_not_carry(tmp_path, echo_server):
    async with data_servers(tmp_path) as ds:
        original = await ds.start("PROD", [f"{echo_server[0]}:{echo_server[1]}"])
        handle = original.handle()
        other_spec = dataclasses.replace(original.spec, uid="another-session")
        with pytest.raises(DataServerError, match="another-session/PROD is not in the node service"):
            await NodeDataServer.adopt(other_spec, handle)
        await original.stop()
        with pytest.raises(DataServerError, match="is not in the node service"):
            await NodeDataServer.adopt(original.spec, handle)
