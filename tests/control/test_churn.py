"""Session churn leaves the control server as it was: after many sessions set up and
ended every way (released, expired for want of a hello, failed update, released before
the update), no task, descriptor, port or bandwidth is left behind, and the history of
ended sessions stays within its bound."""
from __future__ import annotations

import asyncio
import collections
import os
import re

import pytest

from conftest import async_wait_until, new_uid
from scistream import errors


def _fds() -> collections.Counter:
    kinds: collections.Counter = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"(socket|pipe|anon_inode):.*", target)
        kinds[m.group(1) if m else "file"] += 1
    return kinds


async def _session(c, endpoint: str, i: int) -> str:
    uid = new_uid()
    how = i % 4
    if how == 3:                                  # no hello: expires after --hello-timeout
        with pytest.raises(errors.DeadlineExceeded):
            await c.req(uid, "PROD", 2, rate=1000)
        return "expired"
    req = asyncio.create_task(c.req(uid, "PROD", 2, rate=1000))
    await c.hello(uid, "PROD", [endpoint])
    resp = await req
    if how == 0:                                  # the whole life: update, then release
        await c.update(uid, "PROD", resp.prod_listeners, resp.wan_secret)
        await c.release(uid)
        return "released"
    if how == 1:                                  # an update that fails: a wrong secret
        with pytest.raises(errors.PermissionDenied):
            await c.update(uid, "PROD", resp.prod_listeners, bytes(32))
        await c.release(uid)
        return "refused update"
    await c.release(uid)                          # released before any update
    return "released early"


async def test_session_churn_leaves_nothing_behind(servers, client_for, echo_server):
    srv = await servers(hello_timeout=0.3, max_rate=1_000_000)
    srv.registry.config.history = 50    # ended sessions kept for status (1000 by default)
    c = client_for(srv)
    endpoint = f"{echo_server[0]}:{echo_server[1]}"

    async def round_(n: int) -> collections.Counter:
        sem = asyncio.Semaphore(10)

        async def one(i: int) -> str:
            async with sem:
                return await _session(c, endpoint, i)
        return collections.Counter(await asyncio.gather(*(one(i) for i in range(n))))

    def idle() -> bool:
        r = srv.registry
        return not r.active and not r.ports.used and r.bandwidth.used == 0

    assert await round_(40) == {"released": 10, "refused update": 10, "released early": 10, "expired": 10}
    await async_wait_until(idle, 20, "the first round to end")
    tasks, fds = len(asyncio.all_tasks()), _fds()

    for _ in range(3):
        await round_(40)
        await async_wait_until(idle, 20, "the round to end")
    # data servers are gone and their watchers done: the same tasks and descriptors
    await async_wait_until(lambda: len(asyncio.all_tasks()) <= tasks, 20, "tasks to finish")
    await async_wait_until(lambda: _fds() == fds, 20, f"descriptors to be back to {dict(fds)}")
    assert len(srv.registry.ended) <= 50
    st = await c.status()
    assert not [s for s in st.sessions if s.state in ("requested", "ready", "connected")]
